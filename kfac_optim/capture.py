"""Statistics capture: the hooks stage of K-FAC (docs/design.md: hooks -> factors -> reduction ->
inverses -> gradients).

For every forward call of the model a root pre-hook reads the token mask (``attention_mask``,
else ``labels != -100``, or what ``set_token_mask`` gave) and a root post-hook the number N
of loss terms (valid labels, shifted by one for Hugging Face causal LMs, else the output
rows) and the loss divisor (Trainer's ``num_items_in_batch``). A forward hook on each layer
pairs that call's input with the gradient of *its* output (a tensor hook, so forwards that
never see a backward add nothing), and the gradient hook adds the layer's batch statistics
to its running factors: ``A``'s sum of outer products and row count T, ``G``'s output
gradient rows (of the summed loss) and N (``factors``). With ``fisher_type`` "mc" / "type2"
the layer outputs are kept instead, and ``fisher_pass`` (automatic for Hugging Face models
given ``labels``, else ``KFACPreconditioner.fisher_backward``) backpropagates the vectors of
``kfac_optim.fisher`` to them: their gradients give G, the training loss's backward none.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from .factors import (
    RowSample,
    embedding_input_statistics,
    input_rows,
    output_grad_rows,
    valid_rows,
)
from .fisher import backward_to_outputs, check_likelihood, output_vectors
from .layers import IGNORE_INDEX, LayerCapture, is_causal_lm
from .options import KFACOptions

__all__ = ["IGNORE_INDEX", "StatisticsCapture", "accumulation_dtype"]

log = logging.getLogger("kfac_optim")


@dataclass
class BatchContext:
    """What one forward call of the whole model tells the layers.

    ``mask``: ``(B, S)`` token validity (1 valid, 0 padding) or None.
    ``num_loss_rows``: N, the number of loss terms of this forward.
    ``loss_divisor``: what the summed loss was divided by, when it is not N times
    ``accumulation_steps`` (Hugging Face ``num_items_in_batch``: the loss is normalised
    over the whole accumulated batch).
    ``grad_scale``: a GradScaler's scale when the forward ran (captured g are divided by it).
    ``counted``: layers that already counted N for this forward (a module applied
    several times in one forward adds rows to A, but its loss terms only once).
    """

    mask: Tensor | None = None
    num_loss_rows: Tensor | float | None = None
    loss_divisor: Tensor | float | None = None
    batch_size: int | None = None
    grad_scale: float = 1.0
    counted: set = field(default_factory=set)
    explicit_mask: bool = False  # given by set_token_mask or attention_mask (not from labels)
    captured: list = field(default_factory=list)  # (name, mask shape it needs) per capture
    mask_applied: bool = False


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    """Leading dim of the model's first tensor input (``input_ids`` / ``inputs_embeds``)."""
    for value in (*args, kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
        if isinstance(value, Tensor) and value.dim() >= 1:
            return value.shape[0]
    return None


def _is_single_label_classifier(model: nn.Module, labels: Tensor, logits: Tensor) -> bool:
    """A Hugging Face ``...ForSequenceClassification`` whose loss is cross-entropy over
    ``(B, C)`` logits (``problem_type`` unset or ``"single_label_classification"``, C > 1,
    integer labels), as its forward decides."""
    config = getattr(model, "config", None)
    return (type(model).__name__.endswith("ForSequenceClassification") and config is not None
            and getattr(config, "problem_type", None) in (None, "single_label_classification")
            and logits.dim() == 2 and logits.shape[-1] > 1
            and not labels.is_floating_point() and labels.numel() == logits.shape[0])


def accumulation_dtype(cap: LayerCapture, factor_dtype: torch.dtype | None) -> torch.dtype:
    """float64 for float64 layers or storage, else float32 (half precision storage
    accumulates in float32)."""
    wide = factor_dtype == torch.float64 or (factor_dtype is None
                                             and cap.weight.dtype == torch.float64)
    return torch.float64 if wide else torch.float32


class StatisticsCapture:
    """The hooks that feed each layer's running factors.

    Args:
        layers: ``{name: layer}``, each with ``capture`` (a ``LayerCapture``), running
            factors ``a`` and ``g``, ``ekfac_rows`` (None, or a list collecting
            ``(a_rows, g_rows)`` for EKFAC), ``positional`` and ``low_rank``; the dict is
            shared with the preconditioner and read at every hook call.
        options: the preconditioner's options.
        capturing: whether the current step's passes feed the factors.

    Attributes:
        loss_divisor_ranks: divides Trainer's ``num_items_in_batch`` (it multiplies a
            loss normalised over the global token count by the number of processes).
        pending_scale: the GradScaler scale of the statistics pending since the last
            factor update (None when nothing is pending).
        row_sample: with ``factor_row_limit``, the ``RowSample`` that dense factors are
            estimated from (its CPU generator seeded with ``torch.initial_seed()`` at
            construction), else None.
    """

    def __init__(self, layers: dict[str, Any], options: KFACOptions,
                 capturing: Callable[[], bool]) -> None:
        self.layers = layers
        self.options = options
        self.capturing = capturing
        self.loss_divisor_ranks = 1
        self.pending_scale: float | None = None
        self._ctx: BatchContext | None = None
        self._pending_mask: tuple[Tensor | None, Any] | None = None
        # "mc" / "type2": (layer, input, context, output) of the forwards awaiting their extra
        # backward, and the number of capturing forwards that never got one
        self._fisher_outputs: list[tuple[Any, Tensor, BatchContext | None, Tensor]] = []
        self.fisher_missed = 0
        self._generators: dict[torch.device, torch.Generator] = {}
        self.row_sample: RowSample | None = None
        if options.factor_row_limit is not None:
            generator = torch.Generator().manual_seed(torch.initial_seed())
            self.row_sample = RowSample(options.factor_row_limit, generator)

    def register(self, model: nn.Module) -> list:
        """Register the per-layer forward hooks and the root hooks on ``model``; returns
        the handles."""
        handles = [layer.capture.module.register_forward_hook(partial(self._forward_hook, layer))
                   for layer in self.layers.values()]
        handles.append(model.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True))
        handles.append(model.register_forward_hook(self._root_post_hook, with_kwargs=True))
        return handles

    def set_token_mask(self, mask: Tensor | None, num_loss_rows: int | Tensor | None = None):
        """See ``KFACPreconditioner.set_token_mask``."""
        if mask is not None and not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor of shape (B, S) or None, got "
                            f"{type(mask).__name__}")
        if num_loss_rows is None and mask is not None:
            num_loss_rows = mask.sum()
        self._pending_mask = (mask, num_loss_rows)

    def drop_pending(self) -> int:
        """Clear every layer's pending statistics; returns how many layers had some."""
        dropped = 0
        for layer in self.layers.values():
            dropped += int(layer.a.pending)
            layer.a.take_batch()
            layer.g.take_batch()
        return dropped

    def _grad_scale(self) -> float:
        """The GradScaler's current scale; drops statistics of an overflowed step.

        ``GradScaler.step`` skips ``step()`` when gradients overflowed, then ``update()``
        backs the scale off: statistics still pending under another scale are from that
        skipped step (their g were inf/NaN), and are dropped.
        """
        scaler = self.options.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return 1.0
        scale = scaler.get_scale()
        if self.pending_scale is not None and self.pending_scale != scale:
            dropped = self.drop_pending()
            log.info("dropped statistics of %d layers from an overflowed step", dropped)
        self.pending_scale = scale
        return scale

    def _root_pre_hook(self, module, args, kwargs):
        self._forget_fisher_outputs()
        explicit = True  # a mask the user gave (set_token_mask, attention_mask)
        if self._pending_mask is not None:
            mask, rows = self._pending_mask
            self._pending_mask = None
        else:
            mask, rows = kwargs.get("attention_mask"), None
            labels = kwargs.get("labels")
            if mask is None and isinstance(labels, Tensor):
                mask, explicit = labels != IGNORE_INDEX, False
        self._ctx = BatchContext(mask=mask, num_loss_rows=rows, grad_scale=self._grad_scale(),
                                 batch_size=_batch_size(args, kwargs),
                                 explicit_mask=mask is not None and explicit)

    def _root_post_hook(self, module, args, kwargs, output):
        ctx = self._ctx
        if ctx is None:
            return
        self._read_loss_count(ctx, module, kwargs, output)
        if self._fisher_outputs:
            self._automatic_fisher_pass(module, kwargs, output)

    def _read_loss_count(self, ctx: BatchContext, module, kwargs, output) -> None:
        """The mask check, the loss divisor and N of this forward (``BatchContext``)."""
        if ctx.explicit_mask and ctx.captured and not ctx.mask_applied:
            expected = sorted({f"{tuple(shape)} for '{name}'" for name, shape in ctx.captured
                               if -1 not in tuple(shape)})
            raise ValueError(
                f"token mask of shape {tuple(ctx.mask.shape)} applies to no K-FAC layer (a mask "
                "is (B, S): the leading dims of the layers' inputs); padding rows would enter "
                f"the factors. Expected shapes: {', '.join(expected) or 'none (no token layer)'}")
        items = kwargs.get("num_items_in_batch")
        if items is not None and self.options.loss_reduction == "mean":
            ctx.loss_divisor = items / self.loss_divisor_ranks
        if ctx.num_loss_rows is not None:
            return
        labels = kwargs.get("labels")
        if isinstance(labels, Tensor):
            if is_causal_lm(module):
                labels = labels[..., 1:]
            ctx.num_loss_rows = (labels != IGNORE_INDEX).sum()
            return
        logits = output if isinstance(output, Tensor) else getattr(output, "logits", None)
        if isinstance(logits, Tensor) and logits.dim() >= 1:
            rows = logits.shape[:-1] if logits.dim() > 1 else torch.Size([1])
            if ctx.mask is not None and ctx.mask.shape == rows:
                ctx.num_loss_rows = ctx.mask.sum()
            else:
                ctx.num_loss_rows = float(math.prod(rows))

    # Fisher type "mc" / "type2" (kfac_optim.fisher) -----------------------------------
    def _forget_fisher_outputs(self) -> None:
        """Drop outputs that never got their extra backward (counted in ``fisher_missed``)."""
        if self._fisher_outputs:
            self.fisher_missed += 1
            self._fisher_outputs = []

    def check_fisher_passes(self) -> None:
        """At a capturing ``step()`` with ``"mc"`` / ``"type2"``: every captured forward got
        its extra backward.

        Raises:
            RuntimeError: some did not (their layers would have no G statistics), saying
                what to call; the count is reset.
        """
        missed = self.fisher_missed + bool(self._fisher_outputs)
        self.fisher_missed, self._fisher_outputs = 0, []
        if missed:
            raise RuntimeError(
                f"fisher_type={self.options.fisher_type!r}: {missed} forward call(s) at this "
                "factor-update step got no extra Fisher backward, so their G statistics are "
                "missing. Call pre.fisher_backward(logits, likelihood='categorical' or "
                "'gaussian') after each forward and before loss.backward() (Hugging Face "
                "causal LMs and single-label sequence classifiers given labels do it "
                "themselves), or use fisher_type='empirical'")

    def _generator(self, device: torch.device) -> torch.Generator | None:
        """``fisher_seed``'s generator on ``device`` (None: the global RNG)."""
        seed = self.options.fisher_seed
        if seed is None or self.options.fisher_type != "mc":
            return None
        if device not in self._generators:
            import torch.distributed as dist

            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            self._generators[device] = torch.Generator(device=device).manual_seed(seed + rank)
        return self._generators[device]

    def _automatic_fisher_pass(self, module: nn.Module, kwargs: dict, output: Any) -> None:
        """Run ``fisher_pass`` for a Hugging Face model that computed its own cross-entropy
        from ``labels``: a causal LM (the logits at position t predict label t + 1: rows whose
        shifted label is ``IGNORE_INDEX``, and the last position, get no vector) or a
        single-label ``...ForSequenceClassification`` (rows whose label is ``IGNORE_INDEX``
        get none). Other models call ``fisher_pass`` themselves."""
        labels = kwargs.get("labels")
        logits = getattr(output, "logits", None)
        if not isinstance(labels, Tensor) or not isinstance(logits, Tensor):
            return
        if is_causal_lm(module):
            mask = torch.zeros(logits.shape[:-1], dtype=torch.bool, device=logits.device)
            mask[..., :-1] = labels[..., 1:] != IGNORE_INDEX
        elif _is_single_label_classifier(module, labels, logits):
            mask = (labels != IGNORE_INDEX).reshape(logits.shape[:-1])
        else:
            return
        self.fisher_pass(logits, "categorical", mask)

    def fisher_pass(self, logits: Tensor, likelihood: str, mask: Tensor | None = None,
                    generator: torch.Generator | None = None) -> bool:
        """See ``KFACPreconditioner.fisher_backward``; returns whether statistics were added."""
        check_likelihood(likelihood)
        if not isinstance(logits, Tensor) or logits.dim() < 1:
            raise TypeError("logits must be a tensor of shape (..., C), got "
                            f"{type(logits).__name__}")
        if mask is not None and tuple(mask.shape) != tuple(logits.shape[:-1]):
            raise ValueError(f"mask of shape {tuple(mask.shape)} must have the logits' leading "
                             f"shape {tuple(logits.shape[:-1])}")
        entries, self._fisher_outputs = self._fisher_outputs, []
        if not entries:
            return False
        if not logits.requires_grad:
            raise RuntimeError("fisher_backward needs the logits of the forward K-FAC captured, "
                               "with their graph (not detached, not after a backward that freed "
                               "it: call it before loss.backward(), or backward with "
                               "retain_graph=True)")
        if generator is None:
            generator = self._generator(logits.device)
        vectors = output_vectors(logits, likelihood, self.options.fisher_type, mask, generator)
        outputs = [entry[3] for entry in entries]
        for k, grads in enumerate(backward_to_outputs(logits, outputs, vectors)):
            for (layer, x, ctx, _), grad in zip(entries, grads, strict=True):
                if grad is not None:  # None: this output does not reach the logits
                    self._add_statistics(layer, x, ctx, grad, empirical=False, with_a=k == 0)
        return True

    def _forward_hook(self, layer: Any, module, inputs, output):
        layer.hooked = True
        if not (self.capturing() and module.training and torch.is_grad_enabled()):
            return
        if layer.positional:
            return
        if not isinstance(output, Tensor) or not output.requires_grad or not inputs:
            return
        ctx = self._ctx
        if (layer.capture.diagonal_a and ctx is not None and (ctx.batch_size or 1) > 1
                and inputs[0].dim() > 1 and inputs[0].shape[0] == 1):
            # ids shared by the whole batch (a positional table, broadcast over it): its
            # output gradient sums over samples, so it has no per-row Fisher factors.
            layer.positional = True
            log.info("K-FAC: '%s' is looked up with ids shared across the batch (a positional "
                     "table): left to the base update", layer.capture.name)
            return
        if ctx is not None and ctx.mask is not None:
            shape = layer.capture.mask_shape(inputs[0])
            ctx.captured.append((layer.capture.name, shape))
            ctx.mask_applied |= ctx.mask.shape == shape
        if self.options.fisher_type != "empirical":
            # G from the extra backward of ``fisher_pass``, which pairs this input with the
            # gradient of this output; the training loss's backward adds nothing. A forward
            # run inside a backward is an activation-checkpoint recomputation: the first
            # forward's outputs, already kept, are the ones on the graph.
            if torch._C._current_graph_task_id() == -1:
                self._fisher_outputs.append((layer, inputs[0].detach(), ctx, output))
            return
        # Pair this call's input with the gradient of *this* output: forwards that never
        # see a backward (activation-checkpoint recomputation, unused outputs) add nothing.
        output.register_hook(partial(self._grad_hook, layer, inputs[0].detach(), self._ctx))

    def _grad_hook(self, layer: Any, x: Tensor, ctx: BatchContext | None, grad: Tensor):
        self._add_statistics(layer, x, ctx, grad, empirical=True)

    def _add_statistics(self, layer: Any, x: Tensor, ctx: BatchContext | None, grad: Tensor,
                        empirical: bool, with_a: bool = True) -> None:
        """Add one forward call's statistics: A (unless ``with_a`` is False: a further
        vector of the same forward) and the G rows of the output gradient ``grad``: the
        training loss's (``empirical``: turned into a gradient of the summed loss by
        ``loss_reduction``, ``accumulation_steps`` and the GradScaler's scale), or one vector
        of ``"mc"`` / ``"type2"``, already of the summed loss and unscaled."""
        cap = layer.capture
        opts = self.options
        dtype = accumulation_dtype(cap, opts.factor_dtype)
        rows = cap.input_rows(x)
        mask = None
        if ctx is not None and ctx.mask is not None and ctx.mask.shape == cap.mask_shape(x):
            mask = ctx.mask.reshape(rows.shape[:2])
        if cap.diagonal_a:
            a_rows = rows.reshape(-1)  # token ids
            a_sum, t = embedding_input_statistics(rows, mask, num_embeddings=cap.in_features,
                                                  dtype=dtype)
            approx = "expand"
        else:
            approx = opts.kfac_approx
            a_rows, t = input_rows(rows, mask, has_bias=cap.has_bias, approx=approx, dtype=dtype)
        sample = self.row_sample
        valid = None if sample is None else valid_rows(mask, approx)
        if not cap.diagonal_a:
            a_sum = None if not with_a else (
                a_rows.t() @ a_rows if sample is None else sample.outer_sum(a_rows, valid))
        n = t if ctx is None or ctx.num_loss_rows is None else ctx.num_loss_rows
        scale = 1.0
        if empirical and opts.loss_reduction == "mean":
            divisor = None if ctx is None else ctx.loss_divisor
            scale = n * opts.accumulation_steps if divisor is None else divisor
        if empirical and ctx is not None and ctx.grad_scale != 1.0:
            scale = scale / ctx.grad_scale
        g_rows = output_grad_rows(cap.output_grad_rows(grad), mask, scale=scale, approx=approx,
                                  dtype=dtype)
        first = with_a and (ctx is None or id(layer) not in ctx.counted)
        if ctx is not None:
            ctx.counted.add(id(layer))
        if with_a:
            layer.a.add_sum(a_sum, t)
        if layer.ekfac_rows is not None:
            layer.ekfac_rows.append(self._ekfac_terms(cap, rows, mask, grad, scale, a_rows,
                                                      g_rows, approx, dtype))
        count = n if first else 0.0
        if layer.low_rank:
            if mask is not None and approx == "expand":
                g_rows = g_rows[mask.reshape(-1).bool()]  # padding rows are zero columns of U
            layer.g.add(g_rows, count)  # its columns: every row (no subsample)
        elif sample is not None:
            layer.g.add_sum(sample.outer_sum(g_rows, valid), count)
        else:
            layer.g.add(g_rows, count)

    @staticmethod
    def _ekfac_terms(cap: LayerCapture, rows: Tensor, mask: Tensor | None, grad: Tensor,
                     scale: float | Tensor, a_rows: Tensor, g_rows: Tensor, approx: str,
                     dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The rows EKFAC squares, grouped by loss term (docs/design.md, "Weight sharing and
        EKFAC"): ``(a (rows, d), g (rows, o))`` when every row is a loss term (a position of
        a token-level loss under ``"expand"``, or a layer without weight sharing), else
        ``(a (B, R, d), g (B, R, o))``, the unreduced rows of each sample, whose gradient
        ``sum_r g_{n,r} a_{n,r}^T`` is the loss term's (a convolution: one loss per image;
        ``"reduce"``: one loss per sequence)."""
        if cap.diagonal_a or (approx == "expand" and cap.positions_are_loss_terms):
            return a_rows, g_rows
        if approx != "expand":
            a_rows, _ = input_rows(rows, mask, has_bias=cap.has_bias, approx="expand",
                                   dtype=dtype)
            g_rows = output_grad_rows(cap.output_grad_rows(grad), mask, scale=scale,
                                      approx="expand", dtype=dtype)
        shape = rows.shape[:2]
        return a_rows.reshape(*shape, -1), g_rows.reshape(*shape, -1)
