"""What every inverse representation offers, and the A side that all of them share.

An ``Inverse`` is the preconditioner of one layer computed at an inverse update from its
running factors A (d, d) and G (o, o): it owns its tensors and caches and turns a gradient
``V`` (o, d) into ``(A (x) G + damping)^{-1} V`` in the layer's damping mode
(docs/design.md, "The mathematics that must hold"). Nothing outside ``kfac_optim.policies``
looks inside one: callers use ``apply``, ``diagnostics``, ``nbytes``, ``state_dict`` and,
for EKFAC, ``eigenbasis`` / ``update_corrections``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..inverse import clip_condition, eigh_psd

__all__ = ["Inverse", "AEigen", "eigen_a", "condition", "nbytes"]

Reduce = Callable[[Tensor], Tensor]


def nbytes(*tensors: Any) -> int:
    """Bytes of the tensors among ``tensors`` (None and plain values count 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))


def condition(s: Tensor | None, rest: float = 0.0, dim: int | None = None) -> float | None:
    """max / min eigenvalue of ``s`` (inf when singular), the complement of a thin basis
    (``s.numel() < dim``) counting as eigenvalue ``rest``; None without eigenvalues."""
    if s is None:
        return None
    if s.numel() == 0:
        return float("inf")
    lo = float(s.min())
    if dim is not None and s.numel() < dim:
        lo = min(lo, rest)
    return float(s.max()) / lo if lo > 0 else float("inf")


class AEigen:
    """A's eigenpairs after condition-number clipping: ``s`` (d,) and ``q`` (d, d), or
    ``q`` None for a diagonal A (an Embedding's token counts, ``s`` its diagonal)."""

    __slots__ = ("s", "q", "clipped")

    def __init__(self, s: Tensor, q: Tensor | None, clipped: int = 0) -> None:
        self.s, self.q, self.clipped = s, q, clipped


def eigen_a(a: Tensor, *, diagonal: bool, kappa: float | None, dtype: torch.dtype | None,
            device: torch.device | None, eig: tuple[Tensor, Tensor] | None | bool = False
            ) -> AEigen | None:
    """``A = Q diag(s) Q^T`` (``eigh_psd``), eigenvalues clipped at ``max(s) / kappa``
    (``max_condition_number``); None when the eigensolver fails in float64 too.

    ``eig``: ``eigh_psd(a, dtype=dtype, device=device)`` when already computed (e.g. batched
    by ``eigh_psd_many``; None: it failed), False to compute it here."""
    if diagonal:
        s, q = a, None
    else:
        if eig is False:
            eig = eigh_psd(a, dtype=dtype, device=device)
        if eig is None:
            return None
        s, q = eig
    s, clipped = clip_condition(s, kappa)
    return AEigen(s, q, clipped)


class Inverse(ABC):
    """One layer's preconditioner, computed at an inverse update.

    Attributes:
        kind: the registry name of the representation (``state_dict()["kind"]``).
        rows: ``(start, stop)`` when it covers only these rows of G (row-sharded Woodbury:
            ``apply`` then takes and returns those rows of V and needs ``reduce``), else None.
        rank: columns of a low-rank G when it was computed, else o.
    """

    kind: ClassVar[str]
    rows: tuple[int, int] | None = None

    def __init__(self, a: AEigen, *, out_features: int, rank: int, clipped_g: int = 0) -> None:
        self.a = a
        self.out_features = out_features
        self.rank = rank
        self.clipped_g = clipped_g

    @abstractmethod
    def apply(self, grad: Tensor, damping: float, reduce: Reduce | None = None) -> Tensor:
        """Preconditioned ``grad`` ``(o, d)`` (or this inverse's rows of it), in its dtype.

        Args:
            grad: ``V`` (o, d), bias as the last column (``rows``: those rows of V).
            damping: lambda > 0 of this step.
            reduce: for a row-sharded inverse, the sum over ranks of a ``(k, d)`` partial
                product (an all-reduce); None otherwise.
        """

    @property
    @abstractmethod
    def basis_rank(self) -> int:
        """Columns of the G-side basis it applies: eigenvectors of G, or of U."""

    @abstractmethod
    def _g_eigenvalues(self) -> tuple[Tensor | None, float]:
        """G's known eigenvalues and its eigenvalue on the rest of R^o (for cond_G)."""

    @abstractmethod
    def _tensors(self) -> dict[str, Any]:
        """The representation's own entries of ``state_dict()`` (tensors and plain values)."""

    def _caches(self) -> tuple:
        """Tensors cached between steps (counted by ``nbytes``, never saved)."""
        return ()

    def _g_trace(self) -> Tensor | float:
        """tr(G) of the G this inverse applies (its eigenvalues, the complement of a thin
        basis counting as ``rest``)."""
        s_g, rest = self._g_eigenvalues()
        return s_g.sum() + rest * (self.out_features - s_g.numel())

    def kronecker_mean(self) -> float:
        """``tr(A (x) G) / (d o) = (tr(A) / d) (tr(G) / o)``: the mean eigenvalue of the
        Kronecker factorisation this inverse was computed from (after clipping), the unit of
        ``damping_scale="relative"`` (docs/design.md, "Damping")."""
        s_a = self.a.s
        return float(s_a.sum()) / s_a.numel() * float(self._g_trace()) / self.out_features

    def diagnostics(self) -> dict[str, Any]:
        """``cond_A``, ``cond_G`` (after clipping; inf when singular), ``clipped_A``,
        ``clipped_G`` (eigenvalues raised by ``max_condition_number``), ``rank``, ``jitter``
        (Cholesky jitter of a Woodbury system, None where there is none)."""
        s_g, rest = self._g_eigenvalues()
        return {"cond_A": condition(self.a.s), "cond_G": condition(s_g, rest, self.out_features),
                "clipped_A": self.a.clipped, "clipped_G": self.clipped_g, "rank": self.rank,
                "jitter": None}

    def nbytes(self) -> int:
        """Bytes held: eigenbases, Grams, row slices of U and cached solver factors."""
        return nbytes(self.a.s, self.a.q, *self._tensors().values(), *self._caches())

    def state_dict(self) -> dict[str, Any]:
        """Flat dict of tensors and plain values tagged with ``kind``; restored by
        ``kfac_optim.policies.inverse_from_state``."""
        return {"kind": self.kind, "s_a": self.a.s, "q_a": self.a.q,
                "clipped_A": self.a.clipped, "clipped_G": self.clipped_g, "rank": self.rank,
                "out_features": self.out_features, **self._tensors()}

    @classmethod
    @abstractmethod
    def from_state(cls, state: dict[str, Any], damping_mode: str) -> Inverse:
        """Rebuild from ``state_dict()`` (tensors already on the target device)."""

    @staticmethod
    def _a_from_state(state: dict[str, Any]) -> AEigen:
        """The A side of a ``state_dict()``."""
        return AEigen(state["s_a"], state["q_a"], int(state["clipped_A"]))

    # EKFAC -------------------------------------------------------------------
    @property
    def eigenbasis(self) -> tuple[Tensor | None, Tensor] | None:
        """``(Q_A, Q_G)`` when this inverse has G's full eigenbasis (EKFAC can correct its
        eigenvalues), else None."""
        return None

    def update_corrections(self, moments: Tensor, decay: float) -> None:
        """Fold a batch of eigenbasis second moments (o, d) into the EKFAC eigenvalues.

        Raises:
            TypeError: this representation has no full eigenbasis.
        """
        raise TypeError(f"a {self.kind!r} inverse has no full eigenbasis to correct")
