"""``top_eigenvalues``: curvature operator + Lanczos + capacity metrics in one call."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from . import capacity
from ._validation import check_choice, check_dtype, check_int, check_seed
from .lanczos import REORTH, WHICH, lanczos
from .operators import CURVATURES, make_operator

__all__ = ["top_eigenvalues"]


def top_eigenvalues(
    model: nn.Module,
    data: Any,
    *,
    curvature: str = "ggn",
    k: int = 5,
    params: str | Tensor | Iterable[str | Tensor] | None = None,
    max_iter: int | None = None,
    reorth: str = "full",
    seed: int = 0,
    dtype: torch.dtype | None = None,
    which: str = "largest",
    loss_fn: str | Callable[[Tensor, Tensor], Tensor] | None = None,
    tol: float | None = None,
    mc_samples: int = 1,
    shift_labels: bool | None = None,
) -> dict[str, Any]:
    """Extreme eigenvalues of a curvature matrix of the mean loss, by Lanczos.

    Builds the operator (:func:`fisher_metrics.operators.make_operator`), runs
    :func:`fisher_metrics.lanczos.lanczos` and summarises the computed
    eigenvalues with :mod:`fisher_metrics.capacity`.

    Args:
        model: the model (plain ``nn.Module`` or Hugging Face model).
        data: ``(inputs, targets)``, a dict batch with ``labels``, or an iterable
            of either; the curvature is that of the mean loss over all valid rows
            (samples, or tokens; labels ``-100`` and masked positions excluded).
        curvature: ``"ggn"`` (= true Fisher for cross-entropy / MSE),
            ``"fisher_mc"`` (sampled labels), ``"empirical_fisher"``, ``"hessian"``.
        k: number of eigenvalues (``1 <= k <= n``, ``n`` = selected parameter count).
        params: parameter selection (names, regexes, tensors); default all
            trainable parameters.
        max_iter: Lanczos steps cap; default ``min(n, max(10 k, 100))``.
        reorth: ``"full"`` (default), ``"periodic"`` or ``"none"``.
        seed: seeds the Lanczos start vector and the ``fisher_mc`` labels.
        dtype: ``torch.float32`` / ``torch.float64`` (reference quality); default
            the parameters' dtype.
        which: ``"largest"`` (default) or ``"smallest"`` (e.g. negative Hessian
            directions), algebraic.
        loss_fn: ``None`` (cross-entropy for integer targets, ``0.5 ||f - y||^2``
            per row for float targets, the model's own token loss for Hugging Face
            dict batches), ``"cross_entropy"``, ``"mse"``, or a per-row callable.
        tol: Lanczos relative residual tolerance; default 1e-10 (float64),
            1e-5 (float32).
        mc_samples: sampled labels per row for ``"fisher_mc"``.
        shift_labels: causal-LM label shift; ``None`` decides from the model.

    Returns:
        A dict with:

        - ``top_eigenvalues``: list of ``k_computed`` floats, most extreme first
          (descending for ``"largest"``, ascending for ``"smallest"``).
        - ``max_eigenvalue``, ``min_computed_eigenvalue``: max / min of those.
        - ``top_k_ratio``: ``max / min`` over the computed eigenvalues above
          ``tol * max`` (``lambda_1 / lambda_k`` for ``"largest"``; ``nan`` if none is
          positive). Not the condition number of the matrix: its smallest eigenvalue is
          not computed (the condition number is at least this ratio).
        - ``effective_rank``: Roy & Vetterli effective rank of the computed ones.
        - ``spectral_gap``: ``|e_1 - e_2|`` of the two most extreme computed
          (``lambda_1 - lambda_2`` for ``"largest"``); ``spectral_range``:
          max - min of the computed ones.
        - ``residuals``: Ritz residual norms ``|beta_m e_m^T y_i|``;
          ``converged``: per-eigenvalue flags; ``num_converged``.
        - ``lanczos_iterations``, ``num_matvecs``, ``k_requested``,
          ``k_computed``, ``batch_size_used`` (valid rows ``R``), ``num_batches``,
          ``num_params`` (``n``), ``operator_used`` (class name), ``curvature``,
          ``loss``, ``is_psd`` (PSD by construction), ``which``, ``reorth``,
          ``tol``, ``dtype``, and a human-readable ``note``.

    Raises:
        TypeError / ValueError: any bad argument (named in the message), e.g. an
            unknown ``curvature`` / ``which`` / ``reorth``, ``k > n``, bad
            ``params`` or data that does not pair outputs with targets.
    """
    check_choice("curvature", curvature, CURVATURES)
    check_choice("which", which, WHICH)
    check_choice("reorth", reorth, REORTH)
    k = check_int("k", k)
    check_seed("seed", seed)
    check_dtype("dtype", dtype)
    if max_iter is not None:
        check_int("max_iter", max_iter)
    op = make_operator(
        model,
        data,
        curvature,
        params=params,
        loss_fn=loss_fn,
        dtype=dtype,
        shift_labels=shift_labels,
        mc_samples=mc_samples,
        seed=seed,
    )
    n = op.shape[0]
    if k > n:
        raise ValueError(f"k must be <= the number of selected parameters n = {n}; got {k}")
    res = lanczos(op, k=k, which=which, max_iter=max_iter, tol=tol, reorth=reorth, seed=seed)
    values = res.eigenvalues.tolist()
    converged = res.converged.tolist()
    num_converged = sum(converged)
    note = (
        f"{num_converged}/{k} requested eigenvalues converged (Ritz residual <= tol * max|theta|"
        f" = {res.tol:.1e} * {res.scale:.4g}) after {res.iterations} Lanczos iterations with "
        f"{reorth} reorthogonalization ({res.restarts} restarts, {res.ghosts_removed} ghost "
        f"copies removed); {op.num_rows} valid rows in {op.num_batches} batches, {n} parameters. "
        "top_k_ratio, effective_rank, spectral_gap and spectral_range describe the "
        f"{len(values)} computed eigenvalues only, not the full spectrum."
    )
    if num_converged < k:
        note += " Not all converged: raise max_iter or loosen tol before trusting them."
    if op.is_psd and which == "smallest":
        note += " This curvature is PSD: its smallest eigenvalues are at or near 0."
    return {
        "top_eigenvalues": values,
        "max_eigenvalue": max(values),
        "min_computed_eigenvalue": min(values),
        "top_k_ratio": capacity.condition_number(res.eigenvalues, rtol=res.tol),
        "effective_rank": capacity.effective_rank(res.eigenvalues),
        "spectral_gap": abs(values[0] - values[1]) if len(values) > 1 else math.nan,
        "spectral_range": capacity.spectral_range(res.eigenvalues),
        "residuals": res.residuals.tolist(),
        "converged": converged,
        "num_converged": num_converged,
        "lanczos_iterations": res.iterations,
        "num_matvecs": res.num_matvecs,
        "k_requested": k,
        "k_computed": len(values),
        "batch_size_used": op.num_rows,
        "num_batches": op.num_batches,
        "num_params": n,
        "operator_used": type(op).__name__,
        "curvature": curvature,
        "loss": op.loss_name,
        "is_psd": op.is_psd,
        "which": which,
        "reorth": reorth,
        "tol": res.tol,
        "dtype": str(op.dtype).replace("torch.", ""),
        "note": note,
    }
