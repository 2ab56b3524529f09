"""How a low-rank (Woodbury) G is reduced across ranks: ``gather`` or ``row_sharded``.

The global Gram of a low-rank G has cross terms ``U_i^T U_j``, so per-rank Grams cannot be
summed (docs/design.md, "Distributed"). ``GatherReduction`` all-gathers every rank's column
block: each rank then holds the whole U (o, k). ``RowShardedReduction`` exchanges the blocks
into row slices of the same columns (``all_to_all``): each rank holds rows
``row_range(o, rank, R)`` (the FSDP2 ``Shard(0)`` split), the Gram is the all-reduced sum of
the slices' Grams (float64), ``U^T V`` is all-reduced at every step and the rows of the
update are all-gathered. Both own their collectives (``kfac_optim.distributed``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor

from ..distributed import (
    CommStats,
    all_gather_columns,
    all_gather_rows,
    all_reduce_sum,
    all_reduce_symmetric,
    exchange_to_rows,
    row_range,
)
from ..layer import KFACLayer

__all__ = ["GatherReduction", "RowShardedReduction"]


class GatherReduction:
    """Every rank holds the whole U; a single process is this with no group.

    Args:
        group: the process group (None: one process).
        comm_dtype: wire dtype of the column blocks (None: theirs).
        stats: records bytes per collective.
    """

    name = "gather"

    def __init__(self, group: Any, comm_dtype: torch.dtype | None, stats: CommStats) -> None:
        self.group, self.comm_dtype, self.stats = group, comm_dtype, stats

    def rows_for(self, o: int) -> tuple[int, int] | None:
        """This rank's rows of a low-rank G with o rows (None: all of them)."""
        return None

    def reduce_block(self, layer: KFACLayer, block: Tensor, dst: int | None) -> Tensor | None:
        """Every rank's ``(o, T_r)`` column block -> ``(o, sum T_r)`` (on ``dst`` only when
        given, None elsewhere)."""
        return all_gather_columns(block, self.group, dst=dst, comm_dtype=self.comm_dtype,
                                  stats=self.stats)

    def agree(self, finite: Tensor) -> Tensor:
        """Per-layer finiteness flags that every rank agrees on (whole U: already equal)."""
        return finite

    def gram_reducer(self, layer: KFACLayer, kind: str = "inverse"
                     ) -> Callable[[Tensor], Tensor] | None:
        """Sums a float64 Gram of ``layer``'s rows over ranks (None: U is whole)."""
        return None

    def gather_rows(self, layer: KFACLayer) -> None:
        """Make a row-sharded G whole (every rank's rows), before it turns dense."""

    def precondition(self, layer: KFACLayer, grad: Tensor, damping: float) -> Tensor:
        """``layer``'s preconditioned gradient ``(o, d)``."""
        return layer.inverse.apply(grad, damping)


class RowShardedReduction(GatherReduction):
    """Each rank holds its rows of every low-rank G (several ranks only)."""

    name = "row_sharded"

    def __init__(self, group: Any, comm_dtype: torch.dtype | None, stats: CommStats) -> None:
        import torch.distributed as dist

        super().__init__(group, comm_dtype, stats)
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)

    def rows_for(self, o: int) -> tuple[int, int] | None:
        return row_range(o, self.rank, self.world)

    def reduce_block(self, layer: KFACLayer, block: Tensor, dst: int | None) -> Tensor | None:
        if not layer.row_sharded:
            return super().reduce_block(layer, block, dst)
        return exchange_to_rows(block, self.group, comm_dtype=self.comm_dtype, stats=self.stats)

    def agree(self, finite: Tensor) -> Tensor:
        # row slices differ: every rank must skip the same layers
        bad = all_reduce_sum((~finite).to(torch.int32), self.group, kind="counts",
                             stats=self.stats)
        return bad == 0

    def gram_reducer(self, layer: KFACLayer, kind: str = "inverse"
                     ) -> Callable[[Tensor], Tensor] | None:
        """``kind="inverse"``: a packed symmetric all-reduce; ``"truncate"``: a plain one."""
        if not layer.row_sharded:
            return None
        if kind == "truncate":
            return partial(all_reduce_sum, group=self.group, kind="low_rank_gram",
                           stats=self.stats)
        return lambda gram: all_reduce_symmetric([gram], self.group, stats=self.stats,
                                                 kind="low_rank_gram")[0]

    def gather_rows(self, layer: KFACLayer) -> None:
        if layer.row_sharded:
            layer.g.cols = all_gather_rows(layer.g.cols, layer.capture.out_features, self.group,
                                           stats=self.stats)
            layer.g.rows = None

    def precondition(self, layer: KFACLayer, grad: Tensor, damping: float) -> Tensor:
        """This rank's rows of the preconditioned ``grad`` (o, d), then all of them: the
        ``(k, d)`` products ``U^(r)T V^(r)`` are summed over ranks."""
        inv = layer.inverse
        if inv.rows is None:
            return super().precondition(layer, grad, damping)
        start, stop = inv.rows
        reduce = partial(all_reduce_sum, group=self.group, kind="low_rank_utv",
                         stats=self.stats)
        rows = inv.apply(grad[start:stop], damping, reduce=reduce)
        return all_gather_rows(rows, layer.capture.out_features, self.group, stats=self.stats)
