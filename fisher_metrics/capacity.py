"""Capacity and flatness metrics computed from a vector of eigenvalues.

All functions take eigenvalues ``lambda: (k,)`` (a tensor, array or sequence; any
order) of a curvature matrix, in loss units per squared parameter unit, and
return Python floats. When ``lambda`` holds only the top-``k`` eigenvalues (as
Lanczos gives), every metric describes that part of the spectrum only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ._validation import as_eigenvalue_vector, check_int, check_positive_float

__all__ = [
    "capacity_metrics",
    "condition_number",
    "effective_rank",
    "pac_bayes_flatness",
    "spectral_gap",
    "spectral_range",
    "spectral_trace",
]

EigenvalueLike = Tensor | Sequence[float]


def spectral_trace(eigenvalues: EigenvalueLike) -> float:
    """Return ``sum_i lambda_i`` (the trace, when all eigenvalues are given).

    Raises:
        TypeError: ``eigenvalues`` is not a tensor or sequence of numbers.
        ValueError: it is not 1-D, is empty, or has non-finite entries.
    """
    return float(as_eigenvalue_vector("eigenvalues", eigenvalues).sum())


def effective_rank(eigenvalues: EigenvalueLike) -> float:
    """Effective rank ``exp(H(p))`` (Roy & Vetterli 2007, EUSIPCO, Def. 1).

    ``p_i = |lambda_i| / sum_j |lambda_j|`` (the singular values of a symmetric
    matrix are ``|lambda_i|``) and ``H(p) = -sum_i p_i log p_i`` with
    ``0 log 0 = 0``. Lies in ``[1, k]``; ``0.0`` for an all-zero spectrum.

    Raises:
        TypeError / ValueError: as for :func:`spectral_trace`.
    """
    values = as_eigenvalue_vector("eigenvalues", eigenvalues).abs()
    total = float(values.sum())
    if total == 0.0:
        return 0.0
    p = values / total
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


def condition_number(eigenvalues: EigenvalueLike, *, rtol: float | None = None) -> float:
    """Return ``lambda_max / lambda_min`` over the eigenvalues ``> rtol * lambda_max``.

    Eigenvalues at or below the tolerance ``rtol * lambda_max`` count as zero
    (the pseudo-inverse convention), so a singular PSD matrix gets the condition
    number of its range. Default ``rtol = k * eps`` of the input dtype (float64
    for sequences), NumPy's ``matrix_rank`` convention; pass the solver
    tolerance (e.g. the Lanczos ``tol``) when eigenvalues are only that accurate.

    Returns:
        The ratio (``>= 1``), or ``nan`` when no eigenvalue is positive.

    Raises:
        TypeError / ValueError: as for :func:`spectral_trace`; ``rtol`` not a
            finite number ``>= 0``.
    """
    dtype = eigenvalues.dtype if isinstance(eigenvalues, Tensor) else torch.float64
    values = as_eigenvalue_vector("eigenvalues", eigenvalues)
    if rtol is None:
        eps = torch.finfo(dtype if dtype.is_floating_point else torch.float64).eps
        rtol = values.numel() * eps
    rtol = check_positive_float("rtol", rtol, allow_zero=True)
    top = float(values.max())
    if top <= 0:
        return math.nan
    kept = values[values > rtol * top]
    return top / float(kept.min())


def spectral_gap(eigenvalues: EigenvalueLike, *, relative: bool = False) -> float:
    """Return ``lambda_1 - lambda_2`` (two largest), or ``(lambda_1 - lambda_2) / |lambda_1|``.

    Returns:
        The gap (``>= 0``), or ``nan`` for fewer than two eigenvalues (or a
        relative gap with ``lambda_1 = 0``).

    Raises:
        TypeError / ValueError: as for :func:`spectral_trace`; ``relative`` not a bool.
    """
    if not isinstance(relative, bool):
        raise TypeError(f"relative must be True or False; got {relative!r}")
    values = torch.sort(as_eigenvalue_vector("eigenvalues", eigenvalues), descending=True).values
    if values.numel() < 2:
        return math.nan
    gap = float(values[0] - values[1])
    if not relative:
        return gap
    return gap / abs(float(values[0])) if float(values[0]) != 0 else math.nan


def spectral_range(eigenvalues: EigenvalueLike) -> float:
    """Return ``max_i lambda_i - min_i lambda_i``.

    Raises:
        TypeError / ValueError: as for :func:`spectral_trace`.
    """
    values = as_eigenvalue_vector("eigenvalues", eigenvalues)
    return float(values.max() - values.min())


def pac_bayes_flatness(eigenvalues: EigenvalueLike, *, sigma: float, num_samples: int = 1) -> float:
    """PAC-Bayes flatness (curvature) term ``0.5 * sum_i log(1 + N sigma^2 lambda_i)``.

    Derivation: take the prior ``P = N(theta_0, sigma^2 I)`` and a Gaussian
    posterior ``Q = N(theta, Sigma)`` around the trained weights, and the local
    quadratic model ``N L(theta + u) ~ N L(theta) + (N/2) u^T A u`` of the summed
    loss over ``N`` training samples (``A``: the mean-loss Hessian, or its PSD
    GGN / Fisher surrogate). Minimizing ``E_Q[N L] + KL(Q || P)`` over ``Sigma``
    gives ``Sigma^{-1} = N A + I / sigma^2`` and the optimum

        N L(theta) + ||theta - theta_0||^2 / (2 sigma^2) + 0.5 sum_i log(1 + N sigma^2 lambda_i),

    the Laplace / Occam-factor form of the PAC-Bayes bound (MacKay 1992;
    Dziugaite & Roy 2017, UAI, Sec. 4 optimize the same Gaussian bound
    numerically; Jiang et al. 2020, ICLR, "Fantastic generalization measures",
    Sec. C, rank such "pac-bayes flatness" terms). This function returns the
    last, curvature-dependent term, in nats: larger means sharper. Eigenvalues
    below 0 (possible for a Hessian) are clipped to 0, where the quadratic model
    has no minimum. Over only the top-``k`` eigenvalues the value is a lower
    bound of the full sum (every term is ``>= 0``).

    Args:
        eigenvalues: ``(k,)`` curvature eigenvalues of the mean loss.
        sigma: prior standard deviation (parameter units), ``> 0``.
        num_samples: ``N``, training samples (or tokens) behind the mean loss.

    Returns:
        ``0.5 * sum_i log1p(N sigma^2 max(lambda_i, 0))`` in nats.

    Raises:
        TypeError / ValueError: as for :func:`spectral_trace`; ``sigma <= 0``;
            ``num_samples < 1``.
    """
    values = as_eigenvalue_vector("eigenvalues", eigenvalues).clamp_min(0.0)
    sigma = check_positive_float("sigma", sigma)
    num_samples = check_int("num_samples", num_samples)
    return float(0.5 * torch.log1p(num_samples * sigma**2 * values).sum())


def capacity_metrics(
    eigenvalues: EigenvalueLike,
    *,
    sigma: float | None = None,
    num_samples: int = 1,
    rtol: float | None = None,
) -> dict[str, float]:
    """Return every metric of this module in one dict.

    Keys: ``trace``, ``effective_rank``, ``condition_number``, ``spectral_gap``,
    ``spectral_range``, ``max_eigenvalue``, ``min_eigenvalue``, and
    ``pac_bayes_flatness`` when ``sigma`` is given.

    Args:
        eigenvalues: ``(k,)`` eigenvalues.
        sigma, num_samples: see :func:`pac_bayes_flatness`.
        rtol: see :func:`condition_number`.

    Raises:
        TypeError / ValueError: as for the individual metrics.
    """
    values = as_eigenvalue_vector("eigenvalues", eigenvalues)
    metrics = {
        "trace": spectral_trace(values),
        "effective_rank": effective_rank(values),
        "condition_number": condition_number(eigenvalues if rtol is None else values, rtol=rtol),
        "spectral_gap": spectral_gap(values),
        "spectral_range": spectral_range(values),
        "max_eigenvalue": float(values.max()),
        "min_eigenvalue": float(values.min()),
    }
    if sigma is not None:
        metrics["pac_bayes_flatness"] = pac_bayes_flatness(
            values, sigma=sigma, num_samples=num_samples
        )
    return metrics
