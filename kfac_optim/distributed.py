"""Moving and reducing factor statistics across ranks; no K-FAC mathematics here.

The reduction must be exact (docs/design.md, "Distributed"): R ranks each holding part of a
batch give the same factors as one process holding all of it. So ranks exchange the
*sums* of outer products and the row / loss-term *counts*, never per-rank averages
(ranks can hold different numbers of valid tokens), and a low-rank G's column blocks
are gathered, not their Grams summed (``U_i^T U_j`` cross terms). In the row-sharded
Woodbury mode the column blocks are instead exchanged into row slices of the same columns
(``exchange_to_rows``), after which sums over ranks are exact: ``U^T U = sum_r U^(r)T U^(r)``.

Owner mode (``inverse_workers="owner"``): sums go to one rank per layer (``reduce_symmetric``
with ``dst``), column blocks are gathered to it (``all_gather_columns`` with ``dst``), and
its preconditioned gradients come back to every rank (``broadcast_from_owners``).

Buckets: tensors are packed into flat buffers of at most ``bucket_bytes`` (one tensor
larger than that travels alone; None: one buffer per destination and wire dtype). Every
buffer is issued with ``async_op=True`` as soon as it is packed, then the buffers are
waited on in issue order and unpacked, so that packing and unpacking overlap with the
transfers of other buffers. Sums are unchanged by bucketing (the same values are added).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["resolve_group", "world_size", "group_rank", "reduce_symmetric", "all_reduce_symmetric",
           "all_reduce_counts", "all_gather_columns", "broadcast_from_owners", "assign_greedy",
           "broadcast_tensors", "all_reduce_sum", "row_range", "exchange_to_rows",
           "all_gather_rows", "CommStats"]


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


def group_rank(group: Any) -> int:
    """This process's rank in ``group`` (0 without a group)."""
    return 0 if group is None else dist.get_rank(group)


class CommStats:
    """Bytes of the buffers this rank handed to collectives, per kind, and how many
    collectives of each kind (``calls_by_kind``), for benchmarks and tests.

    Recorded is the buffer this rank hands to the collective (all-reduce, all-gather,
    broadcast), except for ``all_to_all`` (``low_rank_exchange``), where it is the part
    addressed to the other ranks (its own part never leaves the rank).
    """

    def __init__(self) -> None:
        self.bytes: dict[str, int] = {}
        self.calls_by_kind: dict[str, int] = {}
        self.calls = 0

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0) + nbytes
        self.calls_by_kind[kind] = self.calls_by_kind.get(kind, 0) + 1
        self.calls += 1


def _pack(t: Tensor) -> Tensor:
    """Upper triangle of a symmetric (n, n) matrix as a vector; vectors and 0-dim counts
    as vectors."""
    if t.dim() < 2:
        return t.reshape(-1)
    i, j = torch.triu_indices(t.shape[0], t.shape[1], device=t.device)
    return t[i, j]


def _packed_numel(t: Tensor) -> int:
    return t.shape[0] * (t.shape[0] + 1) // 2 if t.dim() == 2 else t.numel()


def _unpack(v: Tensor, like: Tensor) -> Tensor:
    if like.dim() < 2:
        return v.reshape(like.shape).to(like.dtype)
    n = like.shape[0]
    i, j = torch.triu_indices(n, n, device=like.device)
    out = torch.empty_like(like)
    out[i, j] = v.to(like.dtype)
    out[j, i] = v.to(like.dtype)
    return out


def _plan_buckets(keys: list[Any], nbytes: list[int], cap: int | None
                  ) -> list[tuple[Any, list[int]]]:
    """Group item indices by key (first-seen key order, items in order), each group cut
    into buckets of at most ``cap`` bytes (None: no cap); an item larger than ``cap`` is a
    bucket of its own."""
    groups: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    buckets: list[tuple[Any, list[int]]] = []
    for key, items in groups.items():
        current: list[int] = []
        size = 0
        for i in items:
            if current and cap is not None and size + nbytes[i] > cap:
                buckets.append((key, current))
                current, size = [], 0
            current.append(i)
            size += nbytes[i]
        buckets.append((key, current))
    return buckets


