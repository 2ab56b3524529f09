"""Per-module capture: the only code that knows a layer type.

Every supported module is seen through the same three views, in the weight-matrix
convention of K-FAC (Martens & Grosse 2015): a weight ``W`` of shape ``(o, d)``
maps an input row ``a`` (``d`` features, plus a trailing 1 when the layer has a
bias) to an output row ``s = W a`` (``o`` features).

- ``input_rows(x)``: layer input -> ``(B, R, d)``; ``R`` indexes the positions that
  share the weight (sequence positions, or conv output locations; ``R = 1`` for
  a plain batch of vectors). For ``nn.Embedding`` the rows are token ids ``(B, R)``
  and the A factor is diagonal (token counts).
- ``output_grad_rows(g)``: gradient w.r.t. the layer output -> ``(B, R, o)``.
- ``grad_matrix()`` / ``set_grad_matrix(V)``: the parameter gradients as one
  ``(o, d [+1])`` matrix, bias as the last column, and back.

Everything after these views (factors, inverses, preconditioning) is generic.

This module is the layer registry of both packages (``fisher_metrics`` imports it; nothing
here imports ``fisher_metrics``):

- ``LAYER_KINDS`` / ``layer_kind(module)``: ``"linear"`` (``nn.Linear``), ``"conv1d"``
  (Hugging Face ``transformers.pytorch_utils.Conv1D``), ``"conv2d"`` (``nn.Conv2d``),
  ``"embedding"`` (``nn.Embedding``); each ``LayerCapture`` subclass names its ``kind``.
- The weight-matrix convention on plain tensors: ``matrix_shape``, ``weight_matrix`` and
  ``parameters_from_matrix``. ``nn.Linear`` weight ``(o, d)`` is ``W``; ``Conv1D`` stores
  ``(d, o)`` (``W^T``); ``nn.Conv2d`` weight ``(o, C, kh, kw)`` is ``W`` reshaped to
  ``(o, C kh kw)``; ``nn.Embedding`` weight ``(V, D)`` is ``W^T`` with ``o = D``, ``d = V``.
  The bias, when present, is the last column. ``grad_matrix`` / ``set_grad_matrix`` are
  these functions applied to the gradients.
- ``nn.MultiheadAttention``: ``attention_layers`` gives its four layers (``InProjection``
  blocks q, k, v of the packed ``in_proj_weight``, and ``out_proj``) and the forward that
  runs them as hooked module calls (``AttentionLayers.install`` / ``remove``).
- Hugging Face losses: ``IGNORE_INDEX`` (labels that are not loss terms) and
  ``is_causal_lm(model)`` (the model shifts its labels by one).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache, partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["IGNORE_INDEX", "LAYER_KINDS", "AttentionLayers", "InProjection", "LayerCapture",
           "SUPPORTED_MODULES", "attention_layers", "capture_for", "fsdp1_root", "is_causal_lm",
           "is_supported", "layer_kind", "matrix_shape", "parameters_from_matrix",
           "strip_wrapper_names", "weight_matrix"]

SUPPORTED_MODULES = ("Linear", "Conv2d", "Embedding", "transformers Conv1D",
                     "MultiheadAttention")
LAYER_KINDS = ("linear", "conv1d", "conv2d", "embedding")
# Kinds whose stored weight is the transpose of the K-FAC matrix W (o, d).
_TRANSPOSED = ("conv1d", "embedding")

IGNORE_INDEX = -100
"""Label value that is not a loss term (PyTorch's ``cross_entropy`` and Hugging Face default)."""


def _is_hf_conv1d(module: nn.Module) -> bool:
    # Avoid importing transformers (slow) just to test a type.
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def layer_kind(module: nn.Module) -> str | None:
    """K-FAC layer kind of ``module``: one of ``LAYER_KINDS``, or None if unsupported.

    ``"conv1d"`` is the Hugging Face ``transformers.pytorch_utils.Conv1D`` (recognised by
    its class name and module, without importing transformers).
    """
    if isinstance(module, (nn.Linear, InProjection)):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if _is_hf_conv1d(module):
        return "conv1d"
    return None


def is_supported(module: nn.Module) -> bool:
    """Whether ``module`` is a layer type K-FAC preconditions (see ``SUPPORTED_MODULES``)."""
    return layer_kind(module) is not None


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face causal LM (its loss shifts the labels by one).

    A class name ending with ``ForCausalLM`` or ``LMHeadModel``, or, for a class from
    ``transformers``, one listed in transformers' ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``
    (e.g. ``ReformerModelWithLMHead``, ``BertGenerationDecoder``). transformers is imported
    only for a model whose class comes from it.
    """
    return _is_causal_lm_class(type(model))


@lru_cache(maxsize=256)
def _is_causal_lm_class(cls: type) -> bool:
    name = cls.__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return True
    if not cls.__module__.startswith("transformers."):
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        if name in (value if isinstance(value, (tuple, list)) else [value]):
            return True
    return False


# The weight-matrix convention, on plain tensors --------------------------------------
def _check_kind(kind: str) -> None:
    if kind not in LAYER_KINDS:
        raise ValueError(f"kind must be one of {LAYER_KINDS}; got {kind!r}")


def matrix_shape(kind: str, weight_shape: Sequence[int], has_bias: bool = False
                 ) -> tuple[int, int]:
    """``(o, d)`` of the K-FAC matrix of a ``kind`` layer whose weight has ``weight_shape``;
    ``d`` counts the bias column when ``has_bias``.

    Raises:
        ValueError: ``kind`` is not one of ``LAYER_KINDS``.
    """
    _check_kind(kind)
    shape = tuple(weight_shape)
    if kind in _TRANSPOSED:
        o, d = shape[1], shape[0]
    else:
        o = shape[0]
        d = 1
        for size in shape[1:]:
            d *= size
    return o, d + int(has_bias)


def _weight_view(kind: str, weight: Tensor) -> Tensor:
    """The weight (or its gradient) as ``(o, d)``, a view where possible."""
    if kind in _TRANSPOSED:
        return weight.t()
    if kind == "conv2d":
        return weight.reshape(weight.shape[0], -1)
    return weight


def _with_bias(w: Tensor, bias: Tensor | None) -> Tensor:
    return w if bias is None else torch.cat([w, bias.reshape(-1, 1)], dim=1)


def weight_matrix(kind: str, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """A ``kind`` layer's parameter tensors (or gradients, or any tensors of their shapes) as
    the K-FAC matrix ``(o, d [+1])``, bias the last column (module docstring).

    Raises:
        ValueError: ``kind`` is not one of ``LAYER_KINDS``.
    """
    _check_kind(kind)
    return _with_bias(_weight_view(kind, weight), bias)


def parameters_from_matrix(kind: str, V: Tensor, weight_shape: Sequence[int], has_bias: bool
                           ) -> tuple[Tensor, Tensor | None]:
    """Inverse of ``weight_matrix``: ``V`` ``(o, d [+1])`` -> ``(weight, bias or None)``, the
    weight of shape ``weight_shape`` (views of ``V`` where possible).

    Raises:
        ValueError: ``kind`` is not one of ``LAYER_KINDS``.
    """
    _check_kind(kind)
    bias = None
    if has_bias:
        bias, V = V[:, -1], V[:, :-1]
    if kind in _TRANSPOSED:
        V = V.t()
    return V.reshape(tuple(weight_shape)), bias


def _full(t: Tensor) -> Tensor:
    """The whole tensor: a sharded DTensor (FSDP2) is gathered (G mixes rows)."""
    return t.full_tensor() if _is_dtensor(t) else t


def _assign(dst: Tensor, value: Tensor) -> None:
    """Copy a full-shape ``value`` into ``dst``, keeping only this rank's shard of a DTensor."""
    if not _is_dtensor(dst):
        dst.copy_(value)
        return
    from torch.distributed.tensor import DTensor, Replicate

    replicated = DTensor.from_local(value, dst.device_mesh, [Replicate()] * dst.device_mesh.ndim,
                                    run_check=False)
    # Replicate -> Shard is a local slice, no communication.
    dst.to_local().copy_(replicated.redistribute(dst.device_mesh, dst.placements).to_local())


def _is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor"


# FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel) flattens every parameter of a
# wrapped unit into one FlatParameter and marks the originals with this attribute; outside
# forward/backward an original (use_orig_params=True) is a 1-D view of the part of it that
# falls in this rank's shard (possibly empty), and its grad is that slice or None.
_FSDP1_FLATTENED = "_fsdp_flattened"
_FSDP1_WRAPPED = "_fsdp_wrapped_module"
_FSDP1_WORKS = ("use FSDP1 with use_orig_params=True and build K-FAC on the wrapper, or FSDP2 "
                "(torch.distributed.fsdp.fully_shard), or DDP")


def _is_fsdp1_wrapper(module: nn.Module) -> bool:
    return type(module).__name__ == "FullyShardedDataParallel" and hasattr(module, _FSDP1_WRAPPED)


def fsdp1_root(model: nn.Module) -> nn.Module | None:
    """The module to gather FSDP1 parameters through, or None when ``model`` has none.

    K-FAC needs whole weight matrices: under FSDP1 each step's gradients are seen whole
    inside ``FullyShardedDataParallel.summon_full_params(root, with_grads=True)``, which
    needs ``use_orig_params=True`` and the wrappers inside ``model``.

    Raises:
        ValueError: FSDP1 with ``use_orig_params=False`` (only FlatParameters are left), or
            FSDP1-flattened parameters whose wrapper is not in ``model`` (K-FAC was given
            the wrapper's inner module); the message says what works.
    """
    wrappers = [m for m in model.modules() if _is_fsdp1_wrapper(m)]
    if any(not getattr(w, "_use_orig_params", True) for w in wrappers) or any(
            type(p).__name__ == "FlatParameter" for p in model.parameters()):
        raise ValueError("K-FAC cannot precondition FSDP1 (torch.distributed.fsdp."
                         "FullyShardedDataParallel) with use_orig_params=False: its parameters "
                         f"are flat shards that cut across layers; {_FSDP1_WORKS}")
    if wrappers:
        return model
    if any(getattr(p, _FSDP1_FLATTENED, False) for p in model.parameters()):
        raise ValueError("K-FAC was given the inner module of an FSDP1 (torch.distributed.fsdp."
                         "FullyShardedDataParallel) wrapper: its parameters are flat shards "
                         f"outside forward; {_FSDP1_WORKS}")
    return None


def strip_wrapper_names(name: str) -> str:
    """A module name without FSDP1's ``_fsdp_wrapped_module`` segments (the name the layer
    has in the unwrapped model, so checkpoints and ``skip_layers`` carry over)."""
    return ".".join(part for part in name.split(".") if part != _FSDP1_WRAPPED)


def _rows_of_vectors(x: Tensor) -> Tensor:
    """``(..., f)`` -> ``(B, R, f)``: leading dim is the batch, the rest are positions."""
    if x.dim() == 1:
        return x.reshape(1, 1, -1)
    if x.dim() == 2:
        return x.unsqueeze(1)
    return x.reshape(x.shape[0], -1, x.shape[-1])


class LayerCapture:
    """Base view of one preconditioned module; subclasses override the three views.

    Attributes:
        kind: the layer kind, one of ``LAYER_KINDS`` (the weight-matrix convention).
        name: the module's qualified name in the model.
        module: the module itself.
        diagonal_a: True when A is stored as its diagonal (Embedding).
        in_features: ``d`` including the bias column.
        out_features: ``o``.
    """

    kind = "linear"
    diagonal_a = False

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.module = module
        # Read once, while the weight is whole: FSDP1 leaves a flat shard between steps.
        self._shape = self._weight_shape()

    @property
    def weight(self) -> Tensor:
        return self.module.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.module, "bias", None)

    @property
    def has_bias(self) -> bool:
        return self.bias is not None

    @property
    def params(self) -> list[Tensor]:
        return [p for p in (self.weight, self.bias) if p is not None]

    def mask_shape(self, x: Tensor) -> torch.Size:
        """Shape a token mask must have to apply to this layer's rows (input's leading dims)."""
        return x.shape[:-1]

    # The three per-type views -------------------------------------------------
    def input_rows(self, x: Tensor) -> Tensor:
        return _rows_of_vectors(x)

    def output_grad_rows(self, g: Tensor) -> Tensor:
        return _rows_of_vectors(g)

    def _weight_matrix_grad(self) -> Tensor:
        return _weight_view(self.kind, _full(self.weight.grad))

    # Generic ------------------------------------------------------------------
    @property
    def out_features(self) -> int:
        return self._shape[0]

    @property
    def in_features(self) -> int:
        return self._shape[1] + int(self.has_bias)

    def _weight_shape(self) -> tuple[int, int]:
        return matrix_shape(self.kind, self.weight.shape)

    def has_grad(self) -> bool:
        return self.weight.grad is not None

    def grad_matrix(self) -> Tensor:
        """Gradient as ``(o, d [+1])``, bias gradient as the last column.

        Raises:
            RuntimeError: the gradient is not the whole weight's (an FSDP1 flat shard: K-FAC
                was built before wrapping, or is stepped outside its gather).
        """
        v = self._weight_matrix_grad()
        if tuple(v.shape) != self._shape:
            raise RuntimeError(
                f"layer '{self.name}': gradient of shape {tuple(self.weight.grad.shape)}, not "
                f"the whole weight's (o, d) = {self._shape}: a flat shard, as FSDP1 leaves "
                f"between steps; {_FSDP1_WORKS}")
        if self.has_bias:
            b = self._bias_grad()
            v = _with_bias(v, torch.zeros_like(v[:, 0]) if b is None else b)
        return v

    def _bias_grad(self) -> Tensor | None:
        return None if self.bias.grad is None else _full(self.bias.grad)

    def set_grad_matrix(self, v: Tensor) -> None:
        """Write a ``(o, d [+1])`` matrix back into the parameters' ``.grad``."""
        weight, bias = parameters_from_matrix(self.kind, v, self.weight.shape, self.has_bias)
        if bias is not None:
            if self.bias.grad is None:
                self.bias.grad = torch.zeros_like(self.bias)
            _assign(self.bias.grad, bias)
        _assign(self.weight.grad, weight)


