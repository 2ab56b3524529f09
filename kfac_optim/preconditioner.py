"""KFACPreconditioner: the K-FAC pipeline, one stage after another.

Data flows one way (docs/design.md): module hooks (``capture``) -> per-layer statistics
(``layers``, ``factors``) -> reduction across ranks (``placement``) -> running factors ->
inverses (``policies``) -> preconditioned gradients, KL-clipped, written back into
``p.grad``. This module only orders those stages; it holds no mode strings.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from .capture import StatisticsCapture
from .distributed import CommStats, resolve_group
from .factors import eigenbasis_second_moments
from .layer import KFACLayer, LayerView
from .layers import (
    AttentionLayers,
    InProjection,
    attention_layers,
    captures_for,
    fsdp1_root,
    is_supported,
    strip_wrapper_names,
    warn_coverage,
)
from .options import KFACOptions, StepSettings, check_model, options_doc, options_signature
from .placement import make_placement
from .policies import make_policy
from .state import STATE_VERSION, upgrade_state

__all__ = ["KFACPreconditioner"]

log = logging.getLogger("kfac_optim")


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / FSDP1 wrappers (its forward sees the call's kwargs)."""
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, DistributedDataParallel) or (
            type(model).__name__ == "FullyShardedDataParallel" and hasattr(model, "module")):
        model = model.module
    return model


def _flat_params(params: Any) -> list[Tensor]:
    """Tensors of ``params``: an iterable of tensors or of param-group dicts."""
    out = []
    for item in params:
        if isinstance(item, dict):
            group = item["params"]
            out += [group] if isinstance(group, Tensor) else list(group)
        else:
            out.append(item)
    return out


def _fmt(row: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in row.items())


