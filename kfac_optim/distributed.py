"""Moving and reducing factor statistics across ranks; no K-FAC mathematics here.

The reduction must be exact (DESIGN.md, "Distributed"): R ranks each holding part of a
batch give the same factors as one process holding all of it. So ranks exchange the
*sums* of outer products and the row / loss-term *counts*, never per-rank averages
(ranks can hold different numbers of valid tokens), and a low-rank G's column blocks
are gathered, not their Grams summed (``U_i^T U_j`` cross terms). In the row-sharded
Woodbury mode the column blocks are instead exchanged into row slices of the same columns
(``exchange_to_rows``), after which sums over ranks are exact: ``U^T U = sum_r U^(r)T U^(r)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["resolve_group", "world_size", "all_reduce_symmetric", "all_reduce_sum",
           "all_gather_columns", "row_range", "exchange_to_rows", "all_gather_rows",
           "assign_greedy", "broadcast_tensors", "CommStats"]


def resolve_group(process_group: Any) -> Any:
    """``"auto"``: the default group when torch.distributed is initialised with more than
    one rank, else None (single process); None: no reduction; else the group itself."""
    if process_group == "auto":
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.group.WORLD
        return None
    return process_group


def world_size(group: Any) -> int:
    return 1 if group is None else dist.get_world_size(group)


class CommStats:
    """Bytes this rank sent per reduction kind, for benchmarks and ``describe``.

    Recorded is the buffer this rank hands to the collective (all-reduce, all-gather,
    broadcast), except for ``all_to_all`` (``low_rank_exchange``), where it is the part
    addressed to the other ranks (its own part never leaves the rank).
    """

    def __init__(self) -> None:
        self.bytes: dict[str, int] = {}
        self.calls = 0

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0) + nbytes
        self.calls += 1


def _pack(t: Tensor) -> Tensor:
    """Upper triangle of a symmetric (n, n) matrix as a vector; vectors pass unchanged."""
    if t.dim() == 1:
        return t
    i, j = torch.triu_indices(t.shape[0], t.shape[1], device=t.device)
    return t[i, j]


def _unpack(v: Tensor, like: Tensor) -> Tensor:
    if like.dim() == 1:
        return v.to(like.dtype)
    n = like.shape[0]
    i, j = torch.triu_indices(n, n, device=like.device)
    out = torch.empty_like(like)
    out[i, j] = v.to(like.dtype)
    out[j, i] = v.to(like.dtype)
    return out


def all_reduce_symmetric(tensors: list[Tensor], group: Any, *,
                         comm_dtype: torch.dtype | None = None,
                         stats: CommStats | None = None, kind: str = "dense") -> list[Tensor]:
    """Sum symmetric matrices (and vectors / scalars) over ranks in one bucket.

    Each ``(n, n)`` matrix is sent as its upper triangle (n (n+1) / 2 values); matrices
    and vectors are concatenated into one flat buffer (cast to ``comm_dtype`` if given)
    and reduced with a single ``all_reduce``; 0-dim counts go in a second, float64 buffer
    so that they stay exact.

    Args:
        tensors: symmetric ``(n, n)`` matrices, ``(n,)`` vectors or 0-dim counts; the
            same shapes, in the same order, on every rank.
        group: process group.
        comm_dtype: dtype on the wire (None: the tensors' dtype).
        kind: the ``CommStats`` entry of the matrices and vectors.

    Returns:
        The reduced tensors, in the input shapes and dtypes.
    """
    if not tensors:
        return []
    counts = [i for i, t in enumerate(tensors) if t.dim() == 0]
    sums = [i for i, t in enumerate(tensors) if t.dim() > 0]
    out: list[Tensor | None] = [None] * len(tensors)
    if counts:  # counts stay exact whatever comm_dtype is: their own float64 bucket
        flat = torch.stack([tensors[i].to(torch.float64) for i in counts])
        if stats is not None:
            stats.add("counts", flat.numel() * flat.element_size())
        dist.all_reduce(flat, group=group)
        for k, i in enumerate(counts):
            out[i] = flat[k].to(tensors[i].dtype)
    if sums:
        packed = [_pack(tensors[i]) for i in sums]
        flat = torch.cat([p.to(comm_dtype or p.dtype) for p in packed])
        if stats is not None:
            stats.add(kind, flat.numel() * flat.element_size())
        dist.all_reduce(flat, group=group)
        offset = 0
        for i, p in zip(sums, packed, strict=True):
            out[i] = _unpack(flat[offset: offset + p.numel()], tensors[i])
            offset += p.numel()
    return out


def all_reduce_sum(tensor: Tensor, group: Any, *, kind: str,
                   stats: CommStats | None = None) -> Tensor:
    """Sum of ``tensor`` (any shape, the same on every rank) over ranks, in its dtype."""
    out = tensor.contiguous().clone()
    if stats is not None:
        stats.add(kind, out.numel() * out.element_size())
    dist.all_reduce(out, group=group)
    return out


def _gather_widths(block: Tensor, group: Any) -> list[int]:
    """Every rank's ``block.shape[1]``, in rank order."""
    width = torch.tensor([block.shape[1]], device=block.device)
    widths = [torch.zeros_like(width) for _ in range(world_size(group))]
    dist.all_gather(widths, width, group=group)
    return [int(w) for w in widths]


def all_gather_columns(block: Tensor, group: Any, *, comm_dtype: torch.dtype | None = None,
                       stats: CommStats | None = None) -> Tensor:
    """Concatenate every rank's ``(o, T_r)`` column block into ``(o, sum_r T_r)``.

    Blocks may have different widths: widths are exchanged first and blocks padded to the
    widest for ``all_gather`` ("gather" mode of the Woodbury reduction).
    """
    r = world_size(group)
    widths = _gather_widths(block, group)
    wire = block.to(comm_dtype or block.dtype)
    padded = torch.zeros(block.shape[0], max(widths), dtype=wire.dtype, device=block.device)
    padded[:, : block.shape[1]] = wire
    parts = [torch.empty_like(padded) for _ in range(r)]
    if stats is not None:
        stats.add("low_rank_gather", padded.numel() * padded.element_size())
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:, :w] for p, w in zip(parts, widths, strict=True)], 1).to(block.dtype)