class LinearCapture(LayerCapture):
    """``nn.Linear``: weight ``(o, d)``; any leading dims, every token is a row."""

    kind = "linear"


class HFConv1DCapture(LayerCapture):
    """``transformers.pytorch_utils.Conv1D`` (GPT-2): ``y = x @ W + b`` with W ``(d, o)``."""

    kind = "conv1d"


class Conv2dCapture(LayerCapture):
    """``nn.Conv2d`` as in KFC (Grosse & Martens 2016): rows are im2col patches.

    Input ``(B, C, H, W)`` -> ``(B, L, C kh kw)`` with ``L = H_out W_out`` positions;
    output gradient ``(B, o, H_out, W_out)`` -> ``(B, L, o)``. Stride, zero padding and
    dilation are supported; ``groups > 1`` and non-zero padding modes are refused.
    """

    kind = "conv2d"

    def __init__(self, name: str, module: nn.Conv2d):
        super().__init__(name, module)
        if module.groups != 1:
            raise ValueError(
                f"layer '{name}': Conv2d with groups={module.groups} is not supported "
                "(accepted: groups=1); add it to skip_layers to leave it to the base update"
            )
        if module.padding_mode != "zeros":
            raise ValueError(
                f"layer '{name}': Conv2d padding_mode='{module.padding_mode}' is not supported "
                "(accepted: 'zeros'); add it to skip_layers"
            )
        self._padding = self._explicit_padding(name, module)

    @staticmethod
    def _explicit_padding(name: str, module: nn.Conv2d) -> tuple[int, int]:
        if module.padding == "valid":
            return (0, 0)
        if module.padding == "same":
            pairs = zip(module.dilation, module.kernel_size, strict=True)
            total = [dl * (k - 1) for dl, k in pairs]
            if any(t % 2 for t in total):
                raise ValueError(
                    f"layer '{name}': Conv2d padding='same' with an even receptive field pads "
                    "asymmetrically, which is not supported (accepted: integer padding, 'valid', "
                    "or 'same' with odd dilation*(kernel-1)); add it to skip_layers"
                )
            return (total[0] // 2, total[1] // 2)
        return tuple(module.padding)

    def input_rows(self, x: Tensor) -> Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(0)
        m = self.module
        cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=self._padding,
                        stride=m.stride)
        return cols.transpose(1, 2)

    def output_grad_rows(self, g: Tensor) -> Tensor:
        if g.dim() == 3:
            g = g.unsqueeze(0)
        return g.flatten(2).transpose(1, 2)

    def mask_shape(self, x: Tensor) -> torch.Size:
        # A token mask never applies to image positions.
        return torch.Size([-1])