def _exchange(buckets: list[tuple[Any, list[int]]], pack, issue, unpack) -> None:
    """Pack and issue every bucket (``issue`` returns an async work handle), then wait on
    them in issue order and unpack: later transfers overlap with earlier unpacking."""
    works = []
    for key, items in buckets:
        flat = pack(key, items)
        works.append((key, items, flat, issue(key, flat)))
    for key, items, flat, work in works:
        work.wait()
        unpack(key, items, flat)


def reduce_symmetric(tensors: list[Tensor], group: Any, *, dst: list[int] | None = None,
                     kind: str = "dense",
                     comm_dtype: torch.dtype | None = None, bucket_bytes: int | None = None,
                     stats: CommStats | None = None) -> list[Tensor | None]:
    """Sum symmetric matrices (and vectors / 0-dim counts) over ranks, in packed buckets.

    Each ``(n, n)`` matrix is sent as its upper triangle (n (n+1) / 2 values), cast to
    ``comm_dtype`` if given; 0-dim counts go in their own float64 buckets so that they
    stay exact. With ``dst`` each tensor is summed onto one rank only (``dist.reduce`` of
    one bucket per destination): the memory-saving owner mode.

    Args:
        tensors: symmetric ``(n, n)`` matrices, ``(n,)`` vectors or 0-dim counts; the
            same shapes, in the same order, on every rank.
        group: process group.
        dst: None (all-reduce: every rank gets every sum) or, per tensor, the group rank
            that receives its sum.
        comm_dtype: dtype on the wire for matrices and vectors (None: the tensors' dtype).
        bucket_bytes: cap on one buffer's bytes (None: one buffer per destination and
            wire dtype).
        kind: the ``CommStats`` entry of the matrices and vectors (``"counts"`` for
            0-dim counts).
        stats: records the buffers' bytes.

    Returns:
        The sums in the input shapes and dtypes; None for a tensor whose ``dst`` is
        another rank.

    Raises:
        ValueError: ``dst`` does not give one rank per tensor.
    """
    if dst is not None and len(dst) != len(tensors):
        raise ValueError(f"dst must give one rank per tensor: {len(dst)} ranks for "
                         f"{len(tensors)} tensors")
    if not tensors:
        return []
    rank = dist.get_rank(group)
    dsts = dst if dst is not None else [None] * len(tensors)
    wire = [torch.float64 if t.dim() == 0 else comm_dtype or t.dtype for t in tensors]
    keys = [(d, t.dim() == 0, w) for d, t, w in zip(dsts, tensors, wire, strict=True)]
    nbytes = [_packed_numel(t) * w.itemsize for t, w in zip(tensors, wire, strict=True)]
    out: list[Tensor | None] = [None] * len(tensors)

    def pack(key, items):
        return torch.cat([_pack(tensors[i]).to(key[2]) for i in items])

    def issue(key, flat):
        if stats is not None:
            stats.add("counts" if key[1] else kind, flat.numel() * flat.element_size())
        if key[0] is None:
            return dist.all_reduce(flat, group=group, async_op=True)
        return dist.reduce(flat, group=group, group_dst=key[0], async_op=True)

    def unpack(key, items, flat):
        if key[0] is not None and key[0] != rank:
            return
        offset = 0
        for i in items:
            n = nbytes[i] // key[2].itemsize
            out[i] = _unpack(flat[offset: offset + n], tensors[i])
            offset += n

    _exchange(_plan_buckets(keys, nbytes, bucket_bytes), pack, issue, unpack)
    return out


