"""Inverse policies as pure functions: no module, hook or rank knowledge.

Eig policy (Martens & Grosse 2015; George et al. 2018 for the eigenbasis view):
with ``A = Q_A diag(s_A) Q_A^T`` (d, d) and ``G = Q_G diag(s_G) Q_G^T`` (o, o), a
gradient ``V`` (o, d) is preconditioned as

    exact damping:     Q_G [ (Q_G^T V Q_A) / (s_G s_A^T + lambda) ] Q_A^T
                       = mat( (A (x) G + lambda I)^{-1} vec(V) )
    factored damping:  Q_G [ (Q_G^T V Q_A) / ((s_G + lambda_G)(s_A + lambda_A)^T) ] Q_A^T
                       = (G + lambda_G I)^{-1} V (A + lambda_A I)^{-1}

where the factored (Tikhonov, "pi-split") damping of Martens & Grosse 2015, Sec. 6.3 is
``pi = sqrt( (tr(A)/d) / (tr(G)/o) )``, ``lambda_A = pi sqrt(lambda)``,
``lambda_G = sqrt(lambda) / pi``. A diagonal A (Embedding) has ``Q_A = I``.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

__all__ = ["DAMPING_MODES", "eigh_psd", "factored_damping", "precondition_eig"]

DAMPING_MODES = ("exact", "factored")

log = logging.getLogger("kfac_optim")


def eigh_psd(matrix: Tensor, *, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor] | None:
    """Eigendecomposition of a symmetric PSD factor, robust to solver failure.

    Solves in ``dtype`` (default: the matrix's), retries in float64 if that fails or
    gives non-finite values, and clamps the tiny negative eigenvalues round-off
    produces to 0.

    Args:
        matrix: ``(n, n)`` symmetric.
        dtype: solver dtype; results are returned in ``matrix.dtype``.

    Returns:
        ``(s, Q)``: eigenvalues ``(n,)`` ascending and eigenvectors ``(n, n)``, or None
        when the solver fails in float64 too (the caller keeps its last good result).
    """
    out_dtype = matrix.dtype
    tries = [dtype or out_dtype]
    if tries[0] != torch.float64:
        tries.append(torch.float64)
    for solve_dtype in tries:
        try:
            s, q = torch.linalg.eigh(matrix.to(solve_dtype))
        except RuntimeError as err:  # torch raises LinAlgError (a RuntimeError)
            log.warning("eigh failed in %s: %s", solve_dtype, err)
            continue
        if bool(torch.isfinite(s).all()) and bool(torch.isfinite(q).all()):
            return s.clamp(min=0).to(out_dtype), q.to(out_dtype)
    return None


def factored_damping(
    trace_a: float | Tensor, dim_a: int, trace_g: float | Tensor, dim_g: int, damping: float
) -> tuple[Tensor | float, Tensor | float]:
    """Tikhonov pi-split (Martens & Grosse 2015, Sec. 6.3): ``(lambda_A, lambda_G)``.

    ``pi = sqrt((tr(A)/dim_a) / (tr(G)/dim_g))`` (1 when either trace is 0), so that
    ``lambda_A lambda_G = lambda``.
    """
    trace_a = torch.as_tensor(trace_a)
    trace_g = torch.as_tensor(trace_g)
    ratio = (trace_a / dim_a) / (trace_g / dim_g)
    pi = torch.where((trace_a > 0) & (trace_g > 0), ratio, torch.ones_like(ratio)).sqrt()
    root = math.sqrt(damping)
    return pi * root, root / pi


def precondition_eig(
    grad: Tensor,
    q_g: Tensor,
    s_g: Tensor,
    q_a: Tensor | None,
    s_a: Tensor,
    damping: float,
    damping_mode: str = "exact",
) -> Tensor:
    """Precondition one layer's gradient with eigendecomposed Kronecker factors.

    Args:
        grad: ``V`` of shape ``(o, d)`` (bias as the last column).
        q_g, s_g: eigenvectors ``(o, o)`` and eigenvalues ``(o,)`` of G.
        q_a, s_a: eigenvectors ``(d, d)`` and eigenvalues ``(d,)`` of A; ``q_a=None``
            when A is diagonal (``s_a`` is then the diagonal).
        damping: ``lambda`` >= 0.
        damping_mode: ``"exact"`` or ``"factored"`` (module docstring formulas).

    Returns:
        ``(o, d)`` preconditioned gradient, in ``grad``'s dtype.

    Raises:
        ValueError: unknown ``damping_mode``.
    """
    dtype = s_g.dtype
    v = grad.to(dtype)
    v = q_g.t() @ v
    if q_a is not None:
        v = v @ q_a
    if damping_mode == "exact":
        denom = torch.outer(s_g, s_a) + damping
    elif damping_mode == "factored":
        lam_a, lam_g = factored_damping(s_a.sum(), s_a.numel(), s_g.sum(), s_g.numel(), damping)
        denom = torch.outer(s_g + lam_g, s_a + lam_a)
    else:
        raise ValueError(f"damping_mode={damping_mode!r}; accepted: {DAMPING_MODES}")
    v = v / denom
    if q_a is not None:
        v = v @ q_a.t()
    return (q_g @ v).to(grad.dtype)