class EmbeddingCapture(LayerCapture):
    """``nn.Embedding``: ``s = W^T onehot(i)``, so in K-FAC convention o = embedding_dim,
    d = num_embeddings, and ``A = diag(token counts) / T`` (stored as a vector).
    """

    kind = "embedding"
    diagonal_a = True

    def __init__(self, name: str, module: nn.Embedding):
        super().__init__(name, module)
        if module.max_norm is not None:
            raise ValueError(
                f"layer '{name}': Embedding with max_norm renormalises weights in forward and is "
                "not supported (accepted: max_norm=None); add it to skip_layers"
            )

    def input_rows(self, x: Tensor) -> Tensor:
        if x.dim() == 0:
            return x.reshape(1, 1)
        if x.dim() == 1:
            return x.unsqueeze(1)
        return x.reshape(x.shape[0], -1)

    def mask_shape(self, x: Tensor) -> torch.Size:
        return x.shape

    def _weight_matrix_grad(self) -> Tensor:
        g = _full(self.weight.grad)
        if g.is_sparse:
            raise ValueError(
                f"layer '{self.name}': sparse Embedding gradients are not supported "
                "(accepted: sparse=False)"
            )
        return _weight_view(self.kind, g)


class InProjection(nn.Module):
    """One of the query, key, value input projections of an ``nn.MultiheadAttention`` as a
    module K-FAC can hook: ``y = x W_i^T + b_i``, ``W_i`` / ``b_i`` the block's rows of
    ``in_proj_weight`` / ``in_proj_bias`` (or ``q_proj_weight``, ``k_proj_weight``,
    ``v_proj_weight`` when ``kdim`` / ``vdim`` differ). Not a child of the attention: the
    model's modules, parameters and state dict are unchanged.
    """

    def __init__(self, attention: nn.MultiheadAttention, index: int) -> None:
        super().__init__()
        self.index = index
        self.__dict__["attention"] = attention  # a reference, not a registered child

    @property
    def param(self) -> Tensor:
        """The parameter holding this block's weight."""
        a = self.attention
        return a.in_proj_weight if a._qkv_same_embed_dim else getattr(
            a, "qkv"[self.index] + "_proj_weight")

    @property
    def rows(self) -> slice | None:
        """This block's rows of ``param`` (None: all of them)."""
        e = self.attention.embed_dim
        return slice(self.index * e, (self.index + 1) * e) if self.attention._qkv_same_embed_dim \
            else None

    @property
    def bias_rows(self) -> slice:
        e = self.attention.embed_dim
        return slice(self.index * e, (self.index + 1) * e)

    @property
    def weight(self) -> Tensor:
        w = self.param
        return w if self.rows is None else w[self.rows]

    @property
    def bias(self) -> Tensor | None:
        b = self.attention.in_proj_bias
        return None if b is None else b[self.bias_rows]

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