def all_reduce_symmetric(tensors: list[Tensor], group: Any, *,
                         comm_dtype: torch.dtype | None = None, bucket_bytes: int | None = None,
                         stats: CommStats | None = None, kind: str = "dense") -> list[Tensor]:
    """``reduce_symmetric`` onto every rank (all-reduce); see there for the arguments."""
    return reduce_symmetric(tensors, group, comm_dtype=comm_dtype, bucket_bytes=bucket_bytes,
                            stats=stats, kind=kind)


def all_reduce_counts(values: Tensor, group: Any, *, kind: str = "counts",
                      stats: CommStats | None = None) -> Tensor:
    """Sum a small tensor of counts or 0/1 flags over ranks in float64 (exact for integers
    below 2^53); any shape, returned in float64."""
    return all_reduce_sum(values.to(torch.float64), group, kind=kind, stats=stats)


def broadcast_from_owners(tensors: list[Tensor], src: list[int], group: Any, *,
                          bucket_bytes: int | None = None, stats: CommStats | None = None,
                          kind: str = "grad_broadcast") -> list[Tensor]:
    """Give every rank rank ``src[i]``'s ``tensors[i]``, in flat buffers per source and dtype.

    Args:
        tensors: on rank ``src[i]`` the value to send, elsewhere a tensor of the same
            shape and dtype that is overwritten; the same shapes, in the same order, on
            every rank.
        src: the group rank that holds each tensor.
        bucket_bytes: cap on one buffer's bytes (None: one buffer per source and dtype).
        stats: records the buffers' bytes under ``kind``.

    Returns:
        ``tensors``, written in place on the receiving ranks.

    Raises:
        ValueError: ``src`` does not give one rank per tensor.
    """
    if len(src) != len(tensors):
        raise ValueError(f"src must give one rank per tensor: {len(src)} ranks for "
                         f"{len(tensors)} tensors")
    rank = dist.get_rank(group)
    keys = [(s, t.dtype) for s, t in zip(src, tensors, strict=True)]
    nbytes = [t.numel() * t.element_size() for t in tensors]

    def pack(key, items):
        if key[0] == rank:
            return torch.cat([tensors[i].reshape(-1) for i in items])
        return torch.empty(sum(tensors[i].numel() for i in items), dtype=key[1],
                           device=tensors[items[0]].device)

    def issue(key, flat):
        if stats is not None:
            stats.add(kind, flat.numel() * flat.element_size())
        return dist.broadcast(flat, group=group, group_src=key[0], async_op=True)

    def unpack(key, items, flat):
        if key[0] == rank:
            return
        offset = 0
        for i in items:
            n = tensors[i].numel()
            tensors[i].copy_(flat[offset: offset + n].reshape(tensors[i].shape))
            offset += n

    _exchange(_plan_buckets(keys, nbytes, bucket_bytes), pack, issue, unpack)
    return tensors


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


def all_gather_columns(block: Tensor, group: Any, *, dst: int | None = None,
                       comm_dtype: torch.dtype | None = None,
                       stats: CommStats | None = None) -> Tensor | None:
    """Concatenate every rank's ``(o, T_r)`` column block into ``(o, sum_r T_r)``.

    Blocks may have different widths: widths are exchanged first and blocks padded to the
    widest ("gather" mode of the Woodbury reduction).

    Args:
        dst: None: every rank gets the result (``all_gather``); a group rank: only that
            rank does (``gather``; owner mode), the others get None.
    """
    r = world_size(group)
    widths = _gather_widths(block, group)
    wire = block.to(comm_dtype or block.dtype)
    padded = torch.zeros(block.shape[0], max(widths), dtype=wire.dtype, device=block.device)
    padded[:, : block.shape[1]] = wire
    if stats is not None:
        stats.add("low_rank_gather", padded.numel() * padded.element_size())
    receives = dst is None or dst == dist.get_rank(group)
    parts = [torch.empty_like(padded) for _ in range(r)] if receives else None
    if dst is None:
        dist.all_gather(parts, padded.contiguous(), group=group)
    else:
        dist.gather(padded.contiguous(), parts, group=group, group_dst=dst)
    if not receives:
        return None
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

