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

Woodbury policy (G side, docs/design.md): ``G = U U^T`` with ``U`` (o, k), k << o.

- Exact damping uses G's nonzero eigenpairs from the k x k Gram ``U^T U = W diag(s) W^T``:
  ``Q_G = U W diag(s)^{-1/2}`` (o, r), a *thin* eigenbasis; ``precondition_eig`` adds the
  complement ``(I - Q_G Q_G^T) V``, on which G's eigenvalue is 0. Cost O(o k^2 + k^3)
  instead of O(o^3).
- Factored damping solves ``(G + mu I)^{-1} V = (1/mu) [V - U (mu I + U^T U)^{-1} U^T V]``
  with a Cholesky factor of the k x k system (jitter backoff, pseudo-inverse fallback).
- Row-sharded (``U`` split by rows over ranks, ``woodbury_reduction="row_sharded"``): only
  k x k and k x d quantities are global, ``U^T U = sum_r U^(r)T U^(r)`` and
  ``U^T V = sum_r U^(r)T V^(r)``. Factored damping is the solve above with ``U^T V`` summed
  by a caller-given ``reduce``; exact damping is ``precondition_woodbury_exact``: one
  Woodbury solve per eigenvalue of A through the Gram's eigendecomposition, with no thin
  eigenbasis (which would need the whole U, or a division by the Gram's eigenvalues).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "DAMPING_MODES", "eigh_psd", "eigh_psd_many", "lowrank_eigh", "clip_condition",
    "factored_damping",
    "precondition_eig", "damped_inverses", "robust_cholesky", "woodbury_solve",
    "precondition_woodbury_factored", "precondition_woodbury_exact",
]

DAMPING_MODES = ("exact", "factored")

log = logging.getLogger("kfac_optim")


def eigh_psd(matrix: Tensor, *, dtype: torch.dtype | None = None,
             device: torch.device | None = None) -> tuple[Tensor, Tensor] | None:
    """Eigendecomposition of a symmetric PSD factor, robust to solver failure.

    Solves in ``dtype`` (default: the matrix's) on ``device`` (default: the matrix's),
    retries in float64 if that fails or gives non-finite values, and clamps the tiny
    negative eigenvalues round-off produces to 0.

    Args:
        matrix: ``(n, n)`` symmetric.
        dtype: solver dtype; results are returned in ``matrix.dtype``.
        device: solver device; results are returned on ``matrix.device``.

    Returns:
        ``(s, Q)``: eigenvalues ``(n,)`` ascending and eigenvectors ``(n, n)``, or None
        when the solver fails in float64 too (the caller keeps its last good result).
    """
    out_dtype, out_device = matrix.dtype, matrix.device
    matrix = matrix.to(device or out_device)
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
            return s.clamp(min=0).to(out_device, out_dtype), q.to(out_device, out_dtype)
    return None


def eigh_psd_many(matrices: Sequence[Tensor], *, dtype: torch.dtype | None = None,
                  device: torch.device | None = None) -> list[tuple[Tensor, Tensor] | None]:
    """``eigh_psd`` of every matrix, with one batched ``torch.linalg.eigh`` call per group
    of matrices of equal shape, dtype and device.

    A matrix holding NaN or Inf, and every member of a group whose batched call raises or
    returns non-finite values for it, goes through ``eigh_psd`` alone (float64 retry, None
    on failure), so a bad factor never changes the others' results.

    Args:
        matrices: ``(n_i, n_i)`` symmetric PSD matrices.
        dtype, device: as in ``eigh_psd``.

    Returns:
        ``eigh_psd``'s result for each matrix, in order.
    """
    out: list[tuple[Tensor, Tensor] | None] = [None] * len(matrices)
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(matrices):
        groups.setdefault((tuple(m.shape), m.dtype, m.device), []).append(i)
    for (_, out_dtype, out_device), members in groups.items():
        alone = members
        if len(members) > 1:
            stack = torch.stack([matrices[i] for i in members]).to(device or out_device)
            finite = torch.isfinite(stack).flatten(1).all(1).tolist()
            batch = [i for i, ok in zip(members, finite, strict=True) if ok]
            alone = [i for i, ok in zip(members, finite, strict=True) if not ok]
            solved = None
            if len(batch) > 1:
                try:
                    solved = torch.linalg.eigh(stack[torch.tensor(finite)].to(dtype or out_dtype))
                except RuntimeError as err:  # LinAlgError: solve them one by one
                    log.debug("batched eigh of %d matrices failed: %s", len(batch), err)
            if solved is None:
                alone = members
            else:
                s, q = solved
                good = (torch.isfinite(s).all(1) & torch.isfinite(q).flatten(1).all(1)).tolist()
                for j, i in enumerate(batch):
                    if good[j]:
                        # copies: a view would keep (and save) the whole batch
                        out[i] = (s[j].clamp(min=0).to(out_device, out_dtype),
                                  q[j].to(out_device, out_dtype, copy=True))
                    else:
                        alone.append(i)
        for i in alone:
            out[i] = eigh_psd(matrices[i], dtype=dtype, device=device)
    return out


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


