"""The Woodbury policy: G kept low-rank, ``G = U U^T`` with U (o, k), k << o.

Storage and EMA are ``kfac_optim.factors.LowRankFactor``; this module decides what a
low-rank G becomes at each factor update (kept, truncated to its top ``woodbury_rank``
eigenpairs, or turned dense past its column limit) and what its inverse is
(docs/design.md, "Woodbury policy"; formulas in ``kfac_optim.inverse``):

- exact damping, whole U: G's thin eigenbasis ``lowrank_eigh(U)`` in an ``EigInverse``;
- factored damping: ``WoodburyInverse``, ``(G + mu I)^{-1} V = (1/mu)[V - U (mu I + U^T U)^{-1}
  U^T V]`` with the Cholesky factor of the k x k system cached per damping;
- row-sharded (this rank holds rows ``start:stop`` of U): the global Gram ``U^T U`` is summed
  over ranks by the caller's ``reduce_gram``; factored damping is the same solve with
  ``U^T V`` summed by ``reduce``, exact damping ``WoodburyRowsInverse``
  (``precondition_woodbury_exact``: one Woodbury solve per eigenvalue of A).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..factors import LowRankFactor
from ..inverse import (
    clip_condition,
    eigh_psd,
    factored_damping,
    lowrank_eigh,
    precondition_woodbury_exact,
    precondition_woodbury_factored,
    robust_cholesky,
)
from .base import AEigen, Inverse, Reduce
from .eig import eig_inverse

__all__ = ["WoodburyInverse", "WoodburyRowsInverse", "WoodburyPolicy"]


class WoodburyInverse(Inverse):
    """Factored damping with ``G = U U^T``: U (o, k) or its rows, and the whole Gram (k, k)."""

    kind = "woodbury"

    def __init__(self, a: AEigen, u: Tensor, gram: Tensor, *, out_features: int,
                 rows: tuple[int, int] | None = None) -> None:
        super().__init__(a, out_features=out_features, rank=gram.shape[0])
        self.u, self.gram, self.trace_g = u, gram, gram.trace()
        self.rows = rows
        self._solver: tuple[float, tuple[str, Tensor, float]] | None = None

    def apply(self, grad: Tensor, damping: float, reduce: Reduce | None = None) -> Tensor:
        s_a = self.a.s
        lam_a, lam_g = factored_damping(s_a.sum(), s_a.numel(), self.trace_g, self.out_features,
                                        damping)
        if self._solver is None or self._solver[0] != damping:
            eye = torch.eye(self.gram.shape[0], dtype=self.gram.dtype, device=self.gram.device)
            self._solver = (damping, robust_cholesky(self.gram + lam_g * eye))
        return precondition_woodbury_factored(grad, self.u, self._solver[1], lam_g, self.a.q,
                                              s_a, lam_a, reduce)

    def diagnostics(self) -> dict[str, Any]:
        return super().diagnostics() | {
            "jitter": None if self._solver is None else self._solver[1][2]}

    @property
    def basis_rank(self) -> int:
        return self.u.shape[1]

    def _g_eigenvalues(self) -> tuple[Tensor | None, float]:
        return None, 0.0

    def _g_trace(self) -> Tensor | float:
        return self.trace_g

    def _caches(self) -> tuple:
        return () if self._solver is None else (self._solver[1][1],)

    def _tensors(self) -> dict[str, Any]:
        return {"u": self.u, "gram": self.gram,
                "u_rows": None if self.rows is None else list(self.rows)}

    @classmethod
    def from_state(cls, state: dict[str, Any], damping_mode: str) -> WoodburyInverse:
        rows = state["u_rows"]
        return cls(cls._a_from_state(state), state["u"],
                   state["gram"], out_features=int(state["out_features"]),
                   rows=None if rows is None else tuple(rows))


class WoodburyRowsInverse(Inverse):
    """Exact damping for this rank's rows ``u`` (o_r, k) of U, through the eigenpairs
    ``U^T U = W diag(s) W^T`` of the global Gram; ``s_g`` (G's min(o, k) largest
    eigenvalues, clipped) is kept for diagnostics."""

    kind = "woodbury_rows"

    def __init__(self, a: AEigen, u: Tensor, gram_s: Tensor, gram_w: Tensor, s_g: Tensor,
                 s_g_rest: float, *, out_features: int, rows: tuple[int, int],
                 clipped_g: int = 0) -> None:
        super().__init__(a, out_features=out_features, rank=gram_s.shape[0],
                         clipped_g=clipped_g)
        self.u, self.gram_s, self.gram_w = u, gram_s, gram_w
        self.s_g, self.s_g_rest = s_g, s_g_rest
        self.rows = rows

    def apply(self, grad: Tensor, damping: float, reduce: Reduce | None = None) -> Tensor:
        return precondition_woodbury_exact(grad, self.u, self.gram_s, self.gram_w, self.a.q,
                                           self.a.s, damping, self.s_g_rest, reduce=reduce)

    @property
    def basis_rank(self) -> int:
        return self.u.shape[1]

    def _g_eigenvalues(self) -> tuple[Tensor | None, float]:
        return self.s_g, self.s_g_rest

    def _tensors(self) -> dict[str, Any]:
        return {"u": self.u, "gram_s": self.gram_s, "gram_w": self.gram_w, "s_g": self.s_g,
                "s_g_rest": self.s_g_rest, "u_rows": list(self.rows)}

    @classmethod
    def from_state(cls, state: dict[str, Any], damping_mode: str) -> WoodburyRowsInverse:
        return cls(cls._a_from_state(state), state["u"],
                   state["gram_s"], state["gram_w"], state["s_g"], float(state["s_g_rest"]),
                   out_features=int(state["out_features"]), rows=tuple(state["u_rows"]),
                   clipped_g=int(state["clipped_G"]))


GramReduce = Callable[[Tensor], Tensor]


class WoodburyPolicy:
    """What a low-rank G becomes after a factor update, and its inverse.

    Args:
        max_low_rank: columns past which a layer's G (given o) turns dense.
        truncate_rank: ``woodbury_rank`` (None: no truncated EMA).
        kappa, damping_mode, dtype, device: as for ``EigPolicy``.
    """

    def __init__(self, *, max_low_rank: Callable[[int], int], truncate_rank: int | None,
                 kappa: float | None, damping_mode: str, dtype: torch.dtype | None,
                 device: torch.device | None) -> None:
        self.max_low_rank = max_low_rank
        self.truncate_rank = truncate_rank
        self.kappa, self.damping_mode = kappa, damping_mode
        self.dtype, self.device = dtype, device

    def truncates(self, o: int) -> bool:
        """Whether a low-rank G of this layer is kept at ``woodbury_rank`` columns (truncated
        EMA) instead of growing until ``max_low_rank`` and turning dense."""
        return self.truncate_rank is not None and self.truncate_rank <= self.max_low_rank(o)

    def truncate(self, g: LowRankFactor, o: int, reduce_gram: GramReduce | None = None
                 ) -> float | None:
        """Truncate ``g`` to ``woodbury_rank`` columns where that applies (Eckart-Young,
        ``LowRankFactor.truncate``); returns the trace fraction dropped, or None when
        nothing was truncated or the eigensolver failed (``g`` then unchanged)."""
        if not self.truncates(o) or g.rank <= self.truncate_rank:
            return None
        return g.truncate(self.truncate_rank, dtype=self.dtype, device=self.device,
                          reduce_gram=reduce_gram)

    def outgrown(self, g: LowRankFactor, o: int) -> bool:
        """Whether ``g`` has more columns than its limit: it must turn dense."""
        return g.rank > self.max_low_rank(o)

    def inverse(self, a: Callable[[], AEigen | None], g: LowRankFactor, o: int,
                reduce_gram: GramReduce | None = None) -> Inverse | None:
        """The inverse of a low-rank G.

        Args:
            a: computes A's eigenpairs (None on solver failure); called after the collective
                of ``reduce_gram``, so that every rank takes part in it.
            g: the low-rank factor (this rank's rows when ``g.rows`` is set).
            o: G's whole dimension.
            reduce_gram: for a row slice, sums a float64 ``(k, k)`` Gram over ranks.
        """
        u = g.factor()
        gram = None
        if reduce_gram is not None:
            wide = u.to(torch.float64)
            gram = reduce_gram(wide.t() @ wide)
        a_eig = a()
        if a_eig is None:
            return None
        if gram is not None:
            return self._rows_inverse(a_eig, u, gram, o, tuple(g.rows))
        if self.damping_mode == "factored":
            return WoodburyInverse(a_eig, u, u.t() @ u, out_features=o)
        eig = lowrank_eigh(u, dtype=self.dtype, device=self.device)
        if eig is None:
            return None
        return eig_inverse(a_eig, *eig, kappa=self.kappa, damping_mode=self.damping_mode,
                           rank=g.rank)

    def _rows_inverse(self, a: AEigen, u: Tensor, gram: Tensor, o: int,
                      rows: tuple[int, int]) -> Inverse | None:
        if self.damping_mode == "factored":
            return WoodburyInverse(a, u, gram.to(u.dtype), out_features=o, rows=rows)
        eig = eigh_psd(gram, device=self.device)
        if eig is None:
            return None
        s, w = eig
        # G's eigenvalues: the min(o, k) largest of the Gram's, 0 on the rest of R^o
        s_g = s[-min(o, s.numel()):]
        rest = float(s.max()) / self.kappa if self.kappa is not None and s.numel() else 0.0
        s_g, clipped = clip_condition(s_g, self.kappa)
        return WoodburyRowsInverse(a, u, s.to(u.dtype), w.to(u.dtype), s_g.to(u.dtype), rest,
                                   out_features=o, rows=rows,
                                   clipped_g=clipped + (max(o - s.numel(), 0) if rest else 0))
