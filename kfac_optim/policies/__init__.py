"""Inverse policies: how each layer's G is represented and inverted.

Two representations compute inverses (one module each): ``eig`` (dense G, ``EigPolicy``)
and ``woodbury`` (low-rank G, ``WoodburyPolicy``, with the truncated EMA and the row-sharded
math). The ``inverse_policy`` option names a *chooser* over them (this module): which
layers start with a low-rank G, and after how many columns one turns dense. All choosers
give the same preconditioned gradient on the same factors, to solver tolerance.

- ``"eig"``: every G dense.
- ``"woodbury"``: every G low-rank until ``woodbury_max_rank`` columns.
- ``"auto"``: low-rank while its columns k <= ``auto_rho`` o and k <= ``auto_t_max`` (and
  ``woodbury_max_rank``), dense after: Woodbury costs O(o k^2 + k^3) against eig's O(o^3);
  rho = 0.75 from the crossover measured by ``benchmarks/inverse_policies.py`` (at k = o
  Woodbury's inverse was 1.86x slower than eig, at k = 0.75 o 0.88x).
- ``"hybrid"``: low-rank for layers with o >= ``hybrid_min_out`` (the head), dense elsewhere.

Adding a representation: one module with an ``Inverse`` subclass (``base.py``) and its entry
in ``INVERSES``; adding a chooser: one ``Chooser`` subclass and its entry in ``POLICIES``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..factors import LowRankFactor, RunningFactor
from .base import AEigen, Inverse, eigen_a
from .eig import EigInverse, EigPolicy
from .woodbury import WoodburyInverse, WoodburyPolicy, WoodburyRowsInverse

__all__ = ["Chooser", "POLICIES", "INVERSES", "Inverse", "AEigen", "eigen_a", "make_policy",
           "inverse_from_state", "EigPolicy", "WoodburyPolicy"]

INVERSES: dict[str, type[Inverse]] = {
    cls.kind: cls for cls in (EigInverse, WoodburyInverse, WoodburyRowsInverse)}


def inverse_from_state(state: dict[str, Any], damping_mode: str) -> Inverse:
    """The ``Inverse`` a ``state_dict()`` describes (its ``kind`` picks the class).

    Raises:
        ValueError: unknown ``kind`` (naming the accepted ones).
    """
    kind = state.get("kind")
    if kind not in INVERSES:
        raise ValueError(f"K-FAC inverse state of kind {kind!r}; accepted kinds: "
                         f"{sorted(INVERSES)}")
    return INVERSES[kind].from_state(state, damping_mode)


class Chooser:
    """Which representation each layer's G has, given its output dimension o.

    Args:
        options: a ``KFACOptions``.
    """

    name: ClassVar[str]

    def __init__(self, options: Any) -> None:
        self.options = options
        solver = dict(kappa=options.max_condition_number, damping_mode=options.damping_mode,
                      dtype=options.inv_dtype, device=options.inv_device)
        self.eig = EigPolicy(**solver)
        self.woodbury = WoodburyPolicy(max_low_rank=self.max_low_rank,
                                       truncate_rank=options.woodbury_rank, **solver)

    def starts_low_rank(self, o: int) -> bool:
        """Whether a layer with o outputs starts with a low-rank (Woodbury) G."""
        return False

    def max_low_rank(self, o: int) -> int:
        """Columns past which a low-rank G of a layer with o outputs becomes dense."""
        return self.options.woodbury_max_rank

    def expected_rank(self, o: int) -> int:
        """G's rank at its most expensive, for load balancing: o for a dense G, else the
        column limit (capped at o)."""
        return min(o, self.max_low_rank(o)) if self.starts_low_rank(o) else o

    def new_factor(self, o: int, storage_dtype: Any, rows: tuple[int, int] | None
                   ) -> RunningFactor | LowRankFactor:
        """An empty G for a layer with o outputs: low-rank (``rows``: this rank's rows of a
        row-sharded U) or dense (stored in ``storage_dtype``)."""
        if self.starts_low_rank(o):
            return self.new_low_rank(rows)
        return RunningFactor(storage_dtype)

    def new_low_rank(self, rows: tuple[int, int] | None = None) -> LowRankFactor:
        """An empty low-rank G with the ``woodbury_*`` storage options."""
        opts = self.options
        return LowRankFactor(opts.woodbury_dtype, opts.woodbury_store_device,
                             opts.woodbury_store_threshold_bytes, rows=rows)


class EigChooser(Chooser):
    name = "eig"


class WoodburyChooser(Chooser):
    name = "woodbury"

    def starts_low_rank(self, o: int) -> bool:
        return True


class AutoChooser(WoodburyChooser):
    name = "auto"

    def max_low_rank(self, o: int) -> int:
        opts = self.options
        return min(opts.woodbury_max_rank, opts.auto_t_max, int(opts.auto_rho * o))


class HybridChooser(Chooser):
    name = "hybrid"

    def starts_low_rank(self, o: int) -> bool:
        return o >= self.options.hybrid_min_out


POLICIES: dict[str, type[Chooser]] = {
    cls.name: cls for cls in (EigChooser, WoodburyChooser, AutoChooser, HybridChooser)}


def make_policy(options: Any) -> Chooser:
    """The chooser named by ``options.inverse_policy``."""
    return POLICIES[options.inverse_policy](options)
