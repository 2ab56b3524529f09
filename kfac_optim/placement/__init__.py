"""Rank placement: the work plan (``plan``) and the low-rank reduction (``lowrank``).

``make_placement`` builds the plan named by ``inverse_workers`` around the reduction named by
``woodbury_reduction``; a single process is ``Replicate`` with ``GatherReduction`` and no
group (no collective is ever issued). Adding a placement: one class in ``plan.py`` with the
``Replicate`` methods, and its entry in ``PLANS``.
"""

from __future__ import annotations

from typing import Any

from ..distributed import CommStats, world_size
from .lowrank import GatherReduction, RowShardedReduction
from .plan import Assign, Owner, Replicate, inverse_cost

__all__ = ["PLANS", "REDUCTIONS", "make_placement", "Replicate", "Assign", "Owner",
           "GatherReduction", "RowShardedReduction", "inverse_cost"]

PLANS: dict[str, type[Replicate]] = {cls.name: cls for cls in (Replicate, Assign, Owner)}
REDUCTIONS: dict[str, type[GatherReduction]] = {
    cls.name: cls for cls in (GatherReduction, RowShardedReduction)}


def make_placement(options: Any, group: Any, stats: CommStats) -> Replicate:
    """The plan for ``options.inverse_workers`` and ``options.woodbury_reduction`` over
    ``group`` (None or one rank: ``Replicate`` with the gather reduction)."""
    if group is None or world_size(group) == 1:
        return Replicate(group, options,
                         GatherReduction(group, options.comm_dtype, stats), stats)
    lowrank = REDUCTIONS[options.woodbury_reduction](group, options.comm_dtype, stats)
    return PLANS[options.inverse_workers](group, options, lowrank, stats)