def lowrank_eigh(u: Tensor, *, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> tuple[Tensor, Tensor] | None:
    """Eigenpairs of ``G = U U^T`` on the range of ``U``, without forming G.

    ``U = Q_U R`` (reduced QR), ``R R^T = W diag(s) W^T``, so ``G = (Q_U W) diag(s)
    (Q_U W)^T``. Unlike ``U W diag(s)^{-1/2}`` from the Gram ``U^T U``, ``Q_G = Q_U W`` is
    orthonormal to working precision by construction (measured in float32 at k = o: the
    Gram route left ``||Q^T Q - I|| = 1.5e-3``, amplified by 1/lambda on the complement),
    and zero eigenvalues need no special case. Cost O(o k^2 + k^3).

    Args:
        u: ``(o, k)``.
        dtype, device: solver dtype and device, as in ``eigh_psd``.

    Returns:
        ``(s, Q)``: ``(r,)`` eigenvalues and ``(o, r)`` orthonormal eigenvectors,
        ``r = min(o, k)``, or None if the solver fails.
    """
    out_dtype, out_device = u.dtype, u.device
    work = u.to(device or out_device, dtype or out_dtype)
    try:
        q_u, r = torch.linalg.qr(work, mode="reduced")
    except RuntimeError as err:
        log.warning("QR of the low-rank factor failed: %s", err)
        return None
    eig = eigh_psd(r @ r.t(), dtype=dtype)
    if eig is None:
        return None
    s, w = eig
    return s.to(out_device, out_dtype), (q_u @ w.to(q_u.dtype)).to(out_device, out_dtype)


def clip_condition(s: Tensor, max_condition_number: float | None) -> tuple[Tensor, int]:
    """Raise eigenvalues below ``max(s) / kappa`` to it; returns ``(s, number clipped)``."""
    if max_condition_number is None or s.numel() == 0:
        return s, 0
    floor = s.max() / max_condition_number
    clipped = int((s < floor).sum())
    return s.clamp(min=floor), clipped


def precondition_eig(
    grad: Tensor,
    q_g: Tensor,
    s_g: Tensor,
    q_a: Tensor | None,
    s_a: Tensor,
    damping: float,
    damping_mode: str = "exact",
    s_g_rest: float | Tensor = 0.0,
    eigenvalues: Tensor | None = None,
) -> Tensor:
    """Precondition one layer's gradient with eigendecomposed Kronecker factors.

    Args:
        grad: ``V`` of shape ``(o, d)`` (bias as the last column).
        q_g, s_g: eigenvectors ``(o, r)`` and eigenvalues ``(r,)`` of G; ``r < o`` is a
            thin basis (Woodbury), G's eigenvalue on the complement being ``s_g_rest``.
        q_a, s_a: eigenvectors ``(d, d)`` and eigenvalues ``(d,)`` of A; ``q_a=None``
            when A is diagonal (``s_a`` is then the diagonal).
        damping: ``lambda`` >= 0.
        damping_mode: ``"exact"`` or ``"factored"`` (module docstring formulas).
        s_g_rest: G's eigenvalue on the complement of ``q_g`` (0 for ``U U^T``).
        eigenvalues: ``(o, d)`` corrected eigenvalues replacing ``s_g s_a^T`` (EKFAC,
            George et al. 2018; exact damping, full ``q_g``).

    Returns:
        ``(o, d)`` preconditioned gradient, in ``grad``'s dtype.

    Raises:
        ValueError: unknown ``damping_mode``.
    """
    dtype = s_g.dtype
    o = q_g.shape[0]
    va = grad.to(dtype)
    if q_a is not None:
        va = va @ q_a
    proj = q_g.t() @ va
    if eigenvalues is not None:
        if damping_mode != "exact" or q_g.shape[1] < o:
            raise ValueError("eigenvalues (EKFAC) need damping_mode='exact' and a full q_g")
        denom = eigenvalues.to(dtype) + damping
        rest = damping
    elif damping_mode == "exact":
        denom = torch.outer(s_g, s_a) + damping
        rest = s_a * s_g_rest + damping
    elif damping_mode == "factored":
        trace_g = s_g.sum() + (o - s_g.numel()) * s_g_rest
        lam_a, lam_g = factored_damping(s_a.sum(), s_a.numel(), trace_g, o, damping)
        denom = torch.outer(s_g + lam_g, s_a + lam_a)
        rest = (s_a + lam_a) * (s_g_rest + lam_g)
    else:
        raise ValueError(f"damping_mode={damping_mode!r}; accepted: {DAMPING_MODES}")
    if q_g.shape[1] < o:
        # Q_G (P / D) + (V - Q_G P) / rest = Q_G (P / D - P / rest) + V / rest: 2 products
        out = q_g @ (proj / denom - proj / rest) + va / rest
    else:
        out = q_g @ (proj / denom)
    if q_a is not None:
        out = out @ q_a.t()
    return out.to(grad.dtype)


def damped_inverses(
    q_g: Tensor, s_g: Tensor, q_a: Tensor | None, s_a: Tensor, damping: float
) -> tuple[Tensor, Tensor]:
    """Explicit ``(G + lambda_G I)^{-1}`` (o, o) and ``(A + lambda_A I)^{-1}`` (d, d), or its
    diagonal (d,) when ``q_a`` is None, for factored damping (pi-split as in
    ``factored_damping``). Preconditioning is then 2 products per step instead of the 4 of
    ``precondition_eig``; the inverses are rebuilt when the damping changes.
    """
    lam_a, lam_g = factored_damping(s_a.sum(), s_a.numel(), s_g.sum(), s_g.numel(), damping)
    g_inv = (q_g / (s_g + lam_g)) @ q_g.t()
    a_inv = 1.0 / (s_a + lam_a) if q_a is None else (q_a / (s_a + lam_a)) @ q_a.t()
    return g_inv, a_inv


def robust_cholesky(
    matrix: Tensor, *, max_jitter: float = 1e-2
) -> tuple[str, Tensor, float]:
    """Cholesky factor of a symmetric PSD matrix with jitter backoff.

    Tries ``matrix + j I`` for ``j`` in ``0, eps*m, 10 eps*m, ...`` up to
    ``max_jitter * m`` (``m`` = mean diagonal, ``eps`` = the dtype's machine epsilon); if
    every try fails, falls back to the pseudo-inverse.

    Args:
        matrix: ``(k, k)`` symmetric PSD.
        max_jitter: cap on the jitter, relative to the mean diagonal.

    Returns:
        ``(method, factor, jitter)``: ``("cholesky", L, j)`` with ``L L^T = matrix + j I``,
        or ``("pinv", matrix^+, nan)``.
    """
    k = matrix.shape[0]
    scale = float(matrix.diagonal().mean().clamp(min=torch.finfo(matrix.dtype).tiny))
    eps = torch.finfo(matrix.dtype).eps
    jitter, eye = 0.0, torch.eye(k, dtype=matrix.dtype, device=matrix.device)
    while jitter <= max_jitter * scale:
        chol, info = torch.linalg.cholesky_ex(matrix + jitter * eye)
        if int(info) == 0:
            if jitter > 0:
                log.info("Cholesky needed jitter %.3g (relative %.3g)", jitter, jitter / scale)
            return "cholesky", chol, jitter
        jitter = eps * scale if jitter == 0 else jitter * 10
    log.warning("Cholesky failed up to jitter %.3g; using the pseudo-inverse", jitter / 10)
    return "pinv", torch.linalg.pinv(matrix, hermitian=True), float("nan")


Reduce = Callable[[Tensor], Tensor]


def woodbury_solve(u: Tensor, solver: tuple[str, Tensor, float], v: Tensor, mu: float | Tensor,
                   reduce: Reduce | None = None) -> Tensor:
    """``(U U^T + mu I)^{-1} V = (1/mu) [V - U (mu I + U^T U)^{-1} U^T V]``.

    Args:
        u: ``(o, k)``; v: ``(o, d)``; mu > 0.
        solver: ``robust_cholesky(mu I + U^T U)`` (of the whole U's Gram).
        reduce: when ``u`` and ``v`` are the same row slice of the whole U and V, sums the
            ``(k, d)`` partial products ``U^(r)T V^(r)`` over the slices (an all-reduce);
            the result is then that row slice. None: ``u`` and ``v`` hold every row.
    """
    method, factor, _ = solver
    rhs = u.t() @ v
    if reduce is not None:
        rhs = reduce(rhs)
    inner = torch.cholesky_solve(rhs, factor) if method == "cholesky" else factor @ rhs
    return (v - u @ inner) / mu


def precondition_woodbury_factored(
    grad: Tensor, u: Tensor, solver: tuple[str, Tensor, float], lam_g: float | Tensor,
    q_a: Tensor | None, s_a: Tensor, lam_a: float | Tensor, reduce: Reduce | None = None,
) -> Tensor:
    """``(G + lambda_G I)^{-1} V (A + lambda_A I)^{-1}`` with ``G = U U^T`` (Woodbury) and
    ``A = Q_A diag(s_A) Q_A^T`` (or diagonal when ``q_a`` is None).

    Args:
        grad: ``(o, d)``; u: ``(o, k)``; solver: ``robust_cholesky(lambda_G I + U^T U)``.
        reduce: row-sharded ``grad`` and ``u`` (the same rows of each), as in
            ``woodbury_solve``; the result is then those rows.
    """
    left = woodbury_solve(u, solver, grad.to(u.dtype), lam_g, reduce)
    if q_a is None:
        return (left / (s_a + lam_a)).to(grad.dtype)
    return (((left @ q_a) / (s_a + lam_a)) @ q_a.t()).to(grad.dtype)


def precondition_woodbury_exact(
    grad: Tensor, u: Tensor, s: Tensor, w: Tensor, q_a: Tensor | None, s_a: Tensor,
    damping: float, s_g_rest: float | Tensor = 0.0, reduce: Reduce | None = None,
) -> Tensor:
    """``mat((A (x) G + lambda I)^{-1} vec(V))`` with ``G = U U^T`` known through the
    eigendecomposition of its Gram ``U^T U = W diag(s) W^T``, never a thin eigenbasis.

    In A's eigenbasis (``V' = V Q_A``) column j is one Woodbury solve,
    ``(s_Aj G + lambda I)^{-1} v'_j``. G's eigenpairs on the range of U are
    ``(s_i, U w_i / sqrt(s_i))``; with eigenvalues clipped to ``t_i = max(s_i, rest)`` and
    ``rest`` (``s_g_rest``, 0 without clipping) on the complement:

        out = V' / (rest s_A^T + lambda) + U W X,
        X_ij = -P_ij r_i s_Aj / ((t_i s_Aj + lambda) (rest s_Aj + lambda)),
        P = W^T U^T V',   r_i = (t_i - rest) / s_i  (0 where t_i = rest),

    then ``out Q_A^T``. ``r_i`` is 1 without clipping, so no division by a small ``s_i``
    appears (zero Gram eigenvalues, k > rank U, need no special case). Equal to
    ``precondition_eig`` with ``lowrank_eigh(U)`` (exact damping) to solver tolerance.
    Cost O(o k d + k^2 d + o d^2) per call.

    Args:
        grad: ``V`` ``(o, d)``; u: ``(o, k)``.
        s, w: ``(k,)`` eigenvalues (>= 0) and ``(k, k)`` eigenvectors of ``U^T U``.
        q_a, s_a: A's eigenvectors ``(d, d)`` (None: A diagonal) and eigenvalues ``(d,)``.
        damping: ``lambda`` >= 0.
        s_g_rest: G's eigenvalue on the complement of U's range, and the floor of ``s``
            (``max(s) / kappa`` under condition-number clipping).
        reduce: when ``grad`` and ``u`` are the same row slice of the whole V and U, sums
            the ``(k, d)`` partial products ``U^(r)T V'^(r)`` over slices (an all-reduce);
            the result is then that row slice.

    Returns:
        ``(o, d)`` (or the row slice), in ``grad``'s dtype.
    """
    dtype = u.dtype
    va = grad.to(dtype)
    if q_a is not None:
        va = va @ q_a
    p = u.t() @ va
    if reduce is not None:
        p = reduce(p)
    p = w.t() @ p
    rest = torch.as_tensor(s_g_rest, dtype=dtype, device=s.device)
    t = torch.maximum(s, rest)
    ratio = torch.where(t > rest, (t - rest) / torch.where(s > 0, s, 1.0), 0.0)
    lam_rest = s_a * rest + damping
    x = -p * ratio.unsqueeze(1) * s_a / ((torch.outer(t, s_a) + damping) * lam_rest)
    out = va / lam_rest + u @ (w @ x)
    if q_a is not None:
        out = out @ q_a.t()
    return out.to(grad.dtype)