def _block(grad: Tensor | None, rows: slice | None) -> Tensor | None:
    if grad is None:
        return None
    grad = _full(grad)
    return grad if rows is None else grad[rows]


def _assign_rows(param: Tensor, rows: slice | None, value: Tensor) -> None:
    """Write ``value`` into ``rows`` of ``param.grad`` (created as zeros if missing)."""
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    if rows is None:
        _assign(param.grad, value)
    elif not _is_dtensor(param.grad):
        param.grad[rows].copy_(value)
    else:
        whole = _full(param.grad).clone()
        whole[rows] = value
        _assign(param.grad, whole)


class InProjectionCapture(LayerCapture):
    """An ``InProjection`` block: an ``nn.Linear`` view of rows of the attention's packed
    weight; the gradients are read from and written to those rows."""

    kind = "linear"

    @property
    def params(self) -> list[Tensor]:
        bias = self.module.attention.in_proj_bias
        return [p for p in (self.module.param, bias) if p is not None]

    def has_grad(self) -> bool:
        return self.module.param.grad is not None

    def _weight_matrix_grad(self) -> Tensor:
        return _block(self.module.param.grad, self.module.rows)

    def _bias_grad(self) -> Tensor | None:
        return _block(self.module.attention.in_proj_bias.grad, self.module.bias_rows)

    def set_grad_matrix(self, v: Tensor) -> None:
        m = self.module
        weight, bias = parameters_from_matrix(self.kind, v, self.weight.shape, self.has_bias)
        _assign_rows(m.param, m.rows, weight)
        if bias is not None:
            _assign_rows(m.attention.in_proj_bias, m.bias_rows, bias)