def row_range(rows: int, rank: int, ranks: int) -> tuple[int, int]:
    """``(start, stop)``: the rows of an ``rows``-row matrix that ``rank`` holds.

    FSDP2's ``Shard(0)`` split (``torch.chunk``): ``ceil(rows / ranks)`` rows per rank, the
    last ranks fewer (possibly none when ``rows < ranks``).
    """
    chunk = -(-rows // ranks)
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


def exchange_to_rows(block: Tensor, group: Any, *, comm_dtype: torch.dtype | None = None,
                     stats: CommStats | None = None) -> Tensor:
    """Turn every rank's column block into this rank's row slice of their concatenation.

    Rank r holds ``B_r`` (o, T_r); the result on rank r is ``[B_1 ... B_R][start:stop]``
    (o_r, sum_s T_s) with ``(start, stop) = row_range(o, r, R)``: one ``all_to_all_single``
    (uneven splits; gloo supports it on CPU) after the widths are exchanged. Each rank sends
    ``(o - o_r) T_r`` values (in ``comm_dtype`` if given) instead of gathering ``o sum T``.
    """
    ranks, rank = world_size(group), dist.get_rank(group)
    o = block.shape[0]
    widths = _gather_widths(block, group)
    sizes = [stop - start for start, stop in (row_range(o, s, ranks) for s in range(ranks))]
    wire = block.to(comm_dtype or block.dtype).contiguous()  # rows are contiguous chunks
    mine = sizes[rank]
    received = torch.empty(mine * sum(widths), dtype=wire.dtype, device=block.device)
    if stats is not None:
        stats.add("low_rank_exchange", (o - mine) * block.shape[1] * wire.element_size())
    dist.all_to_all_single(received, wire.reshape(-1),
                           output_split_sizes=[mine * w for w in widths],
                           input_split_sizes=[n * block.shape[1] for n in sizes], group=group)
    parts = received.split([mine * w for w in widths])
    return torch.cat([p.reshape(mine, w) for p, w in zip(parts, widths, strict=True)],
                     1).to(block.dtype)


def all_gather_rows(rows: Tensor, total: int, group: Any, *,
                    stats: CommStats | None = None, kind: str = "low_rank_rows") -> Tensor:
    """Concatenate every rank's row slice ``(o_r, n)`` (``row_range(total, r, R)``) into
    ``(total, n)``; slices are padded to ``ceil(total / R)`` rows for ``all_gather``."""
    ranks = world_size(group)
    sizes = [stop - start for start, stop in (row_range(total, s, ranks) for s in range(ranks))]
    padded = rows.new_zeros((sizes[0],) + tuple(rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(ranks)]
    if stats is not None:
        stats.add(kind, padded.numel() * padded.element_size())
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])


def assign_greedy(costs: dict[str, float], ranks: int) -> dict[str, int]:
    """Owner rank of each item: largest cost first, to the least loaded rank (LPT rule).

    Deterministic (ties broken by name) so every rank computes the same assignment.
    """
    load = [0.0] * ranks
    owners = {}
    for name, cost in sorted(costs.items(), key=lambda kv: (-kv[1], kv[0])):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += cost
    return owners


def broadcast_tensors(items: dict[str, dict[str, Any]] | None, src: int, group: Any,
                      device: torch.device, stats: CommStats | None = None
                      ) -> dict[str, dict[str, Any]]:
    """Broadcast ``{name: {key: Tensor | plain value}}`` from rank ``src`` to every rank.

    The structure (shapes, dtypes, plain values) travels first as a small object; tensors
    then go in one flat buffer per dtype. Non-source ranks pass ``items=None``.
    """
    rank = dist.get_rank(group)
    global_src = dist.get_global_rank(group, src) if group is not dist.group.WORLD else src
    meta: list[Any] = [None]
    if rank == src:
        meta[0] = {n: {k: (("t", tuple(v.shape), v.dtype)
                           if isinstance(v, Tensor) else ("v", v)) for k, v in d.items()}
                   for n, d in items.items()}
    dist.broadcast_object_list(meta, src=global_src, group=group)
    layout = meta[0]
    by_dtype: dict[torch.dtype, list[tuple[str, str, tuple]]] = {}
    for n, d in layout.items():
        for k, spec in d.items():
            if spec[0] == "t":
                by_dtype.setdefault(spec[2], []).append((n, k, spec[1]))
    out = {n: {k: spec[1] for k, spec in d.items() if spec[0] == "v"} for n, d in layout.items()}
    for dtype, entries in by_dtype.items():
        if rank == src:
            flat = torch.cat([items[n][k].reshape(-1) for n, k, _ in entries])
        else:
            numel = sum(int(torch.Size(shape).numel()) for _, _, shape in entries)
            flat = torch.empty(numel, dtype=dtype, device=device)
        if stats is not None:
            stats.add("inverse_broadcast", flat.numel() * flat.element_size())
        dist.broadcast(flat, src=global_src, group=group)
        offset = 0
        for n, k, shape in entries:
            size = int(torch.Size(shape).numel())
            out[n][k] = flat[offset: offset + size].reshape(shape).clone()
            offset += size
    return out

