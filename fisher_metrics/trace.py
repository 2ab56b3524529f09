"""Stochastic trace estimation: Hutchinson, Hutch++ and XTrace.

Hutchinson (1989): for probes ``z`` with ``E[z z^T] = I`` (Rademacher or
standard Gaussian), ``E[z^T A z] = tr(A)``; the estimate is the mean of ``m``
quadratic forms, with variance ``2 (||A||_F^2 - sum_i A_ii^2) / m`` for
Rademacher and ``2 ||A||_F^2 / m`` for Gaussian probes (Avron & Toledo 2011).

Hutch++ (Meyer, Musco, Musco & Woodruff 2021, SOSA, Alg. 1): with ``m``
products, sketch ``Q = orth(A S)`` from ``m/3`` probes, take ``tr(Q^T A Q)``
exactly and estimate the rest, ``tr((I - QQ^T) A (I - QQ^T))``, by Hutchinson
with ``m/3`` probes projected off ``Q``. For PSD ``A`` the relative error falls
as ``O(1/m)`` instead of ``O(1/sqrt(m))``, which pays off when the spectrum is
dominated by a few large eigenvalues (as curvature spectra are).

XTrace (Epperly, Tropp & Webber 2024, "XTrace: making the most of every sample
in stochastic trace estimation", SIAM J. Matrix Anal. Appl. 45(1), 2024;
arXiv 2301.07825): the exchangeable version of Hutch++. With ``m/2`` probes
``Omega = [w_1 .. w_{m/2}]`` and ``Y = A Omega``, every probe takes its turn as
the Hutchinson probe while the others build the low-rank basis,

    tr_i = tr(Q_(i)^T A Q_(i)) + w_i^T (I - Q_(i) Q_(i)^T) A (I - Q_(i) Q_(i)^T) w_i,
    Q_(i) = orth(Y without column i),

each unbiased since ``w_i`` is independent of ``Q_(i)``; the estimate is their
mean. All ``Q_(i)`` come from one QR ``Y = QR`` by downdating,
``Q_(i) Q_(i)^T = Q (I - s_i s_i^T) Q^T`` with ``s_i`` the normalized ``i``-th
column of ``R^{-T}``, so that ``m/2`` more products ``A Q`` suffice (``m`` in
all). It is exact when ``rank(A) < m/2`` and its error falls as ``O(1/m)`` on
fast-decaying spectra, below Hutch++'s at equal products.

Products come in blocks (``operator.matmat``), which curvature operators
vectorize, and Hutchinson's quadratic forms ``z^T A z`` (all of Hutchinson, the
``tr(Q^T A Q)`` and residual parts of Hutch++) come from
``operator.quadratic_forms``, which for the GGN and the Fisher needs forward passes
only (:mod:`fisher_metrics.operators`). A "product" in the budgets below is one
product or one quadratic form. Standard errors are the sample
standard deviation of the stochastic part over ``sqrt(#probes)``; confidence
intervals use the normal approximation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist

import torch
from torch import Tensor

from ._validation import check_choice, check_int, check_seed
from .operators import LinearOperator, as_operator

DISTRIBUTIONS = ("rademacher", "gaussian")

__all__ = ["DISTRIBUTIONS", "TraceEstimate", "hutch_plus_plus", "hutchinson", "xtrace"]


@dataclass
class TraceEstimate:
    """A stochastic trace estimate.

    Attributes:
        estimate: the trace estimate (units of the operator's eigenvalues).
        std_error: standard error of ``estimate`` (sample std / sqrt(#probes)
            of the stochastic part).
        confidence_interval: ``(low, high)`` normal-approximation interval.
        confidence: its coverage level, e.g. 0.95.
        num_matvecs: operator products used.
        samples: ``(#probes,)`` the quadratic forms ``z^T A z`` averaged by the
            stochastic part (float64); for XTrace the exchangeable estimates ``tr_i``.
        low_rank_trace: ``tr(Q^T A Q)`` for Hutch++ and XTrace (``Q`` from all
            probes), ``None`` for Hutchinson.
        method: ``"hutchinson"``, ``"hutch++"`` or ``"xtrace"``.
    """

    estimate: float
    std_error: float
    confidence_interval: tuple[float, float]
    confidence: float
    num_matvecs: int
    samples: Tensor
    low_rank_trace: float | None
    method: str


def _probes(n: int, count: int, distribution: str, generator: torch.Generator) -> Tensor:
    if distribution == "rademacher":
        signs = torch.randint(0, 2, (n, count), generator=generator, dtype=torch.int64)
        return (2.0 * signs - 1.0).to(torch.float64)
    return torch.randn(n, count, generator=generator, dtype=torch.float64)


def _confidence(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number in (0, 1); got {value!r}")
    return float(value)


def _probe_settings(
    distribution: object, confidence: object, seed: object
) -> tuple[str, float, torch.Generator]:
    """Checked ``distribution`` and ``confidence``, and the CPU generator seeded with ``seed``."""
    distribution = check_choice("distribution", distribution, DISTRIBUTIONS)
    confidence = _confidence("confidence", confidence)
    return distribution, confidence, torch.Generator().manual_seed(check_seed("seed", seed))


def _finish(
    base: float, samples: Tensor, confidence: float, num_matvecs: int, low: float | None, method
) -> TraceEstimate:
    estimate = base + float(samples.mean())
    std_error = float(samples.std(unbiased=True)) / math.sqrt(samples.numel())
    half = NormalDist().inv_cdf(0.5 + confidence / 2) * std_error
    return TraceEstimate(
        estimate=estimate,
        std_error=std_error,
        confidence_interval=(estimate - half, estimate + half),
        confidence=confidence,
        num_matvecs=num_matvecs,
        samples=samples,
        low_rank_trace=low,
        method=method,
    )


def _products(op: LinearOperator, Z: Tensor) -> Tensor:
    """``A Z`` as one block product, returned on the CPU in float64."""
    return op.matmat(Z.to(op.device, op.dtype)).to("cpu", torch.float64)


def _quadratic_forms(op: LinearOperator, Z: Tensor) -> Tensor:
    """``z_j^T A z_j`` of the columns of ``Z`` (one block), on the CPU in float64."""
    return op.quadratic_forms(Z.to(op.device, op.dtype)).to("cpu", torch.float64)


def hutchinson(
    operator: LinearOperator | Tensor | Callable[[Tensor], Tensor],
    *,
    num_samples: int = 100,
    distribution: str = "rademacher",
    seed: int = 0,
    confidence: float = 0.95,
    n: int | None = None,
) -> TraceEstimate:
    """Hutchinson's estimate ``tr(A) ~ (1/m) sum_j z_j^T A z_j``.

    Args:
        operator: a :class:`~fisher_metrics.operators.LinearOperator`, an
            ``(n, n)`` tensor, or a callable matvec (give ``n``).
        num_samples: ``m >= 2`` probes (one product each).
        distribution: ``"rademacher"`` (default; lower variance) or ``"gaussian"``.
        seed: seed of the CPU generator drawing the probes.
        confidence: coverage of the normal-approximation interval, in (0, 1).
        n: vector length, required for a callable.

    Returns:
        A :class:`TraceEstimate` with ``num_matvecs = m``.

    Raises:
        TypeError / ValueError: bad ``operator``, ``num_samples < 2``, unknown
            ``distribution``, ``confidence`` outside (0, 1), negative ``seed``.
    """
    op = as_operator(operator, n=n)
    num_samples = check_int("num_samples", num_samples, minimum=2)
    distribution, confidence, generator = _probe_settings(distribution, confidence, seed)
    Z = _probes(op.shape[0], num_samples, distribution, generator)
    samples = _quadratic_forms(op, Z)
    return _finish(0.0, samples, confidence, num_samples, None, "hutchinson")


def hutch_plus_plus(
    operator: LinearOperator | Tensor | Callable[[Tensor], Tensor],
    *,
    num_matvecs: int = 102,
    distribution: str = "rademacher",
    seed: int = 0,
    confidence: float = 0.95,
    n: int | None = None,
) -> TraceEstimate:
    """Hutch++ estimate ``tr(Q^T A Q) + (3/m) tr(G^T (I - QQ^T) A (I - QQ^T) G)``.

    ``Q = orth(A S)``; ``S`` and ``G`` are ``n x (m/3)`` probe matrices
    (Meyer et al. 2021, Alg. 1). The standard error covers the stochastic
    (residual) part only; the low-rank part is exact given ``Q``.

    Args:
        operator: see :func:`hutchinson`.
        num_matvecs: product budget ``m >= 6``; ``3 * (m // 3)`` are used.
        distribution: ``"rademacher"`` or ``"gaussian"`` probes for ``S`` and ``G``.
        seed: seed of the CPU generator drawing ``S`` and ``G``.
        confidence: coverage of the normal-approximation interval, in (0, 1).
        n: vector length, required for a callable.

    Returns:
        A :class:`TraceEstimate`; ``low_rank_trace`` holds ``tr(Q^T A Q)``.

    Raises:
        TypeError / ValueError: as for :func:`hutchinson`, and ``num_matvecs < 6``.
    """
    op = as_operator(operator, n=n)
    num_matvecs = check_int("num_matvecs", num_matvecs, minimum=6)
    distribution, confidence, generator = _probe_settings(distribution, confidence, seed)
    size, third = op.shape[0], num_matvecs // 3
    S = _probes(size, third, distribution, generator)
    G = _probes(size, third, distribution, generator)
    Y = _products(op, S)
    Q = torch.linalg.qr(Y, mode="reduced").Q
    forms = _quadratic_forms(op, torch.cat([Q, G - Q @ (Q.T @ G)], dim=1))
    low = float(forms[:third].sum())
    return _finish(low, forms[third:], confidence, 3 * third, low, "hutch++")


def xtrace(
    operator: LinearOperator | Tensor | Callable[[Tensor], Tensor],
    *,
    num_matvecs: int = 100,
    distribution: str = "rademacher",
    seed: int = 0,
    confidence: float = 0.95,
    n: int | None = None,
) -> TraceEstimate:
    """XTrace estimate: the mean of the exchangeable Hutch++ estimates ``tr_i``.

    Epperly, Tropp & Webber 2024 (SIAM J. Matrix Anal. Appl. 45(1)), with
    Rademacher or Gaussian test vectors (the paper's extra normalization for
    test vectors on the sphere is not used): see the module docstring for ``tr_i``. With
    ``W = Q^T Omega``, ``H = Q^T A Q``, ``T = (A Q)^T Omega`` and
    ``a_i = W e_i - (s_i^T W e_i) s_i``,

        tr_i = tr(H) - s_i^T H s_i + (W^T R)_ii - 2 T_i . a_i + a_i^T H a_i

    (``(W^T R)_ii = w_i^T A w_i``), computed for all ``i`` at ``O(n m^2)`` cost.
    The standard error is the sample standard deviation of the ``tr_i`` over
    ``sqrt(m/2)`` (the paper's error estimate; the ``tr_i`` are not independent,
    so read it as a guide, not a guarantee).

    Args:
        operator: see :func:`hutchinson`.
        num_matvecs: product budget ``m >= 4``; ``2 * (m // 2)`` are used
            (``m // 2`` test vectors), at most ``n`` of them meaningful.
        distribution: ``"rademacher"`` or ``"gaussian"`` test vectors.
        seed: seed of the CPU generator drawing the test vectors.
        confidence: coverage of the normal-approximation interval, in (0, 1).
        n: vector length, required for a callable.

    Returns:
        A :class:`TraceEstimate` (``method="xtrace"``); ``samples`` holds the
        ``m // 2`` values ``tr_i`` and ``low_rank_trace`` ``tr(Q^T A Q)``.

    Raises:
        TypeError / ValueError: as for :func:`hutchinson`; ``num_matvecs < 4``.
    """
    op = as_operator(operator, n=n)
    num_matvecs = check_int("num_matvecs", num_matvecs, minimum=4)
    distribution, confidence, generator = _probe_settings(distribution, confidence, seed)
    half = num_matvecs // 2
    Omega = _probes(op.shape[0], half, distribution, generator)
    Y = _products(op, Omega)
    Q, R = torch.linalg.qr(Y, mode="reduced")
    Z = _products(op, Q)
    H = Q.T @ Z
    H = 0.5 * (H + H.T)
    W = Q.T @ Omega
    T = Z.T @ Omega
    # s_i: normalized columns of R^{-T}; Q (I - s_i s_i^T) Q^T projects on orth(Y_{-i}).
    S = torch.linalg.solve_triangular(R.T, torch.eye(half, dtype=R.dtype), upper=False)
    S = S / S.norm(dim=0, keepdim=True)
    a = W - S * (S * W).sum(dim=0, keepdim=True)
    samples = (
        torch.trace(H)
        - (S * (H @ S)).sum(dim=0)
        + (W * R).sum(dim=0)
        - 2 * (T * a).sum(dim=0)
        + (a * (H @ a)).sum(dim=0)
    )
    return _finish(0.0, samples, confidence, 2 * half, float(torch.trace(H)), "xtrace")
