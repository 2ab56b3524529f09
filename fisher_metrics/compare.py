"""Hessian vs Fisher: top eigenvalues of both, and their ratio.

For cross-entropy and squared-error losses the Hessian of the mean loss splits
as ``H = G + (1/R) sum_r sum_c (dl_r / df_rc) d^2 f_rc / d theta^2`` (Schraudolph
2002; Martens 2020, Sec. 8.1): the GGN ``G`` (= Fisher for these losses) plus a
term weighted by the residuals. Near a minimum with small residuals the top of
both spectra agree (Papyan 2018; Sagun et al. 2018), so the ratio
``lambda_k(H) / lambda_k(G)`` near 1 says the Fisher describes the sharp
directions of the loss; a ratio far from 1 says the residual term matters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ._validation import check_choice
from .eigenvalues import top_eigenvalues

__all__ = ["FISHER_CURVATURES", "compare_hessian_fisher"]

FISHER_CURVATURES = ("ggn", "fisher_mc", "empirical_fisher")


def compare_hessian_fisher(
    model: nn.Module,
    data: Any,
    *,
    k: int = 5,
    fisher: str = "ggn",
    params: str | Tensor | Iterable[str | Tensor] | None = None,
    max_iter: int | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    loss_fn: str | Callable[[Tensor, Tensor], Tensor] | None = None,
    tol: float | None = None,
) -> dict[str, Any]:
    """Top-``k`` eigenvalues of the Hessian and of a Fisher, by Lanczos, and their ratios.

    Both come from :func:`fisher_metrics.top_eigenvalues` with the same
    arguments (same data, parameters, seed and Lanczos settings).

    Args:
        model, data, params, max_iter, seed, dtype, loss_fn, tol: see
            :func:`fisher_metrics.top_eigenvalues`.
        k: number of top eigenvalues of each (``1 <= k <= n``).
        fisher: ``"ggn"`` (default, the true Fisher for cross-entropy / MSE),
            ``"fisher_mc"`` or ``"empirical_fisher"``.

    Returns:
        ``{"hessian": result, "fisher": result, "ratios": [lambda_i(H) /
        lambda_i(F)] (i = 1..k, nan where lambda_i(F) = 0), "top_ratio": the
        first ratio, "fisher_curvature": fisher}``; each ``result`` is the dict
        of :func:`~fisher_metrics.top_eigenvalues`.

    Raises:
        TypeError / ValueError: unknown ``fisher``, and anything
            :func:`~fisher_metrics.top_eigenvalues` raises.
    """
    check_choice("fisher", fisher, FISHER_CURVATURES)
    kwargs = dict(
        k=k,
        params=params,
        max_iter=max_iter,
        seed=seed,
        dtype=dtype,
        loss_fn=loss_fn,
        tol=tol,
    )
    fisher_res = top_eigenvalues(model, data, curvature=fisher, **kwargs)
    hessian_res = top_eigenvalues(model, data, curvature="hessian", **kwargs)
    ratios = [
        h / f if f != 0 else math.nan
        for h, f in zip(hessian_res["top_eigenvalues"], fisher_res["top_eigenvalues"], strict=False)
    ]
    return {
        "hessian": hessian_res,
        "fisher": fisher_res,
        "ratios": ratios,
        "top_ratio": ratios[0] if ratios else math.nan,
        "fisher_curvature": fisher,
    }