def _attention_forward(attention: nn.MultiheadAttention, projections: list[InProjection],
                       query: Tensor, key: Tensor, value: Tensor,
                       key_padding_mask: Tensor | None = None, need_weights: bool = True,
                       attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                       is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
    """``nn.MultiheadAttention.forward`` with its projections as module calls K-FAC hooks.

    The q, k, v projections run through ``projections`` and ``out_proj`` through its module,
    each on ``(N, L, E)`` rows (batch first, as a token mask sees them);
    ``F.multi_head_attention_forward`` does the rest with identity projections (exact).
    Without grad the stock forward runs (its fast path).
    """
    if not torch.is_grad_enabled():
        return type(attention).forward(attention, query, key, value, key_padding_mask,
                                       need_weights, attn_mask, average_attn_weights, is_causal)
    for proj in projections:  # they capture in the attention's mode (not in the model)
        proj.training = attention.training
    batched = query.dim() == 3
    flip = batched and not attention.batch_first  # user layout <-> batch-first rows

    def rows(x: Tensor) -> Tensor:
        return x.transpose(0, 1) if flip else x

    def seq_first(x: Tensor) -> Tensor:
        return x.transpose(0, 1) if batched else x

    q, k, v = (seq_first(proj(rows(x)))
               for proj, x in zip(projections, (query, key, value), strict=True))
    e = attention.embed_dim
    eye = torch.eye(e, dtype=q.dtype, device=q.device)
    out, weights = F.multi_head_attention_forward(
        q, k, v, e, attention.num_heads, None, None, attention.bias_k, attention.bias_v,
        attention.add_zero_attn, attention.dropout, eye, None, training=attention.training,
        key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
        use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye,
        average_attn_weights=average_attn_weights, is_causal=is_causal)
    out = attention.out_proj(seq_first(out))  # (N, L, E) rows
    return (out.transpose(0, 1) if flip else out), weights


class AttentionLayers:
    """The K-FAC layers of one ``nn.MultiheadAttention``: ``{name}.q_proj``, ``.k_proj``,
    ``.v_proj`` (``InProjection`` blocks, one K-FAC block each: the three see different
    output gradients even when they share the input) and ``{name}.out_proj``.

    ``install()`` replaces the attention's ``forward`` (an instance attribute) by an equal
    computation whose projections are module calls, so forward hooks see them; ``remove()``
    restores it.
    """

    def __init__(self, name: str, attention: nn.MultiheadAttention) -> None:
        self.attention = attention
        self.projections = [InProjection(attention, i) for i in range(3)]
        prefix = f"{name}." if name else ""
        self.modules: list[tuple[str, nn.Module]] = [
            (f"{prefix}{'qkv'[i]}_proj", proj) for i, proj in enumerate(self.projections)]
        self.modules.append((f"{prefix}out_proj", attention.out_proj))

    def install(self) -> AttentionLayers:
        self.attention.forward = partial(_attention_forward, self.attention, self.projections)
        return self

    def remove(self) -> None:
        self.attention.__dict__.pop("forward", None)


def attention_layers(name: str, module: nn.Module) -> AttentionLayers | None:
    """``AttentionLayers`` of an ``nn.MultiheadAttention`` (None for any other module)."""
    return AttentionLayers(name, module) if isinstance(module, nn.MultiheadAttention) else None


def capture_for(name: str, module: nn.Module) -> LayerCapture:
    """Build the capture view for a supported module.

    Raises:
        ValueError: unsupported configuration of a supported type (names the layer).
        TypeError: ``module`` is not one of ``SUPPORTED_MODULES``.
    """
    if isinstance(module, InProjection):
        return InProjectionCapture(name, module)
    kind = layer_kind(module)
    if kind is not None:
        return _CAPTURES[kind](name, module)
    raise TypeError(
        f"layer '{name}' of type {type(module).__name__} is not supported "
        f"(accepted: {', '.join(SUPPORTED_MODULES)})"
    )


_CAPTURES: dict[str, type[LayerCapture]] = {
    "linear": LinearCapture, "conv1d": HFConv1DCapture, "conv2d": Conv2dCapture,
    "embedding": EmbeddingCapture}
