"""KFACPreconditioner: update schedule, reduction, inverses, preconditioning, KL clip, state.

Data flows one way (DESIGN.md): module hooks (``capture``) -> per-layer statistics
(``layers``, ``factors``) -> reduction across ranks (``distributed``) -> running factors ->
eigendecompositions / Woodbury solves (``inverse``) -> preconditioned gradients written
back into ``p.grad``. This module orchestrates those stages.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from .capture import StatisticsCapture, accumulation_dtype
from .distributed import (
    CommStats,
    all_gather_columns,
    all_gather_rows,
    all_reduce_counts,
    all_reduce_sum,
    all_reduce_symmetric,
    assign_greedy,
    broadcast_from_owners,
    broadcast_tensors,
    exchange_to_rows,
    group_rank,
    reduce_symmetric,
    resolve_group,
    row_range,
    world_size,
)
from .factors import (
    LowRankFactor,
    RunningFactor,
    eigenbasis_second_moments,
)
from .inverse import (
    clip_condition,
    damped_inverses,
    eigh_psd,
    factored_damping,
    lowrank_eigh,
    precondition_eig,
    precondition_woodbury_exact,
    precondition_woodbury_factored,
    robust_cholesky,
)
from .layers import LayerCapture, capture_for, fsdp1_root, is_supported, strip_wrapper_names
from .options import KFACOptions, check_kl_clip, check_nonneg

__all__ = ["KFACPreconditioner"]

log = logging.getLogger("kfac_optim")


class _Layer:
    """Per-layer state: capture view, running factors, last good inverse, diagnostics.

    ``inv`` holds what preconditioning needs, computed at the last inverse update:
    ``s_a, q_a`` (A's eigenpairs; ``q_a`` None for a diagonal A) and either
    ``s_g, q_g, s_g_rest`` (G's eigenpairs, full or thin) or, for a low-rank G with
    factored damping, ``u, gram, trace_g`` (Woodbury). Row-sharded (``rows`` set: this
    rank's ``(start, stop)`` of G's rows) it holds ``u_rows`` and this rank's rows ``u`` of
    U, with ``gram, trace_g`` (factored) or the Gram's eigenpairs ``gram_s, gram_w`` and
    ``s_g, s_g_rest`` (exact; ``s_g``: G's min(o, k) largest eigenvalues, for diagnostics).
    """

    def __init__(self, capture: LayerCapture, opts: KFACOptions,
                 rows: tuple[int, int] | None = None):
        self.capture = capture
        self.opts = opts
        self.rows = rows
        self.a = RunningFactor(opts.factor_dtype if opts.factor_dtype in _HALF else None)
        if opts.uses_low_rank_g(capture.out_features):
            self.g: RunningFactor | LowRankFactor = self.new_low_rank()
        else:
            self.g = RunningFactor(self.a.storage_dtype)
        self.inv: dict[str, Any] | None = None
        self.solver: tuple | None = None  # cached Cholesky of the Woodbury system
        # EKFAC: rows of the capture step, turned into second moments in the eigenbasis
        # once step() has updated the basis; EMA reset whenever the basis changes.
        ekfac = opts.eigenvalue_correction and not self.low_rank
        self.ekfac_rows: list | None = [] if ekfac else None
        self.ekfac: RunningFactor | None = RunningFactor() if ekfac else None
        self.basis = 0  # number of inverse updates so far: identifies the eigenbasis
        self.ekfac_basis = -1
        self.nonfinite_skips = 0
        self.warned = False
        self.positional = False
        self.diag: dict[str, Any] = {}

    def new_low_rank(self) -> LowRankFactor:
        opts = self.opts
        return LowRankFactor(opts.woodbury_dtype, opts.woodbury_store_device,
                             opts.woodbury_store_threshold_bytes, rows=self.rows)

    @property
    def low_rank(self) -> bool:
        return isinstance(self.g, LowRankFactor)

    @property
    def row_sharded(self) -> bool:
        """Whether G is a low-rank factor of which this rank holds a row slice."""
        return self.low_rank and self.g.rows is not None

    def state_dict(self) -> dict:
        return {
            "A": self.a.state_dict(),
            "G": self.g.state_dict(),
            "G_low_rank": self.low_rank,
            "inv": None if self.inv is None else dict(self.inv),
            "ekfac": None if self.ekfac is None else self.ekfac.state_dict(),
            "basis": self.basis,
            "ekfac_basis": self.ekfac_basis,
            "nonfinite_skips": self.nonfinite_skips,
            "positional": self.positional,
        }


_HALF = (torch.float16, torch.bfloat16)


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / FSDP1 wrappers (its forward sees the call's kwargs)."""
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, DistributedDataParallel) or (
            type(model).__name__ == "FullyShardedDataParallel" and hasattr(model, "module")):
        model = model.module
    return model


def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size() if isinstance(t, Tensor) else 0


def _inverse_cost(layer: _Layer, k: int) -> float:
    """Work of one inverse update with G's rank ``k``: O(d^3 + o k^2) (k = o: dense eig;
    a diagonal A costs nothing): what ``assign_greedy`` balances."""
    d, o = layer.capture.in_features, layer.capture.out_features
    return (0 if layer.capture.diagonal_a else d**3) + o * k * k


def _condition(s: Tensor, rest: float = 0.0, dim: int | None = None) -> float:
    """max / min eigenvalue, the complement of a thin basis counting as ``rest``."""
    if s.numel() == 0:
        return float("inf")
    lo = float(s.min())
    if dim is not None and s.numel() < dim:
        lo = min(lo, rest)
    return float(s.max()) / lo if lo > 0 else float("inf")


def _fmt(row: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in row.items())


def _to_device(state: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in state.items()}


class KFACPreconditioner:
    """K-FAC preconditioner: rewrites ``p.grad`` of supported layers in place.

    Usage::

        pre = KFACPreconditioner(model, lr=0.1)
        loss.backward(); pre.step(); optimizer.step()

    For each supported layer (``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding``, Hugging
    Face ``Conv1D``) with weight gradient ``V`` (o, d), bias as the last column, the
    step replaces ``V`` by ``nu * (A (x) G + lambda I)^{-1} vec(V)`` (exact damping)
    or ``nu * (G + lambda_G I)^{-1} V (A + lambda_A I)^{-1}`` (factored damping),
    where A (d, d) and G (o, o) are bias-corrected EMAs of the batch factors
    ``A = (1/T) sum a a^T`` and ``G = (1/N) sum g g^T`` (``kfac_optim.factors``) and
    ``nu = min(1, sqrt(kl_clip / (lr^2 sum_layers <V_pre, V>)))`` is the KL clip of
    Ba, Grosse & Martens (2017). Parameters of other modules are left unchanged.

    Args:
        model: the model (a ``DistributedDataParallel`` wrapper is unwrapped). Sharded:
            FSDP2 (``fully_shard``, before or after building K-FAC), or FSDP1
            (``FullyShardedDataParallel``) with ``use_orig_params=True``, K-FAC built on
            the wrapper: construction and each ``step()`` then gather the whole model's
            parameters and gradients (``summon_full_params(with_grads=True)``, collective:
            every rank calls them) and write back only this rank's shard.
        damping: lambda >= 0 (Tikhonov damping; units of the Fisher of the mean loss).
        damping_mode: ``"exact"`` or ``"factored"`` (Martens & Grosse 2015, pi-split).
        factor_decay: EMA decay in [0, 1) of A and G; bias-corrected.
        factor_update_steps: capture statistics and update factors every k steps.
        inv_update_steps: recompute eigendecompositions every k steps.
        kl_clip: KL-clip threshold > 0, or None to disable; needs ``lr``.
        lr: learning rate of the update that follows (for the KL clip); ``step(lr=...)``
            overrides it.
        inverse_policy: ``"eig"`` (eigendecompose A and G), ``"woodbury"`` (G kept as
            ``U U^T`` from stacked output gradients, DESIGN.md "Woodbury policy"),
            ``"auto"`` (Woodbury while its column count k <= ``auto_rho`` * o and
            k <= ``auto_t_max``, then dense eig) or ``"hybrid"`` (Woodbury for layers with
            o >= ``hybrid_min_out``, eig elsewhere). All give the same result on the same
            factors; a low-rank G past ``woodbury_max_rank`` columns becomes dense (logged).
        woodbury_max_rank, auto_rho, auto_t_max, hybrid_min_out: see ``inverse_policy``
            (defaults 8192, 0.75, 8192, 4096; rho measured, ``KFACOptions.max_low_rank``).
        woodbury_rank: None (default: the stack grows until it turns dense) or r >= 1: a
            truncated EMA. After each factor update a low-rank G with more than r columns
            keeps its top r eigenpairs, ``G_t = top_r(decay G_{t-1} + (1 - decay)
            G_batch)`` (Eckart-Young optimal; ``LowRankFactor.truncate``), at
            O(o (r + T)^2) per update; the trace fraction dropped is ``dropped_G`` in
            ``describe()``. Applies to layers whose ``max_low_rank`` is >= r (others turn
            dense as before); must be <= ``woodbury_max_rank``. This is what keeps a
            large-vocabulary head on Woodbury when T tokens per update would otherwise
            pass ``auto_rho * o`` after a few updates.
        max_condition_number: clip factor eigenvalues below ``max / kappa`` (None: off);
            counts are in ``describe()``.
        woodbury_dtype: storage dtype of U (None, float32, bfloat16, float16; computed in
            float32).
        woodbury_store_device: ``"auto"`` (next to the layer while U takes at most
            ``woodbury_store_threshold_bytes``, default 500 MiB, else pinned host memory,
            moved on use), ``"cpu"`` or ``"compute"``.
        accumulation_steps: micro-batches per optimizer step when each micro-batch loss
            is divided by it (the usual accumulation recipe): captured gradients are
            multiplied back, statistics from every micro-batch enter one factor update.
        grad_scaler: a ``torch.amp.GradScaler``: captured gradients are divided by its
            scale, and statistics of a step whose gradients overflowed are dropped. With
            a plain optimizer call ``scaler.unscale_(opt)`` before ``pre.step()``.
        loss_reduction: how the loss given to ``backward()`` was reduced over its N
            loss terms: ``"mean"`` (captured gradients are multiplied by N) or ``"sum"``.
        kfac_approx: ``"expand"`` (default) or ``"reduce"`` for weight sharing over
            positions (Eschenhagen et al. 2023); Embedding layers always use expand.
        skip_layers: module-name regexes (``re.search``) or module types left to the
            base update.
        factor_dtype: storage dtype of A and G: None (float32, or float64 for float64
            layers), float32, float64, or bfloat16/float16 (accumulated in float32).
        inv_dtype: eigensolver dtype (None: the factor dtype; float64 is retried on
            failure in any case).
        inverse_workers: with several ranks, ``"replicate"`` (every rank computes every
            inverse: no communication) or ``"assign"`` (each layer's inverse computed by one
            rank, greedy by cost, then broadcast: 1/R of the compute for the bytes of the
            eigenbases; KAISA's trade-off, Pauloski et al. 2021), or ``"owner"`` (memory
            saving, KAISA's MEM-OPT, grad_worker_fraction = 1/R): each layer has one owner
            rank (greedy by inverse cost, fixed at construction, ``layer_owners``); factor
            statistics are summed onto the owner only (``dist.reduce``; a low-rank G's
            columns gathered to it), only the owner keeps the layer's running factors and
            inverse and preconditions its gradient, and the preconditioned gradient is
            broadcast from the owner at every step (the KL clip is computed from the
            broadcast results, so every rank gets the same scale). Each rank then holds
            about 1/R of the factors, for a broadcast of every preconditioned gradient per
            step. Works under DDP and FSDP2 (each rank keeps its rows of the broadcast
            gradient); not with ``eigenvalue_correction``. ``state_dict()`` then holds only
            this rank's layers: save and load one state per rank, same number of ranks.
            Row-sharded low-rank layers (``woodbury_reduction``) are computed by every rank
            under ``"assign"``; ``"owner"`` and ``"row_sharded"`` exclude each other.
        woodbury_reduction: how a low-rank G is reduced with several ranks (ignored with
            one): ``"gather"`` (default: every rank all-gathers the column blocks and holds
            the whole U (o, k); traffic only at factor updates, (R-1) o T_r values per rank)
            or ``"row_sharded"`` (each rank holds rows ``distributed.row_range(o, rank, R)``
            of U, the FSDP2 ``Shard(0)`` split: column blocks are exchanged into row slices
            by one all_to_all at factor updates; the Gram ``U^T U`` is an all-reduce of the
            per-rank Grams in float64 at inverse updates; at every step ``U^T V`` is an
            all-reduce of a k x d matrix and each rank finishes its rows of the update, which
            are all-gathered). Row-sharded needs 1/R of U's memory and of the per-step
            Woodbury products per rank, for about k d + o d values sent per step. A rank's
            ``state_dict()`` then holds its own rows of U (same keys on every rank:
            ``G.rows`` is ``[start, stop]``) and loads only at the same rank and world size.
            Past ``woodbury_max_rank`` the rows are all-gathered and G becomes dense. Default
            "gather" (benchmarks/README.md, "Woodbury across ranks"): measured at 2 gloo
            ranks on CPU, heads 4096x128 and 8192x256, row-sharded was 1.3-1.9x faster per
            step with half of U per rank, but Accelerate's ``save_state`` and the Trainer
            write one optimizer file from the main process, which a row-sharded state
            cannot resume from (the load raises), and it sends at every step. Use
            ``"row_sharded"`` for a large head with checkpoints saved per rank.
        comm_dtype: wire dtype of the factor sums (None: the factor dtype; counts are
            always float64).
        comm_bucket_mb: cap in MiB on one communication buffer (None, the default: one
            buffer per destination, measured fastest on gloo CPU, benchmarks/README.md).
            Buffers are issued asynchronously and unpacked in order, so packing /
            unpacking overlap with later transfers (``kfac_optim.distributed``).
        inv_device: eigensolver device: ``"auto"`` (the layer's), ``"cpu"`` or a CUDA
            device; results come back to the layer's device.
        eigenvalue_correction: EKFAC (George et al. 2018): running second moments of the
            per-row gradients in the Kronecker eigenbasis replace ``s_G s_A^T`` (exact
            damping; layers with a dense G).

    Padding and the loss count N: for each forward call of ``model`` the
    preconditioner reads ``attention_mask`` (else ``labels != -100``) from the call's
    keyword arguments as the token mask (padding rows do not count in T), and takes
    N from ``labels`` (valid labels, shifted by one for Hugging Face causal LMs) or,
    without labels, from the output rows (``logits.shape[:-1]``, masked). Users
    computing their own loss call ``set_token_mask(mask, num_loss_rows=N)`` before
    the forward. Hooks capture only in training mode with grad enabled.

    Raises:
        ValueError / TypeError: bad arguments (naming the argument and accepted values),
            an unsupported layer configuration (naming the layer), or FSDP1 with
            ``use_orig_params=False`` or given without its wrapper (saying what works).
    """

    def __init__(self, model: nn.Module, **kwargs: Any):
        self.options = KFACOptions(**kwargs)
        opts = self.options
        if opts.kl_clip is not None and opts.lr is None:
            raise ValueError(
                f"kl_clip={opts.kl_clip} needs the learning rate of the update that follows: "
                "pass lr=<float> (or call step(lr=...)), or kl_clip=None to disable clipping"
            )
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self._fsdp1 = fsdp1_root(model)
        self.model = _unwrap(model)
        self._group = resolve_group(opts.process_group)
        # Row-sharded Woodbury: (rank, world size) when it applies (several ranks), else None.
        self._shard: tuple[int, int] | None = None
        if opts.woodbury_reduction == "row_sharded" and world_size(self._group) > 1:
            import torch.distributed as dist

            self._shard = (dist.get_rank(self._group), world_size(self._group))
        self._rank = group_rank(self._group)
        self.comm = CommStats()
        self.steps = 0
        self.capture_enabled = True
        self._layers: dict[str, _Layer] = {}
        with self._whole_parameters(with_grads=False):  # FSDP1: shapes of whole weights
            for name, module in self._select_modules():
                capture = capture_for(name, module)
                rows = (None if self._shard is None
                        else row_range(capture.out_features, *self._shard))
                self._layers[name] = _Layer(capture, opts, rows)
        self._owners = self._assign_owners()
        self._capture = StatisticsCapture(self._layers, opts, lambda: self.capturing)
        self._handles = self._capture.register(self.model)
        log.info("K-FAC preconditions %d layers: %s", len(self._layers), list(self._layers))

    # Registration -------------------------------------------------------------
    def _select_modules(self) -> list[tuple[str, nn.Module]]:
        chosen: dict[int, tuple[str, nn.Module]] = {}
        for wrapped_name, module in self.model.named_modules():
            name = strip_wrapper_names(wrapped_name)
            if not is_supported(module) or self.options.skips(name, module):
                continue
            if not module.weight.requires_grad:
                continue
            # Tied weights (e.g. GPT-2's wte and lm_head): one layer preconditions the tied
            # matrix, preferring dense factors over an Embedding's diagonal A.
            key = id(module.weight)
            prev = chosen.get(key)
            if prev is None or (isinstance(prev[1], nn.Embedding)
                                and not isinstance(module, nn.Embedding)):
                chosen[key] = (name, module)
            if prev is not None:
                log.info("weight shared by '%s' and '%s': preconditioned with the factors of "
                         "'%s' only", prev[0], name, chosen[key][0])
        return list(chosen.values())

    def _whole_parameters(self, *, with_grads: bool) -> Any:
        """Context in which FSDP1 parameters (and gradients) are whole; changes to the
        gradients are written back to this rank's shard. A no-op without FSDP1."""
        if self._fsdp1 is None:
            return contextlib.nullcontext()
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.summon_full_params(self._fsdp1, writeback=with_grads,
                                                           with_grads=with_grads)

    @property
    def layer_names(self) -> list[str]:
        """Qualified names of the preconditioned modules."""
        return list(self._layers)

    @property
    def layer_owners(self) -> dict[str, int] | None:
        """``inverse_workers="owner"`` with several ranks: the group rank owning each layer
        (the same on every rank); otherwise None (every rank holds every layer)."""
        return None if self._owners is None else dict(self._owners)

    def _assign_owners(self) -> dict[str, int] | None:
        """Owner of each layer, greedy by the expected inverse cost (``_inverse_cost``
        with a low-rank G at its column limit, the most it costs before turning dense)."""
        if self.options.inverse_workers != "owner" or self._group is None:
            return None
        costs = {}
        for name, layer in self._layers.items():
            o = layer.capture.out_features
            k = min(o, self.options.max_low_rank(o)) if layer.low_rank else o
            costs[name] = _inverse_cost(layer, k)
        return assign_greedy(costs, world_size(self._group))

    def _owner(self, layer: _Layer) -> int | None:
        """The layer's owner rank in owner mode, else None (replicated)."""
        return None if self._owners is None else self._owners[layer.capture.name]

    def _owns(self, layer: _Layer) -> bool:
        """Whether this rank keeps the layer's factors and inverse."""
        return self._owners is None or self._owners[layer.capture.name] == self._rank

    def remove(self) -> None:
        """Remove every hook; the model is left as before construction."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # Capture ------------------------------------------------------------------
    @property
    def capturing(self) -> bool:
        """Whether this step's forward/backward passes feed the factors."""
        return self.capture_enabled and self.steps % self.options.factor_update_steps == 0

    @property
    def loss_divisor_ranks(self) -> int:
        """Hugging Face Trainer multiplies a ``num_items_in_batch``-normalised loss by the
        number of processes when it averages tokens across devices; the captured output
        gradients are divided back by this (``integrations.transformers`` sets it)."""
        return self._capture.loss_divisor_ranks

    @loss_divisor_ranks.setter
    def loss_divisor_ranks(self, ranks: int) -> None:
        self._capture.loss_divisor_ranks = ranks

    def set_token_mask(self, mask: Tensor | None, num_loss_rows: int | Tensor | None = None):
        """Token mask and loss-term count for the next forward call of the model.

        Args:
            mask: ``(B, S)`` with 1 (or True) for valid tokens, 0 for padding; it applies
                to every layer whose input has leading dims ``(B, S)``. None: all valid.
            num_loss_rows: N, the number of terms the loss is a mean / sum over
                (default: ``mask.sum()``, or the model's output rows).

        Raises:
            TypeError: ``mask`` is not a tensor.
        """
        self._capture.set_token_mask(mask, num_loss_rows)

    # Step ---------------------------------------------------------------------
    @torch.no_grad()
    def step(self, *, lr: float | None = None, damping: float | None = None,
             kl_clip: float | None = ...) -> None:
        """Update factors / inverses on schedule and precondition the gradients in place.

        Args:
            lr: learning rate for the KL clip (default: the constructor's ``lr``).
            damping: lambda for this step (default: the constructor's ``damping``).
            kl_clip: KL-clip threshold for this step, None to disable (default: the
                constructor's).

        Raises:
            ValueError: bad ``lr``/``damping``/``kl_clip``, or a KL clip without any lr.
        """
        opts = self.options
        damping = opts.damping if damping is None else check_nonneg("damping", damping)
        kl_clip = opts.kl_clip if kl_clip is ... else check_kl_clip(kl_clip)
        lr = opts.lr if lr is None else check_nonneg("lr", lr)
        if kl_clip is not None and lr is None:
            raise ValueError("kl_clip needs lr: pass step(lr=...) or lr= at construction")
        if self._group is not None and self.capturing:
            self._reduce_statistics()
        counts = self._update_factors()
        if self.steps % opts.inv_update_steps == 0:
            self._update_inverses()
        self._update_eigenvalue_corrections(counts)
        with self._whole_parameters(with_grads=True):
            self._precondition(lr, damping, kl_clip)
        self.steps += 1

    def _reduce_statistics(self) -> None:
        """Sum every layer's pending statistics over ranks (DESIGN.md, "Distributed").

        Every rank contributes every layer, zeros where it saw no rows, so the collective
        calls match; dense sums and counts travel in packed buckets, low-rank G blocks
        are gathered (or, row-sharded, exchanged into this rank's rows of every block). A
        layer no rank saw is left with nothing pending. In owner mode the sums and blocks
        go to the layer's owner only; the other ranks drop them.
        """
        dense, low_rank, dsts = [], [], []
        for layer in self._layers.values():
            cap = layer.capture
            dtype, dev = accumulation_dtype(cap, self.options.factor_dtype), cap.weight.device
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
            dsts += [self._owner(layer)] * len(sums)
        reduced = iter(reduce_symmetric(
            dense, self._group, dst=None if self._owners is None else dsts,
            comm_dtype=self.options.comm_dtype, bucket_bytes=self.options.comm_bucket_bytes,
            stats=self.comm))
        for layer in self._layers.values():  # None where another rank owns the layer
            layer.a.pending_sum, layer.a.pending_count = next(reduced), next(reduced)
            layer.g.pending_count = next(reduced)
            if not layer.low_rank:
                layer.g.pending_sum = next(reduced)
        for layer in low_rank:
            block = torch.cat(layer.g.pending_rows).t()
            if layer.row_sharded:
                reduced_block = exchange_to_rows(block, self._group,
                                                 comm_dtype=self.options.comm_dtype,
                                                 stats=self.comm)
            else:
                reduced_block = all_gather_columns(block, self._group, dst=self._owner(layer),
                                                   comm_dtype=self.options.comm_dtype,
                                                   stats=self.comm)
            layer.g.pending_rows = [] if reduced_block is None else [reduced_block.t()]
        kept = [layer for layer in self._layers.values() if self._owns(layer)]
        seen = [layer.a.pending_count > 0 for layer in kept]
        for layer, ok in zip(kept, torch.stack(seen).tolist() if seen else [], strict=True):
            if not ok:
                layer.a.take_batch()
                layer.g.take_batch()
                if layer.ekfac_rows:
                    layer.ekfac_rows.clear()

    def _update_factors(self) -> dict[str, Tensor]:
        """Fold pending statistics into the running factors; returns each updated layer's
        loss-term count N (EKFAC normalises with it)."""
        updates, counts = [], {}
        for name, layer in self._layers.items():
            if layer.g.pending:
                counts[name] = layer.g.pending_count
            a, g = layer.a.take_batch(), layer.g.take_batch()
            if a is not None and g is not None:
                updates.append((layer, a, g))
        self._capture.pending_scale = None
        if not updates:
            return counts
        finite = torch.stack([torch.isfinite(a).all() & torch.isfinite(g).all()
                              for _, a, g in updates])
        if self._shard is not None:  # row slices differ: every rank must skip the same layers
            finite = all_reduce_sum((~finite).to(torch.int32), self._group, kind="counts",
                                    stats=self.comm) == 0
        finite = finite.tolist()
        decay = self.options.factor_decay
        for (layer, a, g), ok in zip(updates, finite, strict=True):
            if not ok:
                layer.nonfinite_skips += 1
                if not layer.warned:
                    layer.warned = True
                    warnings.warn(f"K-FAC layer '{layer.capture.name}': non-finite statistics; "
                                  "factor update skipped, last good inverse kept", stacklevel=3)
                continue
            layer.a.update(a, decay)
            layer.g.update(g, decay)
            layer.diag["T"] = g.shape[1] if layer.low_rank else None
            if layer.low_rank:
                self._bound_rank(layer)
        return counts

    def _bound_rank(self, layer: _Layer) -> None:
        """Keep a low-rank G within its column budget: truncate it to ``woodbury_rank``
        where that is set and within ``max_low_rank``; otherwise (or if the truncation's
        eigensolver fails) turn it dense once it passes ``max_low_rank``."""
        opts, o = self.options, layer.capture.out_features
        if opts.truncates(o) and layer.g.rank > opts.woodbury_rank:
            reduce = None
            if layer.row_sharded:  # U^T U is the sum of the row slices' Grams
                reduce = partial(all_reduce_sum, group=self._group, kind="low_rank_gram",
                                 stats=self.comm)
            dropped = layer.g.truncate(opts.woodbury_rank, dtype=opts.inv_dtype,
                                       device=opts.inv_device, reduce_gram=reduce)
            if dropped is not None:
                layer.diag["dropped_G"] = dropped
                log.debug("K-FAC layer '%s': low-rank G truncated to %d columns, %.3g of its "
                          "trace dropped", layer.capture.name, opts.woodbury_rank, dropped)
        limit = opts.max_low_rank(o)
        if layer.g.rank > limit:
            log.info("K-FAC layer '%s': low-rank G reached %d columns (> %d): switching "
                     "to a dense G and the eig policy", layer.capture.name, layer.g.rank, limit)
            if layer.row_sharded:
                layer.g.cols = all_gather_rows(layer.g.cols, o, self._group, stats=self.comm)
                layer.g.rows = None
            layer.g = layer.g.to_dense()

    def _update_eigenvalue_corrections(self, counts: dict[str, Tensor]) -> None:
        for name, layer in self._layers.items():
            if layer.ekfac_rows is None or name not in counts:
                continue
            rows, layer.ekfac_rows = layer.ekfac_rows, []
            inv, cap = layer.inv, layer.capture
            if inv is None or "q_g" not in inv or inv["q_g"].shape[1] < inv["q_g"].shape[0]:
                continue  # no full eigenbasis yet (or a thin Woodbury one): K-FAC eigenvalues
            batch = torch.zeros(cap.out_features, cap.in_features, dtype=inv["q_g"].dtype,
                                device=inv["q_g"].device)
            for a, g in rows:
                batch += eigenbasis_second_moments(a, g, inv["q_a"], inv["q_g"], cap.in_features)
            if self._group is not None:  # counts[name] is already the global N
                (flat,) = all_reduce_symmetric([batch.reshape(-1)], self._group,
                                               bucket_bytes=self.options.comm_bucket_bytes,
                                               stats=self.comm)
                batch = flat.reshape(batch.shape)
            batch = batch / counts[name].clamp(min=1)
            if not bool(torch.isfinite(batch).all()):
                continue
            if layer.ekfac_basis != layer.basis:
                layer.ekfac = RunningFactor()  # moments of another basis do not carry over
                layer.ekfac_basis = layer.basis
            layer.ekfac.update(batch, self.options.factor_decay)

    def _update_inverses(self) -> None:
        layers = [layer for layer in self._layers.values()
                  if layer.a.ema is not None and layer.g.updates > 0]
        if self._group is None or self.options.inverse_workers != "assign":
            # replicate: every rank, every layer; owner: only owned layers have factors here
            results = {layer.capture.name: self._inverse(layer) for layer in layers}
        else:  # a row-sharded layer's inverse needs every rank's rows: not assigned
            results = {layer.capture.name: self._inverse(layer) for layer in layers
                       if layer.row_sharded}
            results.update(self._assigned_inverses([layer for layer in layers
                                                    if not layer.row_sharded]))
        for layer in layers:
            inv = results[layer.capture.name]
            if inv is None:
                log.warning("K-FAC layer '%s': eigendecomposition failed in float64; keeping "
                            "the last good inverse", layer.capture.name)
                continue
            layer.diag["clipped_A"] = inv.pop("clipped_A")
            layer.diag["clipped_G"] = inv.pop("clipped_G")
            layer.inv, layer.solver = inv, None
            layer.basis += 1
            s_g = inv.get("s_g")
            layer.diag.update(
                policy="woodbury" if layer.low_rank else "eig",
                rank=layer.g.rank if layer.low_rank else layer.capture.out_features,
                cond_A=_condition(inv["s_a"]),
                cond_G=None if s_g is None else _condition(s_g, inv.get("s_g_rest", 0.0),
                                                           layer.capture.out_features),
            )
            log.info("K-FAC inverse update step=%d %s", self.steps, _fmt(self._describe(layer)))

    def _assigned_inverses(self, layers: list[_Layer]) -> dict[str, dict | None]:
        """``inverse_workers="assign"``: each layer's inverse is computed by one rank
        (greedy by cost, O(d^3 + o^3) dense, O(d^3 + o k^2 + k^3) low-rank) and broadcast."""
        import torch.distributed as dist

        group = self._group
        costs = {layer.capture.name: _inverse_cost(
            layer, layer.g.rank if layer.low_rank else layer.capture.out_features)
            for layer in layers}
        owners = assign_greedy(costs, dist.get_world_size(group))
        rank = dist.get_rank(group)
        mine = {layer.capture.name: self._inverse(layer) for layer in layers
                if owners[layer.capture.name] == rank}
        device = layers[0].capture.weight.device if layers else torch.device("cpu")
        results: dict[str, dict | None] = {}
        for src in range(dist.get_world_size(group)):
            payload = None
            if src == rank:
                payload = {n: ({"failed": True} if inv is None else inv)
                           for n, inv in mine.items()}
            got = broadcast_tensors(payload, src, group, device, stats=self.comm)
            results.update({n: None if inv.get("failed") else inv for n, inv in got.items()})
        return results

    def _inverse(self, layer: _Layer) -> dict[str, Any] | None:
        opts, cap = self.options, layer.capture
        kappa = opts.max_condition_number
        gram = None
        if layer.row_sharded:  # collective first, so that every rank takes part in it
            u = layer.g.factor()
            wide = u.to(torch.float64)
            (gram,) = all_reduce_symmetric([wide.t() @ wide], self._group, stats=self.comm,
                                           kind="low_rank_gram")
        if cap.diagonal_a:
            s_a, q_a = layer.a.value(), None
        else:
            eig_a = eigh_psd(layer.a.value(), dtype=opts.inv_dtype, device=opts.inv_device)
            if eig_a is None:
                return None
            s_a, q_a = eig_a
        s_a, clipped_a = clip_condition(s_a, kappa)
        if gram is not None:
            return self._row_sharded_inverse(layer, u, gram, s_a, q_a, clipped_a)
        if layer.low_rank and opts.damping_mode == "factored":
            u = layer.g.factor()
            gram = u.t() @ u
            return {"s_a": s_a, "q_a": q_a, "u": u, "gram": gram, "trace_g": gram.trace(),
                    "clipped_A": clipped_a, "clipped_G": 0}
        if layer.low_rank:
            eig_g = lowrank_eigh(layer.g.factor(), dtype=opts.inv_dtype, device=opts.inv_device)
        else:
            eig_g = eigh_psd(layer.g.value(), dtype=opts.inv_dtype, device=opts.inv_device)
        if eig_g is None:
            return None
        s_g, q_g = eig_g
        rest = 0.0
        if q_g.shape[1] < q_g.shape[0] and kappa is not None and s_g.numel():
            rest = float(s_g.max()) / kappa  # the complement's 0 eigenvalue is clipped too
        s_g, clipped_g = clip_condition(s_g, kappa)
        return {"s_a": s_a, "q_a": q_a, "s_g": s_g, "q_g": q_g, "s_g_rest": rest,
                "clipped_A": clipped_a,
                "clipped_G": clipped_g + (q_g.shape[0] - q_g.shape[1] if rest else 0)}

    def _row_sharded_inverse(self, layer: _Layer, u: Tensor, gram: Tensor, s_a: Tensor,
                             q_a: Tensor | None, clipped_a: int) -> dict[str, Any] | None:
        """Inverse of a row-sharded low-rank G from this rank's rows ``u`` (o_r, k) and the
        global Gram ``U^T U`` (k, k, float64): factored damping keeps the Gram (Cholesky at
        preconditioning, as for a whole U); exact damping its eigenpairs, computed in float64
        (``inverse.precondition_woodbury_exact``)."""
        o, kappa = layer.capture.out_features, self.options.max_condition_number
        common = {"s_a": s_a, "q_a": q_a, "u": u, "u_rows": list(layer.g.rows),
                  "clipped_A": clipped_a}
        if self.options.damping_mode == "factored":
            gram = gram.to(u.dtype)
            return {**common, "gram": gram, "trace_g": gram.trace(), "clipped_G": 0}
        eig = eigh_psd(gram, device=self.options.inv_device)
        if eig is None:
            return None
        s, w = eig
        # G's eigenvalues: the min(o, k) largest of the Gram's, 0 on the rest of R^o
        s_g = s[-min(o, s.numel()):]
        rest = float(s.max()) / kappa if kappa is not None and s.numel() else 0.0
        s_g, clipped = clip_condition(s_g, kappa)
        return {**common, "gram_s": s.to(u.dtype), "gram_w": w.to(u.dtype),
                "s_g": s_g.to(u.dtype), "s_g_rest": rest,
                "clipped_G": clipped + (max(o - s.numel(), 0) if rest else 0)}

    def _precondition_row_sharded(self, layer: _Layer, grad: Tensor, damping: float) -> Tensor:
        """This rank's rows of the preconditioned ``grad`` (o, d), then all of them: the
        ``(k, d)`` products ``U^(r)T V^(r)`` are summed over ranks (DESIGN.md)."""
        inv, o = layer.inv, layer.capture.out_features
        start, stop = inv["u_rows"]
        reduce = partial(all_reduce_sum, group=self._group, kind="low_rank_utv",
                         stats=self.comm)
        if "gram_w" in inv:
            rows = precondition_woodbury_exact(
                grad[start:stop], inv["u"], inv["gram_s"], inv["gram_w"], inv["q_a"],
                inv["s_a"], damping, inv["s_g_rest"], reduce=reduce)
        else:
            rows = self._precondition_woodbury_factored(layer, grad[start:stop], damping,
                                                        reduce)
        return all_gather_rows(rows, o, self._group, stats=self.comm)

    def _precondition_woodbury_factored(self, layer: _Layer, grad: Tensor, damping: float,
                                        reduce: Any = None) -> Tensor:
        """``(G + lambda_G I)^{-1} V (A + lambda_A I)^{-1}`` with G = U U^T (Woodbury); the
        Cholesky factor of ``lambda_G I + U^T U`` is cached until the damping changes."""
        inv = layer.inv
        s_a = inv["s_a"]
        lam_a, lam_g = factored_damping(s_a.sum(), s_a.numel(), inv["trace_g"],
                                        layer.capture.out_features, damping)
        if layer.solver is None or layer.solver[0] != damping:
            gram = inv["gram"]
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            layer.solver = (damping, robust_cholesky(gram + lam_g * eye))
            layer.diag["jitter"] = layer.solver[1][2]
        return precondition_woodbury_factored(grad, inv["u"], layer.solver[1], lam_g, inv["q_a"],
                                              s_a, lam_a, reduce)

    def _precondition_layer(self, layer: _Layer, grad: Tensor, damping: float) -> Tensor:
        inv = layer.inv
        if "u_rows" in inv:
            return self._precondition_row_sharded(layer, grad, damping)
        full_basis = "u" not in inv and inv["q_g"].shape[1] == inv["q_g"].shape[0]
        if full_basis and self.options.damping_mode == "factored":
            if layer.solver is None or layer.solver[0] != damping:
                layer.solver = (damping, damped_inverses(inv["q_g"], inv["s_g"], inv["q_a"],
                                                         inv["s_a"], damping))
            g_inv, a_inv = layer.solver[1]
            v = g_inv @ grad.to(g_inv.dtype)
            v = v * a_inv if a_inv.dim() == 1 else v @ a_inv
            return v.to(grad.dtype)
        if "u" not in inv:
            corrected = None if layer.ekfac is None else layer.ekfac.value()
            return precondition_eig(grad, inv["q_g"], inv["s_g"], inv["q_a"], inv["s_a"],
                                    damping, self.options.damping_mode, inv["s_g_rest"],
                                    eigenvalues=corrected)
        return self._precondition_woodbury_factored(layer, grad, damping)

    def _precondition(self, lr: float | None, damping: float, kl_clip: float | None) -> None:
        if self._owners is not None:
            self._precondition_owned(lr, damping, kl_clip)
            return
        results = []
        for layer in self._layers.values():
            cap = layer.capture
            if layer.inv is None or not cap.has_grad():
                continue
            grad = cap.grad_matrix()
            results.append((cap, grad, self._precondition_layer(layer, grad, damping)))
        self._write_clipped(results, lr, kl_clip)

    def _precondition_owned(self, lr: float | None, damping: float,
                            kl_clip: float | None) -> None:
        """Owner mode: each layer's owner preconditions its gradient, then broadcasts it.

        One float64 all-reduce of per-layer flags first makes every rank agree on which
        layers are ready (the owner has an inverse, every rank a gradient) and on the form
        of each G: a low-rank G that outgrew its column limit turned dense on its owner,
        and the other ranks follow so that the next reduction sends the same tensors.
        Every rank gathers the ready layers' full gradients in the same order (FSDP2's
        gathers are collectives) and computes the KL clip from the broadcast results.
        """
        layers = list(self._layers.values())
        flags = all_reduce_counts(torch.tensor(
            [[float(self._owns(la) and la.inv is not None), float(la.capture.has_grad()),
              float(self._owns(la) and not la.low_rank)] for la in layers]),
            self._group, kind="flags", stats=self.comm)
        ranks, ready = world_size(self._group), []
        for layer, (has_inv, grads, dense) in zip(layers, flags.tolist(), strict=True):
            if dense and layer.low_rank:
                layer.g = RunningFactor(layer.a.storage_dtype)
            if has_inv and grads == ranks:
                ready.append(layer)
        results = []
        for layer in ready:
            grad = layer.capture.grad_matrix()
            pre = (self._precondition_layer(layer, grad, damping).to(grad.dtype)
                   if self._owns(layer) else torch.empty_like(grad))
            results.append((layer.capture, grad, pre))
        broadcast_from_owners([pre for _, _, pre in results], [self._owner(la) for la in ready],
                              self._group, bucket_bytes=self.options.comm_bucket_bytes,
                              stats=self.comm)
        self._write_clipped(results, lr, kl_clip)

    def _write_clipped(self, results: list[tuple[LayerCapture, Tensor, Tensor]],
                       lr: float | None, kl_clip: float | None) -> None:
        """Write the preconditioned gradients ``(capture, V, V_pre)`` back, scaled by the
        KL clip ``nu = min(1, sqrt(kl_clip / (lr^2 sum_layers <V_pre, V>)))``."""
        if not results:
            return
        scale = None
        if kl_clip is not None:
            vfv = torch.stack([(pre * grad).sum().to(torch.float64)
                               for _, grad, pre in results]).sum() * lr**2
            ratio = kl_clip / vfv
            scale = torch.where(vfv > 0, ratio.clamp(max=1.0).sqrt(), torch.ones_like(vfv))
        for cap, _, pre in results:
            cap.set_grad_matrix(pre if scale is None else pre * scale.to(pre.dtype))

    # Diagnostics ---------------------------------------------------------------
    def _describe(self, layer: _Layer) -> dict[str, Any]:
        cap, d = layer.capture, layer.diag
        return {
            "layer": cap.name, "type": type(cap.module).__name__,
            "shape": (cap.out_features, cap.in_features),
            "policy": d.get("policy", "low-rank" if layer.low_rank else "eig"),
            "T": d.get("T"), "rank": d.get("rank"), "damping": self.options.damping,
            "damping_mode": self.options.damping_mode, "jitter": d.get("jitter"),
            "cond_A": d.get("cond_A"), "cond_G": d.get("cond_G"),
            "clipped_A": d.get("clipped_A", 0), "clipped_G": d.get("clipped_G", 0),
            "dropped_G": d.get("dropped_G"), "factor_updates": layer.a.updates,
            "nonfinite_skips": layer.nonfinite_skips, "owner": self._owner(layer),
        }

    def describe(self) -> list[dict[str, Any]]:
        """One row per layer, as logged (logger ``kfac_optim``, INFO) at each inverse update.

        Keys: layer, type, shape ``(o, d)``, policy (``eig``/``woodbury``), T (columns added
        by the last low-rank update), rank (columns of a low-rank G, else o), damping,
        damping_mode, jitter (Cholesky jitter of the Woodbury system, factored mode),
        cond_A, cond_G (condition numbers after clipping; inf when singular), clipped_A,
        clipped_G (eigenvalues raised by ``max_condition_number``), dropped_G (trace
        fraction the last ``woodbury_rank`` truncation dropped, None if none), factor_updates,
        nonfinite_skips, owner (the owning rank in owner mode, else None; the factor
        columns are filled only on the owner).
        ``pandas.DataFrame(pre.describe())`` makes it a table.
        """
        return [self._describe(layer) for layer in self._layers.values()]

    def memory_usage(self) -> dict[str, Any]:
        """Bytes held per layer and in total.

        Returns:
            ``{"layers": {name: {"factors", "inverses", "low_rank", "total"}}, "total"}``:
            ``factors`` = dense A and G, ``low_rank`` = the stacked U of a Woodbury G,
            ``inverses`` = eigenbases, Grams and cached Cholesky factors.
        """
        out, total = {}, 0
        for name, layer in self._layers.items():
            dense = _nbytes(layer.a.ema) + (0 if layer.low_rank else _nbytes(layer.g.ema))
            low = _nbytes(layer.g.cols) if layer.low_rank else 0
            inv = sum(_nbytes(v) for v in (layer.inv or {}).values())
            if layer.solver is not None:
                inv += sum(_nbytes(t) for t in layer.solver[1] if isinstance(t, Tensor))
            row = {"factors": dense, "inverses": inv, "low_rank": low,
                   "total": dense + inv + low}
            out[name] = row
            total += row["total"]
        return {"layers": out, "total": total}

    # State ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Tensors and plain values only, the same keys on every rank.

        ``{"steps", "layers": {name: {"A", "G", "G_low_rank", "inv", "ekfac", "basis",
        "ekfac_basis", "nonfinite_skips", "positional"}}, "owners"}``: per-layer running
        factors and eigenbases. ``owners`` is None except in owner mode, where it is
        ``{"rank": this rank, "layers": {name: owner rank}}`` and the layers this rank
        does not own have empty entries (``ema`` / ``cols`` / ``inv`` None): each rank
        saves its own state and loads it back on the same rank of the same world size.
        With ``woodbury_reduction="row_sharded"`` a low-rank G (and its inverse) holds this
        rank's rows of U only (``G.rows``, ``inv.u_rows``): save one state per rank too.
        """
        owners = None if self._owners is None else {"rank": self._rank,
                                                    "layers": dict(self._owners)}
        return {"steps": self.steps,
                "layers": {name: layer.state_dict() for name, layer in self._layers.items()},
                "owners": owners}

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``; tensors move to each layer's weight device.

        In owner mode a replicated state (``owners`` None) may be loaded: each rank keeps
        the layers it owns.

        Raises:
            RuntimeError: the state's layers or factor shapes do not match this model
                (naming the layer): most likely a checkpoint of another model; or a
                row-sharded low-rank G saved at another rank or world size, or loaded without
                ``woodbury_reduction="row_sharded"`` (or a whole U loaded with it); or an
                owner-mode state loaded on another rank, with another assignment, or
                without ``inverse_workers="owner"``.
        """
        self._check_owners(state.get("owners"))
        saved = state["layers"]
        if set(saved) != set(self._layers):
            missing = sorted(set(self._layers) - set(saved))
            extra = sorted(set(saved) - set(self._layers))
            raise RuntimeError(f"K-FAC state does not match the model (checkpoint mismatch?): "
                               f"layers missing from the state {missing}, unknown layers {extra}")
        for name, layer in self._layers.items():
            self._check_shapes(layer, saved[name])
        for name, layer in self._layers.items():
            s = saved[name]
            dev = layer.capture.weight.device
            if s["G_low_rank"] != layer.low_rank:
                layer.g = (layer.new_low_rank() if s["G_low_rank"]
                           else RunningFactor(layer.a.storage_dtype))
            layer.solver = None
            layer.basis, layer.ekfac_basis = int(s["basis"]), int(s["ekfac_basis"])
            if self._owns(layer):
                layer.a.load_state_dict(_to_device(s["A"], dev))
                layer.g.load_state_dict(_to_device(s["G"], dev))
                layer.inv = None if s["inv"] is None else _to_device(s["inv"], dev)
            if layer.ekfac is not None and s["ekfac"] is not None:
                layer.ekfac.load_state_dict(_to_device(s["ekfac"], dev))
            layer.nonfinite_skips = int(s.get("nonfinite_skips", 0))
            layer.positional = bool(s.get("positional", False))
        self.steps = int(state["steps"])

    def _check_owners(self, saved: dict | None) -> None:
        """An owner-mode state holds one rank's layers: it loads only on that rank, with the
        same assignment, in owner mode."""
        if saved is None:
            return
        if self._owners is None:
            raise RuntimeError(
                f"K-FAC state was saved by rank {saved['rank']} in inverse_workers='owner' mode "
                "and holds only that rank's layers: load it with inverse_workers='owner' on "
                "the same rank and number of ranks")
        if saved["rank"] != self._rank or saved["layers"] != self._owners:
            raise RuntimeError(
                f"K-FAC owner-mode state of rank {saved['rank']} (owners {saved['layers']}) "
                f"loaded on rank {self._rank} (owners {self._owners}): load each rank's own "
                "state with the same number of ranks")

    @staticmethod
    def _check_shapes(layer: _Layer, s: dict) -> None:
        cap = layer.capture
        d, o = cap.in_features, cap.out_features
        expected_a = (d,) if cap.diagonal_a else (d, d)
        g = s["G"].get("ema", s["G"].get("cols"))
        if s["G_low_rank"]:
            try:
                layer.new_low_rank().check_rows(s["G"])
            except RuntimeError as err:
                raise RuntimeError(f"K-FAC state for layer '{cap.name}': {err}") from None
            if layer.rows is not None:  # a row-sharded U: this rank's rows only
                o = layer.rows[1] - layer.rows[0]
        for key, value, expected in (("A", s["A"]["ema"], expected_a), ("G", g, (o, o))):
            shape = None if value is None else tuple(value.shape)
            if key == "G" and s["G_low_rank"] and shape is not None:
                shape = (shape[0], shape[0])
            if shape is not None and shape != expected:
                bias = " (a bias in one and not the other?)" if key == "A" else ""
                raise RuntimeError(
                    f"K-FAC state for layer '{cap.name}': factor {key} has shape "
                    f"{shape}, the module needs {expected}{bias}; checkpoint mismatch?")
