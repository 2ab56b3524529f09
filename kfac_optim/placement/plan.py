"""The work plan across ranks: who reduces, inverts and preconditions each layer.

- ``Replicate`` (``inverse_workers="replicate"``; a single process is this at world size 1):
  factor sums are all-reduced, every rank computes every inverse and preconditions every
  gradient; no communication after the reduction.
- ``Assign`` (``"assign"``): as replicate, but each layer's inverse is computed by one rank
  (greedy by cost, KAISA's trade-off, Pauloski et al. 2021) and broadcast; row-sharded
  low-rank layers need every rank's rows and stay with every rank.
- ``Owner`` (``"owner"``, KAISA's MEM-OPT): each layer has one owner (greedy by expected
  cost, fixed at construction); sums are reduced onto it, only it keeps the layer's factors
  and inverse and preconditions, and the result is broadcast at every step.

Every plan owns its collectives (``kfac_optim.distributed``) and its low-rank reduction
(``kfac_optim.placement.lowrank``); the preconditioner calls the same methods in every mode.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..capture import accumulation_dtype
from ..distributed import (
    CommStats,
    all_reduce_counts,
    all_reduce_sum,
    all_reduce_symmetric,
    assign_greedy,
    broadcast_from_owners,
    broadcast_tensors,
    group_rank,
    reduce_symmetric,
    world_size,
)
from ..layer import KFACLayer, compute_inverses
from ..policies import Chooser, Inverse, inverse_from_state
from .lowrank import GatherReduction

__all__ = ["Replicate", "Assign", "Owner", "inverse_cost"]

Results = list[tuple[KFACLayer, Tensor, Tensor]]


# Options that may differ between ranks: objects, and where a rank keeps its tensors.
RANK_LOCAL_OPTIONS = ("process_group", "grad_scaler", "inv_device", "woodbury_store_device",
                      "woodbury_store_threshold_bytes")


def fingerprint(options: Any, layers: dict[str, KFACLayer], step: int = 0) -> dict[str, str]:
    """What every rank must agree on: each option that affects the collectives or the
    mathematics (all but ``RANK_LOCAL_OPTIONS``), and the layers' names, kinds and shapes.
    A schedule (``factor_decay``, ``factor_update_steps``, ``inv_update_steps`` given as a
    callable) counts by its value at ``step`` (``KFACOptions.at``), not by the callable,
    whose repr differs between processes."""
    out = {f.name: repr(options.at(f.name, step)) for f in fields(options)
           if f.name not in RANK_LOCAL_OPTIONS}
    out["layers"] = repr([(name, la.capture.kind, la.capture.out_features,
                           la.capture.in_features) for name, la in layers.items()])
    return out


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def inverse_cost(layer: KFACLayer, k: int) -> float:
    """Work of one inverse update with G's rank ``k``: O(d^3 + o k^2) (k = o: dense eig;
    a diagonal A costs nothing): what ``assign_greedy`` balances."""
    d, o = layer.capture.in_features, layer.capture.out_features
    return (0 if layer.capture.diagonal_a else d**3) + o * k * k


class Replicate:
    """Every rank holds and computes everything (see the module docstring).

    Args:
        group: the process group, or None for a single process.
        options: the ``KFACOptions``.
        lowrank: the low-rank reduction (``GatherReduction`` or ``RowShardedReduction``).
        stats: records bytes per collective.
    """

    name = "replicate"

    def __init__(self, group: Any, options: Any, lowrank: GatherReduction,
                 stats: CommStats) -> None:
        self.group, self.options, self.lowrank, self.stats = group, options, lowrank, stats
        self.rank, self.world = group_rank(group), world_size(group)

    def setup(self, layers: dict[str, KFACLayer], policy: Chooser) -> None:
        """Called once the layers exist (owner mode assigns them)."""

    def check_agreement(self, layers: dict[str, KFACLayer]) -> None:
        """Compare the options and the layer structure (``fingerprint``) across ranks, once
        at construction (``all_gather_object``, collective): ranks that disagree would
        silently train different models or fail inside a collective with a size mismatch.
        Per-step values (``step(lr=, damping=, kl_clip=)``, a ``KFAC`` optimizer's param
        groups) are not checked; a schedule is compared by its value at step 0
        (``fingerprint``): it must be the same function of the step on every rank.

        Raises:
            ValueError: on every rank, naming each option (or ``layers``) that differs and
                every rank's value.
        """
        self.check_same(fingerprint(self.options, layers))

    def check_same(self, mine: dict[str, str]) -> None:
        """Compare ``mine`` (name -> repr of a setting) across ranks (collective with a
        group; ``check_agreement``, and ``KFAC``'s damping adaptation settings).

        Raises:
            ValueError: on every rank, naming each setting that differs and every rank's
                value.
        """
        if self.group is None:
            return
        every: list[Any] = [None] * self.world
        dist.all_gather_object(every, mine, group=self.group)
        differ = [key for key in mine if any(fp[key] != mine[key] for fp in every)]
        if differ:
            lines = "; ".join(
                f"{key}: " + ", ".join(f"rank {r}: {_short(fp[key])}" for r, fp in enumerate(every))
                for key in differ)
            raise ValueError(f"K-FAC options or layers differ between ranks (every rank must "
                             f"build K-FAC with the same options on the same model): {lines}")

    def owner(self, layer: KFACLayer) -> int | None:
        """The rank that holds ``layer``'s factors alone, or None (every rank)."""
        return None

    def owns(self, layer: KFACLayer) -> bool:
        """Whether this rank keeps the layer's factors and inverse."""
        owner = self.owner(layer)
        return owner is None or owner == self.rank

    @property
    def owners(self) -> dict[str, int] | None:
        return None

    # Reduction -----------------------------------------------------------------
    def reduce_statistics(self, layers: dict[str, KFACLayer], steps: int = 0) -> None:
        """Sum every layer's pending statistics over ranks (docs/design.md, "Distributed").

        Every rank contributes every layer, zeros where it saw no rows, so the collective
        calls match; dense sums and counts travel in packed buckets, low-rank G blocks go
        through the low-rank reduction. A layer no rank saw is left with nothing pending.
        With owners the sums and blocks go to the layer's owner only; the others drop them.

        The float64 counts also carry each rank's step count ``steps`` (and its square) and
        whether it captured statistics since its last step, so that a rank out of step
        (an extra ``step()`` call, a checkpoint of another step) fails here on every rank
        instead of blocking a peer in a later collective until the group's timeout.

        Raises:
            RuntimeError: the ranks' step counts differ, or some ranks captured no
                statistics since their last step (a ``step()`` without forward/backward).
        """
        if self.group is None:
            return
        opts = self.options
        fresh = float(any(la.a.pending or la.g.pending for la in layers.values()))
        dense, low_rank, dsts = [], [], []
        for layer in layers.values():
            cap = layer.capture
            dtype, dev = accumulation_dtype(cap, opts.factor_dtype), cap.weight.device
            d, o = cap.in_features, cap.out_features
            if not layer.a.pending:
                shape = (d,) if cap.diagonal_a else (d, d)
                layer.a.add_sum(torch.zeros(shape, dtype=dtype, device=dev), 0.0)
            if not layer.g.pending:
                layer.g.add(torch.zeros(0, o, dtype=dtype, device=dev), 0.0)
            sums = [layer.a.pending_sum, layer.a.pending_count, layer.g.pending_count]
            if layer.low_rank:
                low_rank.append(layer)
            else:
                sums.append(layer.g.pending_sum)
            dense += sums
            dsts += [self.owner(layer)] * len(sums)
        check = [torch.tensor(float(v), dtype=torch.float64) for v in (steps, steps**2, fresh)]
        out = reduce_symmetric(
            dense + check, self.group, dst=None if self.owners is None else dsts + [None] * 3,
            comm_dtype=opts.comm_dtype, bucket_bytes=opts.comm_bucket_bytes, stats=self.stats)
        self._check_in_step(steps, fresh, *(float(t) for t in out[len(dense):]))
        reduced = iter(out[:len(dense)])
        for layer in layers.values():  # None where another rank owns the layer
            layer.a.pending_sum, layer.a.pending_count = next(reduced), next(reduced)
            layer.g.pending_count = next(reduced)
            if not layer.low_rank:
                layer.g.pending_sum = next(reduced)
        for layer in low_rank:
            block = torch.cat(layer.g.pending_rows).t()
            reduced_block = self.lowrank.reduce_block(layer, block, self.owner(layer))
            layer.g.pending_rows = [] if reduced_block is None else [reduced_block.t()]
        kept = [layer for layer in layers.values() if self.owns(layer)]
        seen = [layer.a.pending_count > 0 for layer in kept]
        for layer, ok in zip(kept, torch.stack(seen).tolist() if seen else [], strict=True):
            if not ok:
                layer.a.take_batch()
                layer.g.take_batch()
                if layer.ekfac_rows:
                    layer.ekfac_rows.clear()

    def _check_in_step(self, steps: int, fresh: float, total: float, squares: float,
                       fed: float) -> None:
        """Raises RuntimeError unless every rank is at step ``steps`` (sums of the steps and
        of their squares equal to R times this rank's: no variance) and every rank or none
        captured statistics (``fed`` ranks did)."""
        world = self.world
        if total != world * steps or squares != world * steps**2:
            others = (f"rank {1 - self.rank} is at step {int(total) - steps}" if world == 2 else
                      f"the {world} ranks' step counts sum to {int(total)}, not {world * steps}")
            raise RuntimeError(
                f"K-FAC ranks out of step: rank {self.rank} is at step {steps}, {others}. Every "
                "rank must call step() the same number of times, and resume from the same "
                "step's checkpoint")
        if fed not in (0.0, float(world)):
            raise RuntimeError(
                f"K-FAC ranks out of step at step {steps}: {int(fed)} of {world} ranks captured "
                f"statistics since their last step (this rank, {self.rank}: "
                f"{'yes' if fresh else 'no'}); a rank called step() without a forward/backward "
                "(an extra step() call?): every rank must call step() after each of its "
                "forward/backward passes, the same number of times")

    def reduce_moments(self, moments: Tensor) -> Tensor:
        """EKFAC's eigenbasis second moments (o, d) summed over ranks."""
        if self.group is None:
            return moments
        (flat,) = all_reduce_symmetric([moments.reshape(-1)], self.group,
                                       bucket_bytes=self.options.comm_bucket_bytes,
                                       stats=self.stats)
        return flat.reshape(moments.shape)

    def mean_over_ranks(self, value: Tensor) -> Tensor:
        """The mean over ranks of a rank-local value (a closure's loss on this rank's
        batch), the same on every rank (collective with a group)."""
        if self.group is None:
            return value
        return all_reduce_sum(value, self.group, kind="damping_adaptation",
                              stats=self.stats) / self.world

    def sum_over_owners(self, value: Tensor) -> Tensor:
        """A sum over layers that each rank computed over the layers it holds
        (``owns``), made whole on every rank: here every rank holds every layer."""
        return value

    # Inverses ------------------------------------------------------------------
    def compute_inverses(self, layers: list[KFACLayer]) -> dict[str, Inverse | None]:
        """The new inverse of every layer in ``layers`` (None where a solver failed)."""
        return compute_inverses(layers, self.lowrank.gram_reducer)

    # Preconditioning -----------------------------------------------------------
    def layer_damping(self, layer: KFACLayer, damping: float) -> float:
        """The lambda ``layer``'s inverse applies this step: ``damping``, times the inverse's
        ``kronecker_mean()`` under ``damping_scale="relative"`` (when that is > 0 and
        finite)."""
        if self.options.damping_scale == "absolute" or layer.inverse is None:
            return damping
        mean = layer.inverse.kronecker_mean()
        return damping * mean if math.isfinite(mean) and mean > 0 else damping

    def precondition(self, layers: dict[str, KFACLayer], damping: float) -> Results:
        """``(layer, V, V_pre)`` for every layer with an inverse and a new gradient."""
        results = []
        for layer in layers.values():
            cap = layer.capture
            if layer.inverse is None or not layer.has_new_grad():
                continue
            grad = cap.grad_matrix()
            results.append((layer, grad, self.lowrank.precondition(
                layer, grad, self.layer_damping(layer, damping))))
        return results

    # State -----------------------------------------------------------------------
    def state(self) -> dict | None:
        """What ``state_dict()["owners"]`` records (None: every rank holds every layer)."""
        return None

    def check_state(self, saved: dict | None) -> None:
        """Raises:
            RuntimeError: an owner-mode state loaded without owner mode.
        """
        if saved is not None:
            raise RuntimeError(
                f"K-FAC state was saved by rank {saved['rank']} in inverse_workers='owner' mode "
                "and holds only that rank's layers: load it with inverse_workers='owner' on "
                "the same rank and number of ranks")


class Assign(Replicate):
    """Each layer's inverse computed by one rank and broadcast."""

    name = "assign"

    def compute_inverses(self, layers: list[KFACLayer]) -> dict[str, Inverse | None]:
        # a row-sharded layer's inverse needs every rank's rows: not assigned
        results = super().compute_inverses([la for la in layers if la.row_sharded])
        assigned = [la for la in layers if not la.row_sharded]
        costs = {la.name: inverse_cost(la, la.g.rank if la.low_rank else la.capture.out_features)
                 for la in assigned}
        owners = assign_greedy(costs, self.world)
        mine = super().compute_inverses([la for la in assigned if owners[la.name] == self.rank])
        device = assigned[0].capture.weight.device if assigned else torch.device("cpu")
        mode = self.options.damping_mode
        for src in range(self.world):
            payload = None
            if src == self.rank:
                payload = {n: ({"failed": True} if inv is None else inv.state_dict())
                           for n, inv in mine.items()}
            got = broadcast_tensors(payload, src, self.group, device, stats=self.stats)
            results.update({n: None if s.get("failed") else inverse_from_state(s, mode)
                            for n, s in got.items()})
        return results


class Owner(Replicate):
    """One owner rank per layer holds its factors and inverse (memory saving)."""

    name = "owner"

    def setup(self, layers: dict[str, KFACLayer], policy: Chooser) -> None:
        """Owners greedy by the expected inverse cost (a low-rank G at its column limit,
        the most it costs before turning dense)."""
        costs = {name: inverse_cost(layer, policy.expected_rank(layer.capture.out_features))
                 for name, layer in layers.items()}
        self._owners = assign_greedy(costs, self.world)

    def owner(self, layer: KFACLayer) -> int | None:
        return self._owners[layer.name]

    @property
    def owners(self) -> dict[str, int] | None:
        return dict(self._owners)

    def sum_over_owners(self, value: Tensor) -> Tensor:
        """Each rank summed its own layers: all-reduced (collective)."""
        return all_reduce_sum(value, self.group, kind="damping_adaptation", stats=self.stats)

    def precondition(self, layers: dict[str, KFACLayer], damping: float) -> Results:
        """Each layer's owner preconditions its gradient, then broadcasts it.

        One float64 all-reduce of per-layer flags first makes every rank agree on which
        layers are ready (the owner has an inverse, every rank a gradient) and on the form
        of each G: a low-rank G that outgrew its column limit turned dense on its owner,
        and the other ranks follow so that the next reduction sends the same tensors.
        Every rank gathers the ready layers' full gradients in the same order (FSDP2's
        gathers are collectives).
        """
        items = list(layers.values())
        flags = all_reduce_counts(torch.tensor(
            [[float(self.owns(la) and la.inverse is not None), float(la.has_new_grad()),
              float(self.owns(la) and not la.low_rank)] for la in items]),
            self.group, kind="flags", stats=self.stats)
        ready = []
        for layer, (has_inv, grads, dense) in zip(items, flags.tolist(), strict=True):
            if dense:
                layer.densify()
            if has_inv and grads == self.world:
                ready.append(layer)
        results = []
        for layer in ready:
            grad = layer.capture.grad_matrix()
            pre = (self.lowrank.precondition(layer, grad, self.layer_damping(layer, damping))
                   .to(grad.dtype)
                   if self.owns(layer) else torch.empty_like(grad))
            results.append((layer, grad, pre))
        broadcast_from_owners([pre for _, _, pre in results], [self.owner(la) for la in ready],
                              self.group, bucket_bytes=self.options.comm_bucket_bytes,
                              stats=self.stats)
        return results

    def state(self) -> dict | None:
        return {"rank": self.rank, "layers": dict(self._owners)}

    def check_state(self, saved: dict | None) -> None:
        """An owner-mode state holds one rank's layers: it loads only on that rank, with the
        same assignment, in owner mode.

        Raises:
            RuntimeError: saved on another rank or with another assignment.
        """
        if saved is None:
            return
        if saved["rank"] != self.rank or saved["layers"] != self._owners:
            raise RuntimeError(
                f"K-FAC owner-mode state of rank {saved['rank']} (owners {saved['layers']}) "
                f"loaded on rank {self.rank} (owners {self._owners}): load each rank's own "
                "state with the same number of ranks")
