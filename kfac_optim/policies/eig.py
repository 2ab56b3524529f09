"""The eig policy: eigendecompose A and a dense G (Martens & Grosse 2015; George et al. 2018).

``A = Q_A diag(s_A) Q_A^T``, ``G = Q_G diag(s_G) Q_G^T``; a gradient ``V`` (o, d) becomes
``Q_G [(Q_G^T V Q_A) / (s_G s_A^T + lambda)] Q_A^T`` (exact damping) or
``(G + lambda_G I)^{-1} V (A + lambda_A I)^{-1}`` (factored, pi-split), formulas in
``kfac_optim.inverse``. ``EigInverse`` also holds a *thin* eigenbasis (o, r < o) of a low-rank
G (the Woodbury policy with exact damping), and, with ``eigenvalue_correction`` (EKFAC), the
running second moments of the gradients in its eigenbasis that replace ``s_G s_A^T``: they
belong to this basis and start anew with every inverse update.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..factors import RunningFactor
from ..inverse import clip_condition, damped_inverses, eigh_psd, precondition_eig
from .base import AEigen, Inverse, Reduce

__all__ = ["EigInverse", "EigPolicy", "eig_inverse"]


class EigInverse(Inverse):
    """Eigenpairs of A and G (full or thin basis of G).

    Args:
        a: A's eigenpairs.
        s_g, q_g: G's eigenvalues (r,) and orthonormal eigenvectors (o, r); r < o is a thin
            basis, G's eigenvalue on its complement being ``s_g_rest``.
        damping_mode: ``"exact"`` or ``"factored"``.
        ekfac: keep EKFAC eigenvalue corrections (needs a full basis and exact damping).
    """

    kind = "eig"

    def __init__(self, a: AEigen, s_g: Tensor, q_g: Tensor, s_g_rest: float, damping_mode: str,
                 *, rank: int, clipped_g: int = 0, ekfac: bool = False) -> None:
        super().__init__(a, out_features=q_g.shape[0], rank=rank, clipped_g=clipped_g)
        self.s_g, self.q_g, self.s_g_rest = s_g, q_g, s_g_rest
        self.damping_mode = damping_mode
        self.corrections = RunningFactor() if ekfac else None
        self._explicit: tuple[float, tuple[Tensor, Tensor]] | None = None

    @property
    def _full(self) -> bool:
        return self.q_g.shape[1] == self.q_g.shape[0]

    def apply(self, grad: Tensor, damping: float, reduce: Reduce | None = None) -> Tensor:
        if self._full and self.damping_mode == "factored":
            # explicit damped inverses: 2 products per step, rebuilt when the damping changes
            if self._explicit is None or self._explicit[0] != damping:
                self._explicit = (damping, damped_inverses(self.q_g, self.s_g, self.a.q,
                                                           self.a.s, damping))
            g_inv, a_inv = self._explicit[1]
            v = g_inv @ grad.to(g_inv.dtype)
            v = v * a_inv if a_inv.dim() == 1 else v @ a_inv
            return v.to(grad.dtype)
        corrected = None if self.corrections is None else self.corrections.value()
        return precondition_eig(grad, self.q_g, self.s_g, self.a.q, self.a.s, damping,
                                self.damping_mode, self.s_g_rest, eigenvalues=corrected)

    @property
    def basis_rank(self) -> int:
        return self.q_g.shape[1]

    def _g_eigenvalues(self) -> tuple[Tensor | None, float]:
        return self.s_g, self.s_g_rest

    def _caches(self) -> tuple:
        return () if self._explicit is None else self._explicit[1]

    def _tensors(self) -> dict[str, Any]:
        c = self.corrections
        return {"s_g": self.s_g, "q_g": self.q_g, "s_g_rest": self.s_g_rest,
                "ekfac_ema": None if c is None else c.ema,
                "ekfac_weight": None if c is None else c.weight,
                "ekfac_updates": None if c is None else c.updates}

    @classmethod
    def from_state(cls, state: dict[str, Any], damping_mode: str) -> EigInverse:
        inv = cls(cls._a_from_state(state), state["s_g"],
                  state["q_g"], float(state["s_g_rest"]), damping_mode,
                  rank=int(state["rank"]), clipped_g=int(state["clipped_G"]),
                  ekfac=state["ekfac_weight"] is not None)
        if inv.corrections is not None:
            inv.corrections.load_state_dict({"ema": state["ekfac_ema"],
                                             "weight": state["ekfac_weight"],
                                             "updates": state["ekfac_updates"]})
        return inv

    @property
    def eigenbasis(self) -> tuple[Tensor | None, Tensor] | None:
        return (self.a.q, self.q_g) if self._full else None

    def update_corrections(self, moments: Tensor, decay: float) -> None:
        if self.corrections is None or not self._full:
            super().update_corrections(moments, decay)
        self.corrections.update(moments, decay)


def eig_inverse(a: AEigen, s_g: Tensor, q_g: Tensor, *, kappa: float | None,
                damping_mode: str, rank: int, ekfac: bool = False) -> EigInverse:
    """``EigInverse`` from G's eigenpairs, clipped at ``max(s_G) / kappa``; on a thin basis
    the complement's eigenvalue 0 is raised to that floor too (and counted as clipped)."""
    rest = 0.0
    if q_g.shape[1] < q_g.shape[0] and kappa is not None and s_g.numel():
        rest = float(s_g.max()) / kappa
    s_g, clipped = clip_condition(s_g, kappa)
    clipped += q_g.shape[0] - q_g.shape[1] if rest else 0
    return EigInverse(a, s_g, q_g, rest, damping_mode, rank=rank, clipped_g=clipped,
                      ekfac=ekfac)


class EigPolicy:
    """Inverses of layers with a dense G: ``eigh`` of A and G, O(d^3 + o^3).

    Args:
        kappa: ``max_condition_number`` (None: no clipping).
        damping_mode: ``"exact"`` or ``"factored"``.
        dtype, device: eigensolver dtype and device (``inv_dtype``, ``inv_device``).
    """

    def __init__(self, *, kappa: float | None, damping_mode: str, dtype: torch.dtype | None,
                 device: torch.device | None) -> None:
        self.kappa, self.damping_mode = kappa, damping_mode
        self.dtype, self.device = dtype, device

    def inverse(self, a: AEigen, g: Tensor, *, ekfac: bool = False,
                eig: tuple[Tensor, Tensor] | None | bool = False) -> EigInverse | None:
        """From A's eigenpairs and the dense bias-corrected G (o, o); None when the
        eigensolver fails in float64 too. ``eig``: G's ``eigh_psd`` result when already
        computed (``kfac_optim.inverse.eigh_psd_many``; None: it failed), False to compute
        it here."""
        if eig is False:
            eig = eigh_psd(g, dtype=self.dtype, device=self.device)
        if eig is None:
            return None
        return eig_inverse(a, *eig, kappa=self.kappa, damping_mode=self.damping_mode,
                           rank=g.shape[0], ekfac=ekfac)