class KFACPreconditioner:
    """K-FAC preconditioner: rewrites ``p.grad`` of supported layers in place.

    Usage::

        pre = KFACPreconditioner(model, lr=0.1)
        loss.backward(); pre.step(); optimizer.step()

    For each supported layer (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Embedding``,
    Hugging Face ``Conv1D``; a grouped convolution is one layer per group, named
    ``name.group{i}``; the q, k, v and output projections of ``nn.MultiheadAttention``:
    ``kfac_optim.layers.AttentionLayers``) with weight gradient ``V`` (o, d), trainable bias
    as the last column, the step replaces ``V`` by ``nu * (A (x) G + lambda I)^{-1} vec(V)``
    (exact damping) or ``nu * (G + lambda_G I)^{-1} V (A + lambda_A I)^{-1}`` (factored damping),
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
        params: None (every supported layer), or parameters / param groups: only layers
            whose weight is among them are preconditioned, and no other gradient is touched.
        options: a ``KFACOptions`` to start from (keywords override its fields).
        **options: any ``KFACOptions`` field by name (listed below and in the signature).

    Padding and the loss count N: for each forward call of ``model`` the
    preconditioner reads ``attention_mask`` (else ``labels != -100``) from the call's
    keyword arguments as the token mask (padding rows do not count in T), and takes
    N from ``labels`` (valid labels, shifted by one for Hugging Face causal LMs) or,
    without labels, from the output rows (``logits.shape[:-1]``, masked). Users
    computing their own loss call ``set_token_mask(mask, num_loss_rows=N)`` before
    the forward. Hooks capture only in training mode with grad enabled.

    Raises:
        ValueError / TypeError: bad options (naming the option and accepted values; an
            unknown keyword gets the closest option names), an unsupported layer
            configuration or a lazy module before its first forward (naming the layer), or
            FSDP1 with ``use_orig_params=False`` or given without its wrapper (saying what
            works). With several ranks: ranks whose options or layers differ (ValueError on
            every rank, naming each difference and every rank's value;
            ``Replicate.check_agreement``).

    Warns:
        KFACCoverageWarning: once, when trainable parameters are left to the base update
            (listing the supported layers ``skip_layers`` skipped and the other modules
            holding them, with counts) or no layer is preconditioned.
    """

    def __init__(self, model: nn.Module, *, params: Any = None,
                 options: KFACOptions | None = None, **overrides: Any) -> None:
        check_model(model, "KFACPreconditioner")
        self._params = None if params is None else {id(p) for p in _flat_params(params)}
        self.options = opts = KFACOptions.build(options, overrides, "KFACPreconditioner")
        if opts.kl_clip is not None and opts.lr is None:
            raise ValueError(
                f"kl_clip={opts.kl_clip} needs the learning rate of the update that follows: "
                "pass lr=<float> (or call step(lr=...)), or kl_clip=None to disable clipping"
            )
        self._fsdp1 = fsdp1_root(model)
        self.model = _unwrap(model)
        self.comm = CommStats()
        self._placement = make_placement(opts, resolve_group(opts.process_group), self.comm)
        self._policy = make_policy(opts)
        self.steps = 0
        self.capture_enabled = True
        self.last_step: StepSettings | None = None
        # rho of the last damping adaptation (``KFAC(damping_adaptation=...)``), else None
        self.reduction_ratio: float | None = None
        self._warned_stale = False
        self._layers: dict[str, KFACLayer] = {}
        self._attention: list[AttentionLayers] = []
        with self._whole_parameters(with_grads=False):  # FSDP1: shapes of whole weights
            chosen = self._select_modules()
            for name, module in chosen:
                for capture in captures_for(name, module):
                    rows = self._placement.lowrank.rows_for(capture.out_features)
                    self._layers[capture.name] = KFACLayer(capture, self._policy, rows)
            warn_coverage(self.model, [m for _, m in chosen],
                          lambda name, module: self.options.skips(strip_wrapper_names(name),
                                                                  module))
        self._placement.check_agreement(self._layers)  # same options and layers on every rank
        self._placement.setup(self._layers, self._policy)
        self._capture = StatisticsCapture(self._layers, opts, lambda: self.capturing)
        self._handles = self._capture.register(self.model)
        self._handles += [attention.install() for attention in self._attention]
        log.info("K-FAC preconditions %d layers: %s", len(self._layers), list(self._layers))

    # Registration -------------------------------------------------------------
    def _select_modules(self) -> list[tuple[str, nn.Module]]:
        chosen: dict[object, tuple[str, nn.Module]] = {}
        hidden: list[str] = []  # attention modules: their layers are chosen with them
        for wrapped_name, module in self.model.named_modules():
            name = strip_wrapper_names(wrapped_name)
            if any(h == "" or name.startswith(h + ".") for h in hidden):
                continue
            attention = attention_layers(name, module)
            if attention is not None:
                hidden.append(name)
                if self.options.skips(name, module):
                    continue
                parts = [(n, m) for n, m in attention.modules
                         if not self.options.skips(n, m) and m.weight.requires_grad]
                for n, m in parts:  # a block is keyed by its name (rows of one weight)
                    chosen[n if isinstance(m, InProjection) else id(m.weight)] = (n, m)
                if parts:
                    self._attention.append(attention)
                continue
            if not is_supported(module) or self.options.skips(name, module):
                continue
            if not module.weight.requires_grad:
                continue
            if self._params is not None and not self._owns_params(name, module):
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

    def _owns_params(self, name: str, module: nn.Module) -> bool:
        """With ``params``: whether the layer's weight is among them (K-FAC touches no
        gradient outside them).

        Raises:
            ValueError: the weight is in ``params`` and a trainable bias is not (the two
                are preconditioned together).
        """
        if id(module.weight) not in self._params:
            return False
        bias = getattr(module, "bias", None)
        if isinstance(bias, Tensor) and bias.requires_grad and id(bias) not in self._params:
            raise ValueError(f"layer '{name}': its weight is in params and its trainable bias is "
                             "not; K-FAC preconditions them together: put both in params (or "
                             "freeze the bias, or skip_layers the layer)")
        return True

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
    def layers(self) -> Mapping[str, LayerView]:
        """Read-only ``{name: LayerView}`` of the preconditioned layers: kind, shape, factors
        (``A``, ``G``, ``G_factor``), ``inverse`` and ``diagnostics``."""
        return MappingProxyType({name: LayerView(layer, self._describe)
                                 for name, layer in self._layers.items()})

    @property
    def layer_owners(self) -> dict[str, int] | None:
        """``inverse_workers="owner"`` with several ranks: the group rank owning each layer
        (the same on every rank); otherwise None (every rank holds every layer)."""
        return self._placement.owners

    def remove(self) -> None:
        """Remove every hook; the model is left as before construction."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # Capture ------------------------------------------------------------------
    @property
    def capturing(self) -> bool:
        """Whether this step's forward/backward passes feed the factors."""
        return (self.capture_enabled
                and self.steps % self.options.at("factor_update_steps", self.steps) == 0)

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

    def fisher_backward(self, logits: Tensor, likelihood: str = "categorical", *,
                        mask: Tensor | None = None,
                        generator: torch.Generator | None = None) -> bool:
        """The extra backward of ``fisher_type="mc"`` / ``"type2"`` for a model whose loss
        K-FAC does not read itself (docs/design.md, "Fisher type for G").

        Call it after the forward and before ``loss.backward()`` (or after a backward with
        ``retain_graph=True``), on every step: it does nothing off the factor-update
        schedule, with ``fisher_type="empirical"``, or when the forward's extra backward
        already ran (Hugging Face causal LMs and single-label sequence classifiers called
        with ``labels``). It backpropagates, with ``torch.autograd.grad`` to the captured
        layer outputs (no parameter's ``.grad`` changes; the graph is kept), the vectors of
        ``kfac_optim.fisher.output_vectors``: for ``"mc"`` the gradient of the summed
        per-row loss at targets sampled from the model (``generator``, else the one
        ``fisher_seed`` seeds, else the global RNG), for ``"type2"`` the C columns of the
        output-Hessian square root. Their output gradients give G; A comes from the same
        forward; the training loss's own backward then adds nothing to the factors.

        Args:
            logits: ``(..., C)`` the model outputs the per-row loss is a function of.
            likelihood: ``"categorical"`` (softmax cross-entropy over the last dim) or
                ``"gaussian"`` (per-row loss ``0.5 ||f - y||^2``, output Hessian I; a loss
                ``||f - y||^2`` such as ``nn.MSELoss`` has Hessian 2I: G is then half its
                empirical scale).
            mask: ``(...)`` 1 for rows that are loss terms, 0 for the others (padding,
                ignored labels), or None (every row). N, the row count G is divided by, is
                the one the forward gave (``set_token_mask`` / ``labels`` / output rows).
            generator: a ``torch.Generator`` on the logits' device for ``"mc"``.

        Returns:
            Whether statistics were added (False off schedule or when already done).

        Raises:
            ValueError: a bad ``likelihood`` or ``mask`` shape, or ``"type2"`` with more than
                ``kfac_optim.fisher.TYPE2_MAX_OUTPUTS`` outputs.
            RuntimeError: ``logits`` carry no graph.
        """
        if self.options.fisher_type == "empirical":
            return False
        return self._capture.fisher_pass(logits, likelihood, mask, generator)

    # Step ---------------------------------------------------------------------
    @torch.no_grad()
    def step(self, *, lr: float | None = None, damping: float | None = None,
             kl_clip: float | None = ...) -> None:
        """Update factors / inverses on schedule and precondition the gradients in place.

        Args:
            lr: learning rate for the KL clip (default: the ``lr`` option).
            damping: lambda for this step (default: the ``damping`` option).
            kl_clip: KL-clip threshold for this step, None to disable (default: the
                ``kl_clip`` option).

        Raises:
            ValueError: bad ``lr``/``damping``/``kl_clip``, or a KL clip without any lr.
            RuntimeError: with several ranks, at a factor reduction, ranks out of step
                (different step counts, or a rank that captured nothing since its last
                step: an extra ``step()`` call), on every rank; or a layer's weight has a
                gradient but its module's forward never ran (the weight is used directly);
                nothing is changed.
        """
        self.last_step = settings = StepSettings.resolve(self.options, lr, damping, kl_clip,
                                                         step=self.steps)
        self._check_hooked()
        if self.capturing and self.options.fisher_type != "empirical":
            self._capture.check_fisher_passes()
        if self.capturing:
            self._placement.reduce_statistics(self._layers, self.steps)
        counts = self._update_factors(settings.factor_decay)
        # on schedule every layer; otherwise the layers with factors and no inverse yet (no
        # cold start: a layer first seen off schedule is preconditioned from then on)
        due = self.steps % settings.inv_update_steps == 0
        cold = [la for la in self._layers.values() if la.inverse is None and la.has_factors]
        if due or cold:
            self._update_inverses(None if due else cold)
        self._update_eigenvalue_corrections(counts, settings.factor_decay)
        with self._whole_parameters(with_grads=True):
            stale = [la.name for la in self._layers.values() if la.has_grad_written()]
            if stale and not self._warned_stale:
                self._warned_stale = True
                warnings.warn(f"K-FAC step() called again on gradients it already preconditioned "
                              f"(no backward since) for layers {stale}: left as they are, not "
                              "preconditioned twice", stacklevel=2)
            results = self._placement.precondition(self._layers, settings.damping)
            self._write_clipped(results, settings)
        self.steps += 1

    @torch.no_grad()
    def update_factors(self) -> list[str]:
        """Fold the statistics captured since the last factor update into the running
        factors, and nothing else: no inverse, no gradient or parameter touched, ``steps``
        unchanged. For fitting factors from data (``fisher_metrics.fit_factors``): every
        forward/backward captured before this call enters one update, weighted by its rows.

        Returns:
            The names of the layers whose factors were updated.

        Raises:
            RuntimeError: with several ranks, as for :meth:`step` (ranks out of step).
        """
        self._placement.reduce_statistics(self._layers, self.steps)
        before = {name: layer.a.updates for name, layer in self._layers.items()}
        self._update_factors(self.options.at("factor_decay", self.steps))
        return [name for name, layer in self._layers.items() if layer.a.updates > before[name]]

    def _check_hooked(self) -> None:
        """Refuse layers whose weight has a gradient but whose forward never ran through the
        module while other layers' did (the model used the weight directly, e.g.
        ``F.linear(x, layer.weight)``): no statistics would ever reach them.

        Raises:
            RuntimeError: naming those layers and how to leave them to the base update.
        """
        layers = self._layers.values()
        if self._fsdp1 is not None or not any(layer.hooked for layer in layers):
            # no forward since construction (gradients computed before it); FSDP1: a rank's
            # gradient shard may be empty, the ranks would not agree
            return
        missed = [la.name for la in layers if not la.hooked and la.capture.has_grad()]
        if missed:
            raise RuntimeError(
                f"K-FAC layers {missed} have weight gradients but their modules' forward never "
                "ran (the model uses their weights directly, e.g. F.linear(x, module.weight)), "
                "so they are never captured; add them to skip_layers to leave them to the base "
                "update")

    def _update_factors(self, decay: float) -> dict[str, Tensor]:
        """Fold pending statistics into the running factors with EMA ``decay``; returns each
        updated layer's loss-term count N (EKFAC normalises with it)."""
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
        finite = self._placement.lowrank.agree(torch.stack(
            [torch.isfinite(a).all() & torch.isfinite(g).all() for _, a, g in updates]))
        for (layer, a, g), ok in zip(updates, finite.tolist(), strict=True):
            if not ok:
                layer.nonfinite_skips += 1
                if not layer.warned:
                    layer.warned = True
                    kept = ("last good inverse kept" if layer.inverse is not None else
                            "no inverse yet: its gradient is left as it is until a finite "
                            "factor update")
                    warnings.warn(f"K-FAC layer '{layer.name}': non-finite statistics; "
                                  f"factor update skipped, {kept}", stacklevel=3)
                continue
            layer.a.update(a, decay)
            layer.g.update(g, decay)
            layer.diag["T"] = g.shape[1] if layer.low_rank else None
            if layer.low_rank:
                self._bound_rank(layer)
        return counts

    def _bound_rank(self, layer: KFACLayer) -> None:
        """Keep a low-rank G within its column budget: truncate it to ``woodbury_rank``
        where the policy says so; otherwise (or if the truncation's eigensolver fails) turn
        it dense once it passes its column limit."""
        woodbury, o = self._policy.woodbury, layer.capture.out_features
        reduce = self._placement.lowrank.gram_reducer(layer, kind="truncate")
        dropped = woodbury.truncate(layer.g, o, reduce)
        if dropped is not None:
            layer.diag["dropped_G"] = dropped
            log.debug("K-FAC layer '%s': low-rank G truncated to %d columns, %.3g of its "
                      "trace dropped", layer.name, layer.g.rank, dropped)
        if woodbury.outgrown(layer.g, o):
            log.info("K-FAC layer '%s': low-rank G reached %d columns (> %d): switching "
                     "to a dense G and the eig policy", layer.name, layer.g.rank,
                     woodbury.max_low_rank(o))
            self._placement.lowrank.gather_rows(layer)
            layer.densify()

    def _update_eigenvalue_corrections(self, counts: dict[str, Tensor], decay: float) -> None:
        """EKFAC: this update's second moments in the current eigenbasis, summed over loss
        terms (rows, or samples of a weight-shared layer: ``eigenbasis_second_moments``) and
        ranks and divided by N, folded into the inverse's corrected eigenvalues."""
        for name, layer in self._layers.items():
            if layer.ekfac_rows is None or name not in counts:
                continue
            rows, layer.ekfac_rows = layer.ekfac_rows, []
            basis = None if layer.inverse is None else layer.inverse.eigenbasis
            if basis is None:
                continue  # no full eigenbasis yet: K-FAC eigenvalues
            q_a, q_g = basis
            cap = layer.capture
            moments = torch.zeros(cap.out_features, cap.in_features, dtype=q_g.dtype,
                                  device=q_g.device)
            for a, g in rows:
                moments += eigenbasis_second_moments(a, g, q_a, q_g, cap.in_features)
            moments = self._placement.reduce_moments(moments)  # counts[name]: the global N
            moments = moments / counts[name].clamp(min=1)
            if bool(torch.isfinite(moments).all()):
                layer.inverse.update_corrections(moments, decay)

    def update_inverses(self) -> None:
        """Recompute every layer's inverse from its current factors now, outside the
        ``inv_update_steps`` schedule (collective with several ranks: every rank calls it);
        a layer whose eigensolver fails keeps its last good inverse (logged)."""
        self._update_inverses()

    def _update_inverses(self, layers: list[KFACLayer] | None = None) -> None:
        """New inverses of ``layers`` (default: every layer with factors)."""
        if layers is None:
            layers = [layer for layer in self._layers.values() if layer.has_factors]
        results = self._placement.compute_inverses(layers)
        for layer in layers:
            inverse = results[layer.name]
            if inverse is None:
                log.warning("K-FAC layer '%s': eigendecomposition failed in float64; keeping "
                            "the last good inverse", layer.name)
                continue
            layer.inverse = inverse
            layer.diag["policy"] = "woodbury" if layer.low_rank else "eig"
            log.info("K-FAC inverse update step=%d %s", self.steps, _fmt(self._describe(layer)))

    def _write_clipped(self, results: list[tuple[KFACLayer, Tensor, Tensor]],
                       settings: StepSettings) -> None:
        """Write the preconditioned gradients ``(layer, V, V_pre)`` back, scaled by the
        KL clip ``nu = min(1, sqrt(kl_clip / (lr^2 sum_layers <V_pre, V>)))``."""
        if not results:
            return
        scale = None
        if settings.kl_clip is not None:
            # in float64: <V_pre, V> of large float32 / float16 gradients overflows their dtype
            # (inf or NaN would turn the clip off or zero the step)
            vfv = torch.stack([(pre.to(torch.float64) * grad.to(torch.float64)).sum()
                               for _, grad, pre in results]).sum() * settings.lr**2
            ratio = settings.kl_clip / vfv
            scale = torch.where(vfv > 0, ratio.clamp(max=1.0).sqrt(), torch.ones_like(vfv))
        for layer, _, pre in results:
            layer.capture.set_grad_matrix(pre if scale is None else pre * scale.to(pre.dtype))
        for layer, _, _ in results:  # after every write: groups of a conv share one .grad
            layer.mark_written()

    # Curvature -----------------------------------------------------------------
    def curvature_quadratic(self, of: Callable[[Tensor], Tensor | None]) -> Tensor:
        """``delta^T F delta`` for a step ``delta``, ``F`` the K-FAC curvature: block
        diagonal over the layers, ``A (x) G`` per layer (the current bias-corrected
        running factors, without damping), so with ``D`` (o, d [+1]) the layer's step as
        its weight matrix (``LayerCapture.matrix_of``, bias the last column)::

            vec(D)^T (A (x) G) vec(D) = sum(D * (G D A))

        (``A`` diagonal for an Embedding: ``G D diag(a)``; a low-rank ``G = U U^T``:
        ``sum((U^T D) * (U^T D A))``). Layers without factors yet count 0. With several
        ranks the result is the same on every rank (collective in owner mode).

        Args:
            of: each preconditioned parameter -> its step (a tensor of its shape; None is
                only accepted for a bias, as zeros).

        Returns:
            A float64 scalar tensor (units: the Fisher of the mean loss, as the damping).

        Raises:
            RuntimeError: a row-sharded low-rank G (``woodbury_reduction="row_sharded"``:
                this rank holds some rows of U only).
        """
        total = torch.zeros((), dtype=torch.float64)
        for layer in self._layers.values():
            if not (layer.has_factors and self._placement.owns(layer)):
                continue
            if layer.row_sharded:
                raise RuntimeError(f"K-FAC layer '{layer.name}': the curvature of a row-sharded "
                                   "low-rank G needs every rank's rows; use "
                                   "woodbury_reduction='gather'")
            d = layer.capture.matrix_of(of).to(torch.float64)
            a = layer.a.value().to(d.device, torch.float64)
            right = d * a if layer.capture.diagonal_a else d @ a  # D A
            if layer.low_rank:
                u = layer.g.factor().to(d.device, torch.float64)
                term = ((u.t() @ d) * (u.t() @ right)).sum()
            else:
                g = layer.g.value().to(d.device, torch.float64)
                term = (d * (g @ right)).sum()
            total = total + term.cpu()
        return self._placement.sum_over_owners(total.to(self._comm_device()))

    def _comm_device(self) -> torch.device:
        """Where a scalar for a collective lives (the first layer's device: CUDA for NCCL)."""
        first = next(iter(self._layers.values()), None)
        return torch.device("cpu") if first is None else first.capture.weight.device

    def mean_over_ranks(self, values: list[float]) -> list[float]:
        """The mean over ranks of rank-local numbers (a closure's losses), the same on
        every rank (one float64 all-reduce, collective with several ranks)."""
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        return self._placement.mean_over_ranks(t).tolist()

    def check_ranks_agree(self, settings: dict[str, Any]) -> None:
        """Refuse settings (outside the options: ``KFAC``'s damping adaptation) that differ
        between ranks (collective with several ranks; ``Replicate.check_same``).

        Raises:
            ValueError: on every rank, naming each setting that differs and every rank's
                value.
        """
        self._placement.check_same({k: repr(v) for k, v in settings.items()})

    # Diagnostics ---------------------------------------------------------------
    def _describe(self, layer: KFACLayer) -> dict[str, Any]:
        cap, d = layer.capture, layer.diag
        inv = {} if layer.inverse is None else layer.inverse.diagnostics()
        damping = self.options.damping if self.last_step is None else self.last_step.damping
        return {
            "layer": cap.name, "type": type(cap.module).__name__,
            "shape": (cap.out_features, cap.in_features),
            "policy": d.get("policy", "low-rank" if layer.low_rank else "eig"),
            "T": d.get("T"), "rank": inv.get("rank"), "damping": damping,
            "layer_damping": self._placement.layer_damping(layer, damping),
            "damping_mode": self.options.damping_mode, "rho": self.reduction_ratio,
            "jitter": inv.get("jitter"),
            "cond_A": inv.get("cond_A"), "cond_G": inv.get("cond_G"),
            "clipped_A": inv.get("clipped_A", 0), "clipped_G": inv.get("clipped_G", 0),
            "dropped_G": d.get("dropped_G"), "factor_updates": layer.a.updates,
            "nonfinite_skips": layer.nonfinite_skips, "owner": self._placement.owner(layer),
        }

    def describe(self) -> list[dict[str, Any]]:
        """One row per layer, as logged (logger ``kfac_optim``, INFO) at each inverse update.

        Keys: layer, type, shape ``(o, d)``, policy (``eig``/``woodbury``), T (columns added
        by the last low-rank update), rank (columns of a low-rank G, else o), damping (the
        value the last step used), layer_damping (the lambda this layer's inverse applied:
        ``damping``, times its mean Kronecker eigenvalue under ``damping_scale="relative"``),
        damping_mode, rho (the reduction ratio of the last damping adaptation,
        ``KFAC(damping_adaptation=...)``; None without), jitter (Cholesky jitter of the
        Woodbury system, factored mode), cond_A, cond_G (condition numbers after clipping; inf
        when singular), clipped_A, clipped_G (eigenvalues raised by ``max_condition_number``),
        dropped_G (trace fraction the last ``woodbury_rank`` truncation dropped, None if
        none), factor_updates, nonfinite_skips, owner (the owning rank in owner mode, else
        None; the factor columns are filled only on the owner).
        ``pandas.DataFrame(pre.describe())`` makes it a table.
        """
        return [self._describe(layer) for layer in self._layers.values()]

    def memory_usage(self) -> dict[str, Any]:
        """Bytes held per layer and in total.

        Returns:
            ``{"layers": {name: {"factors", "inverses", "low_rank", "total"}}, "total"}``:
            ``factors`` = dense A and G, ``low_rank`` = the stacked U of a Woodbury G,
            ``inverses`` = eigenbases, Grams and cached solver factors.
        """
        out = {name: layer.nbytes() for name, layer in self._layers.items()}
        return {"layers": out, "total": sum(row["total"] for row in out.values())}

    # State ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Tensors and plain values only, the same keys on every rank (schema:
        ``kfac_optim.state``).

        ``{"version", "steps", "layers": {name: {"A", "G", "G_low_rank", "inv",
        "nonfinite_skips", "positional"}}, "owners"}``: per-layer running factors and the
        inverse's tagged state. ``owners`` is None except in owner mode, where it is
        ``{"rank": this rank, "layers": {name: owner rank}}`` and the layers this rank
        does not own have empty entries (``ema`` / ``cols`` / ``inv`` None): each rank
        saves its own state and loads it back on the same rank of the same world size.
        With ``woodbury_reduction="row_sharded"`` a low-rank G (and its inverse) holds this
        rank's rows of U only (``G.rows``, ``inv.u_rows``): save one state per rank too.
        """
        return {"version": STATE_VERSION, "steps": self.steps,
                "layers": {name: layer.state_dict() for name, layer in self._layers.items()},
                "owners": self._placement.state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()`` (a state of an earlier release is converted by
        ``kfac_optim.state.upgrade_state``); tensors move to each layer's weight device.

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
        state = upgrade_state(state, {n: la.capture.out_features
                                      for n, la in self._layers.items()})
        self._placement.check_state(state.get("owners"))
        saved = state["layers"]
        if set(saved) != set(self._layers):
            missing = sorted(set(self._layers) - set(saved))
            extra = sorted(set(saved) - set(self._layers))
            raise RuntimeError(f"K-FAC state does not match the model (checkpoint mismatch?): "
                               f"layers missing from the state {missing}, unknown layers {extra}")
        for name, layer in self._layers.items():
            layer.check_state(saved[name])
        for name, layer in self._layers.items():
            layer.load_state_dict(saved[name], owned=self._placement.owns(layer))
        self.steps = int(state["steps"])


KFACPreconditioner.__init__.__signature__ = options_signature(KFACPreconditioner.__init__)
KFACPreconditioner.__doc__ += "\n" + options_doc()
