"""Lanczos eigenvalues and stochastic Lanczos quadrature (SLQ) for symmetric operators.

Lanczos (Golub & Van Loan, *Matrix Computations*, 4th ed., Alg. 10.1.1): from a
unit ``q_1``, ``A Q_m = Q_m T_m + beta_m q_{m+1} e_m^T`` with ``T_m`` tridiagonal
(``alpha`` on the diagonal, ``beta`` off it). The Ritz values ``theta_i`` (the
eigenvalues of ``T_m = Y diag(theta) Y^T``) approximate the extreme eigenvalues of
``A``, and the Ritz pair ``(theta_i, Q_m y_i)`` has residual norm

    ||A Q_m y_i - theta_i Q_m y_i|| = |beta_m e_m^T y_i|    (GvL Thm. 10.1.4)

while ``Q_m`` stays orthonormal; some eigenvalue of ``A`` lies within that
residual of ``theta_i``. In floating point ``Q_m`` loses orthogonality as Ritz
values converge and copies ("ghosts") of converged eigenvalues appear (Paige
1971). Reorthogonalization:

- ``"full"`` (default): Gram-Schmidt of every new vector against all previous
  ones, twice ("twice is enough"; Giraud et al. 2005). Cost ``O(n m)`` per step.
- ``"periodic"``: Simon's (1984) omega recurrence estimates ``q_{j+1}^T q_i``;
  when an estimate exceeds ``sqrt(eps)`` the new vector and the next one are
  reorthogonalized against all previous ones (Grcar 1981), which keeps
  semi-orthogonality and hence the Ritz values accurate.
- ``"none"``: no reorthogonalization (diagnostics only).

The Lanczos basis is stored (``n x m`` memory) for reorthogonalization and Ritz
vectors. Reported pairs are never ghosts: among the candidate Ritz pairs, two
whose Ritz vectors overlap by more than 0.5 in absolute cosine are copies of one
eigenvector and only the better-converged one is kept. Without full
reorthogonalization the true residuals ``||A u - theta u||`` are also computed
(one product per pair) and decide convergence. An invariant subspace (``beta``
below ``eps^(3/4) ||T||``) restarts the recurrence from a fresh random vector
orthogonal to the basis, so repeated eigenvalues are found with their
multiplicity.

SLQ (Ubaru, Chen & Saad 2017, SIAM J. Matrix Anal. Appl. 38(4)): for unit
Rademacher probes ``v_l``, the ``m``-step Lanczos Gauss quadrature
``v_l^T f(A) v_l ~ sum_k tau_lk^2 f(theta_lk)`` with ``tau_lk = e_1^T y_lk``
gives the spectral density estimate

    phi(t) = (1/n) sum_i delta(t - lambda_i) ~ (1/n_v) sum_l sum_k tau_lk^2 delta(t - theta_lk),

exact for polynomials of degree ``<= 2m - 1`` per probe (and unbiased over
probes since ``E[v v^T] = I / n``), smoothed with a Gaussian kernel for plots.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._validation import (
    LANCZOS_DTYPES,
    check_choice,
    check_int,
    check_positive_float,
    check_seed,
)
from .operators import LinearOperator, as_operator

WHICH = ("largest", "smallest")
REORTH = ("full", "periodic", "none")
GHOST_OVERLAP = 0.5
DEFAULT_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}

__all__ = [
    "REORTH",
    "WHICH",
    "BlockLanczosResult",
    "LanczosResult",
    "SpectralDensity",
    "block_lanczos",
    "gaussian_density",
    "lanczos",
    "slq",
]


@dataclass
class LanczosResult:
    """Outcome of :func:`lanczos`.

    Attributes:
        eigenvalues: ``(k_c,)`` float64, the wanted Ritz values, most extreme
            first (descending for ``which="largest"``, ascending for
            ``"smallest"``); ``k_c <= k``.
        residuals: ``(k_c,)`` Ritz residual norms ``|beta_m e_m^T y_i|`` (same
            units as the eigenvalues).
        converged: ``(k_c,)`` bool, residual ``<= tol * max|theta|``.
        eigenvectors: ``(n, k_c)`` unit Ritz vectors in the operator dtype, or
            ``None`` unless ``return_vectors``.
        explicit_residuals: ``(k_c,)`` ``||A u - theta u||`` when
            ``reorth != "full"``, else ``None``.
        ritz_values: ``(m,)`` all Ritz values, ascending.
        ritz_residuals: ``(m,)`` their residual norms.
        alpha: ``(m,)`` diagonal of ``T_m``.
        beta: ``(m - 1,)`` off-diagonal of ``T_m`` (zeros mark restarts).
        iterations: ``m``, Lanczos steps taken.
        num_matvecs: operator products used, explicit residuals included.
        restarts: invariant subspaces met (random restarts).
        ghosts_removed: Ritz pairs discarded as copies of another.
        tol: the relative convergence tolerance used.
        scale: ``max|theta|``, the spectral-radius estimate ``tol`` is relative to.
        which: ``"largest"`` or ``"smallest"``.
        reorth: reorthogonalization used.
    """

    eigenvalues: Tensor
    residuals: Tensor
    converged: Tensor
    eigenvectors: Tensor | None
    explicit_residuals: Tensor | None
    ritz_values: Tensor
    ritz_residuals: Tensor
    alpha: Tensor
    beta: Tensor
    iterations: int
    num_matvecs: int
    restarts: int
    ghosts_removed: int
    tol: float
    scale: float
    which: str
    reorth: str

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all()) and self.converged.numel() > 0


@dataclass
class _Process:
    alpha: list[float]
    beta: list[float]
    basis: Tensor
    last_beta: float
    restarts: int

    def ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """Return Ritz values (ascending), eigenvectors of ``T`` and residual norms."""
        m = len(self.alpha)
        T = torch.diag(torch.tensor(self.alpha, dtype=torch.float64))
        if m > 1:
            off = torch.tensor(self.beta[: m - 1], dtype=torch.float64)
            T += torch.diag(off, 1) + torch.diag(off, -1)
        theta, Y = torch.linalg.eigh(T)
        return theta, Y, (self.last_beta * Y[-1]).abs()


def _orthogonalize(w: Tensor, basis: Tensor) -> Tensor:
    """Classical Gram-Schmidt of ``w`` against the rows of ``basis``, twice."""
    for _ in range(2):
        w = w - basis.T @ (basis @ w)
    return w


def _random_unit(n: int, generator: torch.Generator, like: Tensor) -> Tensor:
    v = torch.randn(n, generator=generator, dtype=torch.float64)
    return (v / v.norm()).to(like.device, like.dtype)


def _run(
    matvec: Callable[[Tensor], Tensor],
    q0: Tensor,
    steps: int,
    reorth: str,
    generator: torch.Generator | None,
    stop: Callable[[_Process, int], bool] | None = None,
) -> _Process:
    """Run up to ``steps`` Lanczos steps from ``q0``; restart on breakdown if ``generator``."""
    n = q0.numel()
    eps = torch.finfo(q0.dtype).eps
    basis = torch.zeros(steps, n, dtype=q0.dtype, device=q0.device)
    basis[0] = q0 / q0.norm()
    proc = _Process([], [], basis, 0.0, 0)
    anorm = 0.0
    # Simon's omega recurrence state: estimates of q_j^T q_i and q_{j-1}^T q_i.
    omega, omega_old = [1.0], []
    round_off = eps * math.sqrt(n)
    force_reorth = False
    for j in range(steps):
        q = basis[j]
        w = matvec(q)
        alpha = float(q @ w)
        w = w - alpha * q
        if j > 0:
            w = w - proc.beta[j - 1] * basis[j - 1]
        if reorth == "full":
            w = _orthogonalize(w, basis[: j + 1])
        beta = float(w.norm())
        anorm = max(anorm, abs(alpha) + beta + (proc.beta[j - 1] if j > 0 else 0.0))
        if reorth == "periodic" and beta > 0:
            a, b = proc.alpha + [alpha], proc.beta
            new = []
            for i in range(j):
                val = b[i] * omega[i + 1] + (a[i] - alpha) * omega[i] - b[j - 1] * omega_old[i]
                if i > 0:
                    val += b[i - 1] * omega[i - 1]
                val += math.copysign(round_off * anorm, val)
                new.append(val / beta)
            new += [round_off, 1.0]
            if force_reorth or max((abs(x) for x in new[:-1]), default=0.0) > math.sqrt(eps):
                w = _orthogonalize(w, basis[: j + 1])
                beta = float(w.norm())
                new = [round_off] * (j + 1) + [1.0]
                force_reorth = not force_reorth
            omega_old, omega = omega, new
        proc.alpha.append(alpha)
        proc.last_beta = beta
        if j + 1 == steps or (stop is not None and stop(proc, j + 1)):
            break
        if beta > eps**0.75 * anorm:
            basis[j + 1] = w / beta
            proc.beta.append(beta)
            continue
        if generator is None:
            break
        fresh = _orthogonalize(_random_unit(n, generator, q0), basis[: j + 1])
        if float(fresh.norm()) < 0.5:
            break
        basis[j + 1] = fresh / fresh.norm()
        proc.beta.append(0.0)
        proc.restarts += 1
        omega_old, omega = [round_off] * j + [1.0], [round_off] * (j + 1) + [1.0]
    proc.basis = basis[: len(proc.alpha)]
    return proc


def _run_probes(
    matmat: Callable[[Tensor], Tensor], V0: Tensor, steps: int, reorth: str
) -> list[_Process]:
    """Independent Lanczos runs from the columns of ``V0: (n, L)``, one block product per step.

    The recurrence of :func:`_run` (``"full"`` or ``"none"`` reorthogonalization,
    no restarts: a run whose ``beta`` falls below ``eps^(3/4) ||T||`` stops there),
    for all ``L`` start vectors at once: step ``j`` applies the operator to the
    ``(n, L')`` block of the runs still going. Basis memory: ``steps x n x L``.
    """
    n, count = V0.shape
    eps = torch.finfo(V0.dtype).eps
    basis = torch.zeros(steps, n, count, dtype=V0.dtype, device=V0.device)
    basis[0] = V0 / V0.norm(dim=0)
    alpha = torch.zeros(steps, count, dtype=torch.float64)
    beta = torch.zeros(steps, count, dtype=torch.float64)
    lengths = [steps] * count
    anorm = torch.zeros(count, dtype=torch.float64)
    active = torch.arange(count)
    for j in range(steps):
        everyone = len(active) == count
        q = basis[j] if everyone else basis[j][:, active]
        w = matmat(q)
        a = (q * w).sum(dim=0)
        w = w - a * q
        if j > 0:
            previous = basis[j - 1] if everyone else basis[j - 1][:, active]
            w = w - beta[j - 1, active].to(w.device, w.dtype) * previous
        if reorth == "full":
            done = basis[: j + 1] if everyone else basis[: j + 1][:, :, active]
            for _ in range(2):
                w = w - torch.einsum("jnl,jl->nl", done, torch.einsum("jnl,nl->jl", done, w))
        b = w.norm(dim=0).to("cpu", torch.float64)
        a = a.to("cpu", torch.float64)
        alpha[j, active] = a
        previous_beta = beta[j - 1, active] if j > 0 else torch.zeros_like(b)
        anorm[active] = torch.maximum(anorm[active], a.abs() + b + previous_beta)
        beta[j, active] = b  # the last beta of every run is its ``last_beta``
        if j + 1 == steps:
            break
        going = b > eps**0.75 * anorm[active]
        for index in active[~going].tolist():
            lengths[index] = j + 1
        basis[j + 1][:, active[going]] = w[:, going] / b[going].to(w.device, w.dtype)
        active = active[going]
        if len(active) == 0:
            break
    return [
        _Process(
            alpha[:m, l].tolist(),
            beta[: m - 1, l].tolist(),
            basis[:m, :, l],
            float(beta[m - 1, l]),
            0,
        )
        for l, m in enumerate(lengths)
    ]


def _wanted_order(theta: Tensor, which: str) -> Tensor:
    return torch.argsort(theta, descending=(which == "largest"))


def _select(
    proc: _Process, k: int, which: str, check_ghosts: bool
) -> tuple[list[int], Tensor, Tensor, Tensor, int]:
    """Pick ``k`` wanted Ritz pairs, discarding ghost copies.

    Candidates are visited most extreme first; one whose unit Ritz vector
    overlaps a kept one by more than ``GHOST_OVERLAP`` is a copy of it, and the
    copy with the smaller residual stays. Returns the chosen indices (into the
    ascending Ritz values), the Ritz values, the eigenvectors of ``T``, the
    residual norms, and the number of copies discarded.
    """
    theta, Y, res = proc.ritz()
    order = _wanted_order(theta, which).tolist()
    if not check_ghosts:
        return order[:k], theta, Y, res, 0
    basis = proc.basis[: len(proc.alpha)]
    kept: list[int] = []
    kept_vectors = basis.new_zeros(basis.shape[1], 0)
    ghosts = 0
    chunk = 2 * k + 10
    for start in range(0, len(order), chunk):
        if len(kept) >= k:
            break
        candidates = order[start : start + chunk]
        vectors = basis.T @ Y[:, candidates].to(basis.device, basis.dtype)
        vectors = vectors / vectors.norm(dim=0).clamp_min(torch.finfo(basis.dtype).tiny)
        for c, index in enumerate(candidates):
            overlap = (kept_vectors.T @ vectors[:, c]).abs()
            if overlap.numel() == 0 or float(overlap.max()) <= GHOST_OVERLAP:
                if len(kept) < k:
                    kept.append(index)
                    kept_vectors = torch.cat([kept_vectors, vectors[:, c : c + 1]], dim=1)
                continue
            ghosts += 1
            twin = int(overlap.argmax())
            if res[index] < res[kept[twin]]:
                kept[twin] = index
                kept_vectors[:, twin] = vectors[:, c]
    kept.sort(key=lambda i: -float(theta[i]) if which == "largest" else float(theta[i]))
    return kept, theta, Y, res, ghosts


def _start_vector(v0: Tensor | None, n: int, generator: torch.Generator, op: LinearOperator):
    if v0 is None:
        return _random_unit(n, generator, torch.empty(0, dtype=op.dtype, device=op.device))
    if not isinstance(v0, Tensor) or v0.shape != (n,) or not v0.is_floating_point():
        raise ValueError(f"v0 must be None or a floating-point tensor of shape ({n},)")
    if not torch.isfinite(v0).all() or float(v0.norm()) == 0.0:
        raise ValueError("v0 must be finite and non-zero")
    return v0.to(op.device, op.dtype)


def _lanczos_operator(operator: object, n: int | None) -> LinearOperator:
    op = as_operator(operator, n=n)
    if op.dtype not in LANCZOS_DTYPES:
        raise ValueError(
            f"operator dtype must be one of {LANCZOS_DTYPES} for Lanczos; got {op.dtype}"
        )
    return op


def lanczos(
    operator: LinearOperator | Tensor | Callable[[Tensor], Tensor],
    *,
    k: int = 6,
    which: str = "largest",
    max_iter: int | None = None,
    tol: float | None = None,
    reorth: str = "full",
    seed: int = 0,
    v0: Tensor | None = None,
    n: int | None = None,
    return_vectors: bool = False,
) -> LanczosResult:
    """Extreme eigenvalues of a symmetric operator by the Lanczos method.

    Runs until the ``k`` wanted Ritz pairs have Ritz residual
    ``|beta_m e_m^T y_i| <= tol * max|theta|`` (so each lies within that distance
    of an eigenvalue; Golub & Van Loan Thm. 10.1.4), are not ghost copies, or
    until ``max_iter`` steps. See the module docstring for the algorithm.

    Args:
        operator: a :class:`~fisher_metrics.operators.LinearOperator`, a dense
            symmetric ``(n, n)`` tensor, or a callable ``v (n,) -> A v (n,)``
            (float64 vectors; give ``n``). Its dtype must be float32 or float64.
        k: number of wanted eigenvalues, ``1 <= k <= n``.
        which: ``"largest"`` or ``"smallest"`` (algebraic).
        max_iter: maximum Lanczos steps (``k <= max_iter``; clipped to ``n``).
            Default ``min(n, max(10 k, 100))``.
        tol: relative residual tolerance. Default ``1e-10`` (float64 operator)
            or ``1e-5`` (float32).
        reorth: ``"full"``, ``"periodic"`` or ``"none"``.
        seed: seed of the CPU generator for the start and restart vectors (the
            same seed gives the same run on any device).
        v0: optional ``(n,)`` start vector (restarts still use ``seed``).
        n: vector length, required when ``operator`` is a callable.
        return_vectors: also return the ``(n, k_c)`` unit Ritz vectors.

    Returns:
        A :class:`LanczosResult`; ``eigenvalues`` ordered most extreme first.

    Raises:
        TypeError: ``operator`` or an argument is of the wrong type.
        ValueError: an argument is out of range (``k > n``, ``max_iter < k``,
            unknown ``which`` / ``reorth``, bad ``v0``, unsupported dtype).
    """
    op = _lanczos_operator(operator, n)
    size = op.shape[0]
    which = check_choice("which", which, WHICH)
    reorth = check_choice("reorth", reorth, REORTH)
    k = check_int("k", k)
    if k > size:
        raise ValueError(f"k must be <= n = {size}; got {k}")
    steps = min(size, max(10 * k, 100)) if max_iter is None else check_int("max_iter", max_iter)
    if steps < k:
        raise ValueError(f"max_iter must be >= k = {k}; got {steps}")
    steps = min(steps, size)
    tol = DEFAULT_TOL[op.dtype] if tol is None else check_positive_float("tol", tol)
    generator = torch.Generator().manual_seed(check_seed("seed", seed))
    q0 = _start_vector(v0, size, generator, op)
    check_ghosts = reorth != "full"

    def converged_enough(proc: _Process, m: int) -> bool:
        if m < k:
            return False
        theta, _, res = proc.ritz()
        scale = float(theta.abs().max())
        wanted = _wanted_order(theta, which)[:k]
        if not bool((res[wanted] <= tol * scale).all()):
            return False
        if not check_ghosts:
            return True
        chosen, *_ = _select(proc, k, which, check_ghosts=True)
        return len(chosen) == k and bool((res[chosen] <= tol * scale).all())

    proc = _run(op.matvec, q0, steps, reorth, generator, stop=converged_enough)
    num_matvecs = len(proc.alpha)
    chosen, theta, Y, res, ghosts = _select(proc, k, which, check_ghosts)
    scale = float(theta.abs().max())
    values = theta[chosen]
    residuals = res[chosen]
    converged = residuals <= tol * scale
    vectors = None
    explicit = None
    if return_vectors or check_ghosts:
        coeffs = Y[:, chosen].to(op.device, op.dtype)
        vectors = proc.basis.T @ coeffs
        vectors = vectors / vectors.norm(dim=0).clamp_min(torch.finfo(op.dtype).tiny)
    if check_ghosts:
        shifts = values.to(vectors.device, vectors.dtype)
        explicit = (op.matmat(vectors) - vectors * shifts).norm(dim=0).to("cpu", torch.float64)
        num_matvecs += len(chosen)
        if reorth == "none":
            converged &= explicit <= tol * scale
    return LanczosResult(
        eigenvalues=values,
        residuals=residuals,
        converged=converged,
        eigenvectors=vectors if return_vectors else None,
        explicit_residuals=explicit,
        ritz_values=theta,
        ritz_residuals=res,
        alpha=torch.tensor(proc.alpha, dtype=torch.float64),
        beta=torch.tensor(proc.beta[: len(proc.alpha) - 1], dtype=torch.float64),
        iterations=len(proc.alpha),
        num_matvecs=num_matvecs,
        restarts=proc.restarts,
        ghosts_removed=ghosts,
        tol=tol,
        scale=scale,
        which=which,
        reorth=reorth,
    )


# --------------------------------------------------------------------------- block Lanczos


@dataclass
class BlockLanczosResult:
    """Outcome of :func:`block_lanczos`.

    Attributes:
        eigenvalues: ``(k_c,)`` float64 wanted Ritz values, most extreme first.
        residuals: ``(k_c,)`` true residual norms ``||A u - theta u||`` of the unit
            Ritz vectors (eigenvalue units).
        converged: ``(k_c,)`` bool, residual ``<= tol * max|theta|``.
        eigenvectors: ``(n, k_c)`` unit Ritz vectors (operator dtype) or ``None``.
        ritz_values: ``(m,)`` all Ritz values, ascending (``m`` basis vectors).
        iterations: block steps taken.
        num_matvecs: operator products used (sum of the block widths).
        block_size: ``b``, the width of the start block.
        deflated: Krylov directions dropped as (numerically) dependent.
        restarts: fresh random blocks taken after an invariant subspace.
        tol, scale, which: as in :class:`LanczosResult`.
    """

    eigenvalues: Tensor
    residuals: Tensor
    converged: Tensor
    eigenvectors: Tensor | None
    ritz_values: Tensor
    iterations: int
    num_matvecs: int
    block_size: int
    deflated: int
    restarts: int
    tol: float
    scale: float
    which: str

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all()) and self.converged.numel() > 0


def _extend_basis(Q: Tensor, W: Tensor, reference: Tensor) -> tuple[Tensor, int]:
    """Orthonormal columns spanning ``W`` off ``range(Q)``, dependent ones dropped.

    Block classical Gram-Schmidt against ``Q`` twice, then column by column
    (twice) within the block; a column whose norm falls below ``sqrt(eps)`` times
    its ``reference`` norm is dependent and dropped. Returns the new columns and the
    number dropped.
    """
    eps = torch.finfo(W.dtype).eps
    for _ in range(2):
        W = W - Q @ (Q.T @ W)
    kept: list[Tensor] = []
    for j in range(W.shape[1]):
        w = W[:, j]
        for _ in range(2):
            for q in kept:
                w = w - (q @ w) * q
        norm = float(w.norm())
        if norm > eps**0.5 * max(float(reference[j]), torch.finfo(W.dtype).tiny):
            kept.append(w / norm)
    if not kept:
        return W[:, :0], W.shape[1]
    return torch.stack(kept, dim=1), W.shape[1] - len(kept)


def block_lanczos(
    operator: LinearOperator | Tensor | Callable[[Tensor], Tensor],
    *,
    k: int = 6,
    which: str = "largest",
    block_size: int | None = None,
    max_matvecs: int | None = None,
    tol: float | None = None,
    seed: int = 0,
    n: int | None = None,
    return_vectors: bool = False,
) -> BlockLanczosResult:
    """Extreme eigenvalues by block Lanczos with full reorthogonalization (block products).

    Golub & Underwood 1977 ("The block Lanczos method for computing eigenvalues"):
    from an orthonormal random ``n x b`` block ``X_1``, each step applies the
    operator to the newest block (one ``operator.matmat``), orthogonalizes
    ``A X_j`` against the whole basis twice and orthonormalizes it into
    ``X_{j+1}`` (dependent directions are deflated; an invariant subspace restarts
    from a fresh random block). The Ritz pairs come from ``H = Q^T A Q`` with the
    stored products ``A Q`` (block tridiagonal in exact arithmetic), and each
    wanted pair's residual ``||A Q y - theta Q y||`` is computed from them exactly,
    so reported residuals are true residuals. It stops when the ``k`` wanted pairs
    have residual ``<= tol * max|theta|`` or after ``max_matvecs`` products.
    Memory: two ``n x m`` blocks (basis and products) for ``m`` basis vectors. A
    block of ``b`` vectors finds eigenvalues of multiplicity up to ``b`` without
    restarts, and ``b`` products at once cost much less than ``b`` single ones
    for curvature operators.

    Args:
        operator: see :func:`lanczos`.
        k: wanted eigenvalues, ``1 <= k <= n``.
        which: ``"largest"`` or ``"smallest"`` (algebraic).
        block_size: ``b >= 1`` (default ``min(k, n)``).
        max_matvecs: product budget (``>= b``; default ``min(n, max(10 k, 100))``,
            as :func:`lanczos`' ``max_iter``).
        tol: relative residual tolerance (default ``1e-10`` for float64 operators,
            ``1e-5`` for float32).
        seed: seed of the CPU generator for the start and restart blocks.
        n: vector length, required when ``operator`` is a callable.
        return_vectors: also return the unit Ritz vectors.

    Returns:
        A :class:`BlockLanczosResult`.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: ``k > n``, ``block_size`` or ``max_matvecs`` out of range,
            unknown ``which``, unsupported dtype.
    """
    op = _lanczos_operator(operator, n)
    size = op.shape[0]
    which = check_choice("which", which, WHICH)
    k = check_int("k", k)
    if k > size:
        raise ValueError(f"k must be <= n = {size}; got {k}")
    b = min(k, size) if block_size is None else check_int("block_size", block_size)
    if b > size:
        raise ValueError(f"block_size must be <= n = {size}; got {b}")
    budget = (
        min(size, max(10 * k, 100))
        if max_matvecs is None
        else check_int("max_matvecs", max_matvecs)
    )
    if budget < max(b, k):
        raise ValueError(f"max_matvecs must be >= max(k, block_size) = {max(b, k)}; got {budget}")
    tol = DEFAULT_TOL[op.dtype] if tol is None else check_positive_float("tol", tol)
    generator = torch.Generator().manual_seed(check_seed("seed", seed))

    def fresh(count: int) -> Tensor:
        block = torch.randn(size, count, generator=generator, dtype=torch.float64)
        return block.to(op.device, op.dtype)

    Q = torch.zeros(size, 0, dtype=op.dtype, device=op.device)
    AQ = torch.zeros_like(Q)
    X, deflated = _extend_basis(Q, fresh(b), torch.full((b,), float(size) ** 0.5))
    restarts = iterations = 0
    while True:
        room = min(budget, size) - Q.shape[1]
        if X.shape[1] == 0:
            if room <= 0:
                break
            width = min(b, room)
            X, _ = _extend_basis(Q, fresh(width), torch.full((width,), float(size) ** 0.5))
            restarts += 1
            if X.shape[1] == 0:
                break
        X = X[:, :room]
        AX = op.matmat(X)
        iterations += 1
        Q, AQ = torch.cat([Q, X], dim=1), torch.cat([AQ, AX], dim=1)
        H = Q.T @ AQ
        theta, Y = torch.linalg.eigh(0.5 * (H + H.T))
        wanted = _wanted_order(theta, which)[: min(k, Q.shape[1])]
        Yk = Y[:, wanted]
        vectors = Q @ Yk
        residuals = (AQ @ Yk - vectors * theta[wanted]).norm(dim=0)
        scale = float(theta.abs().max())
        done = len(wanted) == k and bool((residuals <= tol * scale).all())
        if done or Q.shape[1] >= min(budget, size):
            break
        X, dropped = _extend_basis(Q, AX, AX.norm(dim=0))
        deflated += dropped
    residuals = residuals.to("cpu", torch.float64)
    return BlockLanczosResult(
        eigenvalues=theta[wanted].to("cpu", torch.float64),
        residuals=residuals,
        converged=residuals <= tol * scale,
        eigenvectors=vectors if return_vectors else None,
        ritz_values=theta.to("cpu", torch.float64),
        iterations=iterations,
        num_matvecs=Q.shape[1],
        block_size=b,
        deflated=deflated,
        restarts=restarts,
        tol=tol,
        scale=scale,
        which=which,
    )


# --------------------------------------------------------------------------- SLQ


def gaussian_density(
    nodes: Tensor,
    weights: Tensor,
    *,
    grid: Tensor | None = None,
    sigma: float | None = None,
    num_points: int = 1000,
) -> tuple[Tensor, Tensor]:
    """Gaussian-broadened density ``phi(t) = sum_i w_i N(t; theta_i, sigma^2)``.

    Args:
        nodes: ``(N,)`` quadrature nodes ``theta_i`` (eigenvalue units).
        weights: ``(N,)`` non-negative weights summing to 1.
        grid: ``(G,)`` evaluation points. Default: ``num_points`` points evenly
            spaced on ``[min theta - 6 sigma, max theta + 6 sigma]``, on which the
            trapezoid rule integrates ``phi`` to 1 up to ``~1e-8``.
        sigma: kernel width (eigenvalue units). Default: 1% of the node range
            (1% of ``max(|theta|)``, or 0.01, if all nodes coincide).
        num_points: size of the default grid (>= 2).

    Returns:
        ``(grid, phi)``, both ``(G,)`` float64; ``phi`` in 1 / eigenvalue units.

    Raises:
        TypeError: ``nodes`` / ``weights`` / ``grid`` are not tensors.
        ValueError: shapes differ, negative weights, bad ``sigma`` / ``num_points``.
    """
    for name, value in (("nodes", nodes), ("weights", weights)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a 1-D torch.Tensor")
    nodes = nodes.detach().to("cpu", torch.float64).reshape(-1)
    weights = weights.detach().to("cpu", torch.float64).reshape(-1)
    if nodes.shape != weights.shape or nodes.numel() == 0:
        raise ValueError("nodes and weights must be non-empty and of the same length")
    if bool((weights < 0).any()):
        raise ValueError("weights must be non-negative")
    if sigma is None:
        spread = float(nodes.max() - nodes.min())
        sigma = 0.01 * spread if spread > 0 else 0.01 * max(float(nodes.abs().max()), 1.0)
    sigma = check_positive_float("sigma", sigma)
    if grid is None:
        num_points = check_int("num_points", num_points, minimum=2)
        lo, hi = float(nodes.min()) - 6 * sigma, float(nodes.max()) + 6 * sigma
        grid = torch.linspace(lo, hi, num_points, dtype=torch.float64)
    elif not isinstance(grid, Tensor):
        raise TypeError("grid must be None or a 1-D torch.Tensor")
    grid = grid.detach().to("cpu", torch.float64).reshape(-1)
    z = (grid[:, None] - nodes[None, :]) / sigma
    phi = (torch.exp(-0.5 * z * z) @ weights) / (sigma * math.sqrt(2 * math.pi))
    return grid, phi


@dataclass
class SpectralDensity:
    """Outcome of :func:`slq`: a discrete estimate of the spectral density.

    Attributes:
        nodes: ``(N,)`` Ritz values of all probes (eigenvalue units).
        weights: ``(N,)`` weights ``tau^2 / n_v``; they sum to 1.
        probe: ``(N,)`` index of the probe each node comes from.
        num_probes: ``n_v``.
        lanczos_steps: steps requested per probe (fewer on breakdown).
        num_matvecs: operator products used.
        n: operator size.
    """

    nodes: Tensor
    weights: Tensor
    probe: Tensor
    num_probes: int
    lanczos_steps: int
    num_matvecs: int
    n: int

    def moment(self, p: int) -> float:
        """Estimate of ``(1/n) tr(A^p) = (1/n) sum_i lambda_i^p``, i.e. ``sum_i w_i theta_i^p``.

        Exact per probe for ``p <= 2 m - 1`` (Gauss quadrature), so the only error
        is the probe (Hutchinson) error.
        """
        p = check_int("p", p, minimum=0)
        return float((self.weights * self.nodes.pow(p)).sum())

    def density(
        self, grid: Tensor | None = None, *, sigma: float | None = None, num_points: int = 1000
    ) -> tuple[Tensor, Tensor]:
        """Gaussian-broadened density; see :func:`gaussian_density`."""
        return gaussian_density(
            self.nodes, self.weights, grid=grid, sigma=sigma, num_points=num_points
        )


def slq(
    operator: LinearOperator | Tensor | Callable[[Tensor], Tensor],
    *,
    num_probes: int = 10,
    lanczos_steps: int = 30,
    seed: int = 0,
    probes: Tensor | None = None,
    reorth: str = "full",
    n: int | None = None,
    block_size: int = 16,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature estimate of the spectral density (Ubaru et al. 2017).

    For each unit probe ``v_l`` (Rademacher ``/ sqrt(n)``), ``m`` Lanczos steps give
    ``T_m = Y diag(theta) Y^T``; the nodes are ``theta_lk`` and the weights
    ``(e_1^T y_lk)^2 / n_v``. A probe whose Krylov space is invariant stops early
    (its quadrature is then exact). With ``reorth`` ``"full"`` or ``"none"``, up to
    ``block_size`` probes run together: each Lanczos step is one block product
    (``operator.matmat``), which curvature operators vectorize; ``"periodic"``
    runs the probes one after another.

    Args:
        operator: see :func:`lanczos`.
        num_probes: ``n_v >= 1`` random probes (ignored when ``probes`` is given).
        lanczos_steps: ``m >= 1`` steps per probe (clipped to ``n``).
        seed: seed of the CPU generator drawing the probes.
        probes: optional ``(n, n_v)`` probe vectors (normalized here).
        reorth: ``"full"``, ``"periodic"`` or ``"none"``.
        n: vector length, required when ``operator`` is a callable.
        block_size: probes run together (>= 1); the Lanczos bases take
            ``block_size * lanczos_steps * n`` entries.

    Returns:
        A :class:`SpectralDensity` whose weights sum to 1.

    Raises:
        TypeError / ValueError: bad arguments, as for :func:`lanczos`.
    """
    op = _lanczos_operator(operator, n)
    size = op.shape[0]
    reorth = check_choice("reorth", reorth, REORTH)
    steps = min(check_int("lanczos_steps", lanczos_steps), size)
    if probes is None:
        num_probes = check_int("num_probes", num_probes)
        generator = torch.Generator().manual_seed(check_seed("seed", seed))
        signs = torch.randint(0, 2, (size, num_probes), generator=generator, dtype=torch.int64)
        probes = (2.0 * signs - 1.0).to(torch.float64)
    elif not isinstance(probes, Tensor) or probes.dim() != 2 or probes.shape[0] != size:
        raise ValueError(f"probes must be None or a tensor of shape ({size}, n_v)")
    block_size = check_int("block_size", block_size)
    probes = probes.to(op.device, op.dtype)
    zero = (probes.norm(dim=0) == 0).nonzero()
    if len(zero):
        raise ValueError(f"probe {int(zero[0])} is zero")
    if reorth == "periodic":
        runs = [_run(op.matvec, probe, steps, reorth, generator=None) for probe in probes.T]
    else:
        runs = []
        for start in range(0, probes.shape[1], block_size):
            block = probes[:, start : start + block_size]
            runs += _run_probes(op.matmat, block, steps, reorth)
    nodes, weights, index = [], [], []
    num_matvecs = 0
    for l, proc in enumerate(runs):
        theta, Y, _ = proc.ritz()
        num_matvecs += len(proc.alpha)
        nodes.append(theta)
        weights.append(Y[0] ** 2)
        index.append(torch.full_like(theta, l, dtype=torch.int64))
    weights_all = torch.cat(weights) / probes.shape[1]
    return SpectralDensity(
        nodes=torch.cat(nodes),
        weights=weights_all,
        probe=torch.cat(index),
        num_probes=probes.shape[1],
        lanczos_steps=steps,
        num_matvecs=num_matvecs,
        n=size,
    )
