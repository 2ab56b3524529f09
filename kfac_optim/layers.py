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
  ``"nn_conv1d"`` (``torch.nn.Conv1d``), ``"embedding"`` (``nn.Embedding``); each
  ``LayerCapture`` subclass names its ``kind``.
- ``captures_for(name, module)``: the K-FAC blocks of one module: one view, or for a grouped
  convolution (``groups > 1``) one view per group, named ``name + ".group{i}"``, each over
  its slice of input channels, output channels and weight rows (docs/design.md, "Grouped
  convolutions").
- ``layer_bias(module)``: the bias K-FAC treats as a parameter (None when absent or
  frozen: a frozen bias is a constant shift, no column of ones in A).
- The weight-matrix convention on plain tensors: ``matrix_shape``, ``weight_matrix`` and
  ``parameters_from_matrix``. ``nn.Linear`` weight ``(o, d)`` is ``W``; ``Conv1D`` stores
  ``(d, o)`` (``W^T``); ``nn.Conv2d`` weight ``(o, C, kh, kw)`` is ``W`` reshaped to
  ``(o, C kh kw)`` (``nn.Conv1d``: ``(o, C, k)`` to ``(o, C k)``; grouped: ``C / groups``);
  ``nn.Embedding`` weight ``(V, D)`` is ``W^T`` with ``o = D``, ``d = V``. The bias, when
  present and trainable, is the last column. ``grad_matrix`` / ``set_grad_matrix`` are
  these functions applied to the gradients.
- ``nn.MultiheadAttention``: ``attention_layers`` gives its four layers (``InProjection``
  blocks q, k, v of the packed ``in_proj_weight``, and ``out_proj``) and the forward that
  runs them as hooked module calls (``AttentionLayers.install`` / ``remove``).
- Hugging Face losses: ``IGNORE_INDEX`` (labels that are not loss terms) and
  ``is_causal_lm(model)`` (the model shifts its labels by one).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache, partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["IGNORE_INDEX", "KFACCoverageWarning", "LAYER_KINDS", "AttentionLayers",
           "InProjection", "LayerCapture", "SUPPORTED_MODULES", "attention_layers", "capture_for",
           "captures_for", "fsdp1_root", "is_causal_lm", "is_supported", "layer_bias",
           "layer_kind", "matrix_shape", "parameters_from_matrix", "split_group_name",
           "strip_wrapper_names", "warn_coverage", "weight_matrix"]

SUPPORTED_MODULES = ("Linear", "Conv1d", "Conv2d", "Embedding", "transformers Conv1D",
                     "MultiheadAttention")
LAYER_KINDS = ("linear", "conv1d", "conv2d", "nn_conv1d", "embedding")
# Kinds whose stored weight is the transpose of the K-FAC matrix W (o, d).
_TRANSPOSED = ("conv1d", "embedding")
# torch convolutions: weight (o, C / groups, *kernel) reshaped to (o, C / groups prod(kernel)).
_CONVOLUTIONS = ("conv2d", "nn_conv1d")

IGNORE_INDEX = -100
"""Label value that is not a loss term (PyTorch's ``cross_entropy`` and Hugging Face default)."""


def _is_hf_conv1d(module: nn.Module) -> bool:
    # Avoid importing transformers (slow) just to test a type. The whole MRO: FSDP2's
    # fully_shard swaps the class for a subclass (``FSDPConv1D``) defined elsewhere.
    return any(cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")
               for cls in type(module).__mro__)


def layer_kind(module: nn.Module) -> str | None:
    """K-FAC layer kind of ``module``: one of ``LAYER_KINDS``, or None if unsupported.

    ``"conv1d"`` is the Hugging Face ``transformers.pytorch_utils.Conv1D`` (recognised by
    its class name and module, without importing transformers; subclasses too, such as
    the ``FSDPConv1D`` that FSDP2's ``fully_shard`` makes of it); ``"nn_conv1d"`` is
    ``torch.nn.Conv1d``.
    """
    if isinstance(module, (nn.Linear, InProjection)):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Conv1d):
        return "nn_conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if _is_hf_conv1d(module):
        return "conv1d"
    return None


def is_supported(module: nn.Module) -> bool:
    """Whether ``module`` is a layer type K-FAC preconditions (see ``SUPPORTED_MODULES``)."""
    return layer_kind(module) is not None


def layer_bias(module: nn.Module) -> Tensor | None:
    """The bias K-FAC preconditions with the weight (the last column of ``W``), or None when
    the module has none or it is frozen (``requires_grad=False``: a constant shift of the
    output, no column of ones in A and no gradient created for it)."""
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, Tensor) and bias.requires_grad else None


class KFACCoverageWarning(UserWarning):
    """Trainable parameters that K-FAC leaves to the base update (said once, at construction;
    ``warnings.filterwarnings("ignore", category=KFACCoverageWarning)`` silences it)."""


def _listing(entries: list[tuple[str, str]], limit: int = 6) -> str:
    """``[(type, name)]`` -> ``"LayerNorm x2 ('a', 'b')"``, one entry per type."""
    by_type: dict[str, list[str]] = {}
    for kind, name in entries:
        by_type.setdefault(kind, []).append(name)
    parts = []
    for kind, names in by_type.items():
        shown = ", ".join(repr(n) for n in names[:limit]) + (", ..." if len(names) > limit else "")
        parts.append(f"{kind} x{len(names)} ({shown})")
    return "; ".join(parts)


def _parameters_of(module: nn.Module) -> tuple[Tensor | None, Tensor | None]:
    """The parameters a preconditioned module's gradients live in (an attention's q, k, v
    block: the packed weight and bias it is rows of)."""
    if isinstance(module, InProjection):
        return module.param, module.attention.in_proj_bias
    return module.weight, layer_bias(module)


def warn_coverage(model: nn.Module, preconditioned: Iterable[nn.Module],
                  skipped: Callable[[str, nn.Module], bool]) -> None:
    """One ``KFACCoverageWarning`` when some trainable parameter of ``model`` is left to the
    base update, or no layer is preconditioned (docs/design.md, "Must hold" 7): it lists the
    supported layers ``skipped(name, module)`` leaves out (``skip_layers``) and the other
    modules holding trainable parameters K-FAC does not precondition (LayerNorm, ...), with
    counts. Parameters tied to a preconditioned weight count as preconditioned.
    """
    modules = list(preconditioned)
    covered = {id(p) for m in modules for p in _parameters_of(m) if p is not None}
    by_skip, others, count, numel = [], [], 0, 0
    for wrapped_name, module in model.named_modules():
        name = strip_wrapper_names(wrapped_name)
        left = [p for p in module.parameters(recurse=False)
                if p.requires_grad and id(p) not in covered]
        if not left:
            continue
        covered.update(id(p) for p in left)
        count += len(left)
        numel += sum(p.numel() for p in left)
        entry = (type(module).__name__, name or "<root>")
        (by_skip if is_supported(module) and skipped(name, module) else others).append(entry)
    if modules and not count:
        return
    what = [f"skipped by skip_layers: {_listing(by_skip)}"] if by_skip else []
    if others:
        what.append(f"not preconditioned: {_listing(others)}")
    head = "K-FAC preconditions no layer of this model; " if not modules else "K-FAC: "
    warnings.warn(f"{head}{count} trainable parameter tensors ({numel} elements) are left to "
                  f"the base update: {' | '.join(what) or 'none'}", KFACCoverageWarning,
                  stacklevel=3)


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
    if kind in _CONVOLUTIONS:
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


Of = Callable[[Tensor], "Tensor | None"]  # a parameter -> a tensor of its shape (or None)


def _grad_of(p: Tensor) -> Tensor | None:
    return p.grad


class LayerCapture:
    """Base view of one preconditioned module; subclasses override the three views.

    Attributes:
        kind: the layer kind, one of ``LAYER_KINDS`` (the weight-matrix convention).
        name: the module's qualified name in the model (``name.group{i}`` for one group
            of a grouped convolution).
        module: the module itself.
        rows: the rows of the module's weight matrix this view preconditions (one group of
            a grouped convolution), or None for all of them.
        diagonal_a: True when A is stored as its diagonal (Embedding).
        positions_are_loss_terms: under ``kfac_approx="expand"`` each shared position is
            its own loss term (a token-level loss; EKFAC squares per row); False for
            convolutions, whose loss term is the sample (EKFAC squares its summed gradient).
        in_features: ``d`` including the bias column (a frozen bias has none).
        out_features: ``o`` (the group's output channels when ``rows`` is set).
    """

    kind = "linear"
    diagonal_a = False
    positions_are_loss_terms = True

    def __init__(self, name: str, module: nn.Module, rows: slice | None = None):
        self.name = name
        self.module = module
        self.rows = rows
        # Decided once: a bias frozen at construction is a constant, not a parameter.
        self._bias_trainable = layer_bias(module) is not None
        # Read once, while the weight is whole: FSDP1 leaves a flat shard between steps.
        self._module_shape = matrix_shape(self.kind, self.weight.shape)
        self._shape = self._weight_shape()

    @property
    def weight(self) -> Tensor:
        return self.module.weight

    @property
    def bias(self) -> Tensor | None:
        """The trainable bias, or None (absent, or frozen at construction)."""
        return getattr(self.module, "bias", None) if self._bias_trainable else None

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

    def _weight_matrix_of(self, of: Of) -> Tensor:
        return _weight_view(self.kind, _full(of(self.weight)))

    # Generic ------------------------------------------------------------------
    @property
    def out_features(self) -> int:
        return self._shape[0]

    @property
    def in_features(self) -> int:
        return self._shape[1] + int(self.has_bias)

    def _weight_shape(self) -> tuple[int, int]:
        o, d = self._module_shape
        return (o, d) if self.rows is None else (len(range(o)[self.rows]), d)

    def has_grad(self) -> bool:
        return self.weight.grad is not None

    def _module_matrix_of(self, of: Of = _grad_of) -> Tensor:
        """The whole module's ``of(parameter)`` tensors as ``(o_module, d [+1])``."""
        v = self._weight_matrix_of(of)
        if tuple(v.shape) != self._module_shape:
            raise RuntimeError(
                f"layer '{self.name}': gradient of shape {tuple(v.shape)}, not "
                f"the whole weight's (o, d) = {self._module_shape}: a flat shard, as FSDP1 "
                f"leaves between steps; {_FSDP1_WORKS}")
        if self.has_bias:
            b = self._bias_of(of)
            v = _with_bias(v, torch.zeros_like(v[:, 0]) if b is None else b)
        return v

    def matrix_of(self, of: Of) -> Tensor:
        """This view's ``(o, d [+1])`` matrix of per-parameter tensors ``of(p)`` shaped like
        the parameters (their gradients, a step taken, ...; None counts as zeros for the
        bias), bias as the last column: ``weight_matrix`` for every kind, including a group's
        rows of a grouped convolution and a block of an attention's packed weight.

        Raises:
            RuntimeError: the tensor is not the whole weight's (an FSDP1 flat shard: K-FAC
                was built before wrapping, or is stepped outside its gather).
        """
        v = self._module_matrix_of(of)
        return v if self.rows is None else v[self.rows]

    def grad_matrix(self) -> Tensor:
        """Gradient as ``(o, d [+1])``, bias gradient as the last column (this view's rows;
        ``matrix_of`` of the gradients).

        Raises:
            RuntimeError: as ``matrix_of``.
        """
        return self.matrix_of(_grad_of)

    def _bias_of(self, of: Of) -> Tensor | None:
        b = of(self.bias)
        return None if b is None else _full(b)

    def set_grad_matrix(self, v: Tensor) -> None:
        """Write a ``(o, d [+1])`` matrix back into the parameters' ``.grad`` (this view's
        rows only; the other rows keep their gradient)."""
        if self.rows is not None:
            whole = self._module_matrix_of().clone()
            whole[self.rows] = v
            v = whole
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


def _conv_padding(module: nn.Conv1d | nn.Conv2d) -> list[int]:
    """The padding PyTorch applies, as ``F.pad`` takes it (last spatial dim first, ``(left,
    right)`` each): ``padding='same'`` pads ``total // 2`` left and the rest right, with
    ``total = dilation (kernel - 1)``."""
    if module.padding == "valid":
        pairs = [(0, 0)] * len(module.kernel_size)
    elif module.padding == "same":
        totals = [dl * (k - 1) for dl, k in zip(module.dilation, module.kernel_size, strict=True)]
        pairs = [(t // 2, t - t // 2) for t in totals]
    else:
        pairs = [(p, p) for p in module.padding]
    return [side for pair in reversed(pairs) for side in pair]


class ConvCapture(LayerCapture):
    """``nn.Conv2d`` and ``nn.Conv1d`` as in KFC (Grosse & Martens 2016): rows are im2col
    patches; a Conv1d is the ``(1, k)`` Conv2d of its input with a height-1 axis.

    Input ``(B, C, H, W)`` (Conv1d: ``(B, C, L)``) -> ``(B, L_out, C' kh kw)`` with ``L_out``
    output positions and ``C'`` the input channels of this view's group (``C / groups``);
    output gradient ``(B, o, H_out, W_out)`` (Conv1d: ``(B, o, L_out)``) -> ``(B, L_out, o')``,
    ``o'`` the group's output channels. Stride, dilation, integer / ``'valid'`` / ``'same'``
    padding (even receptive fields pad asymmetrically, as PyTorch does) and every
    ``padding_mode`` (``F.pad`` in that mode before the unfold) are supported. A grouped
    convolution is one view per group (``captures_for``).
    """

    kind = "conv2d"
    positions_are_loss_terms = False

    def __init__(self, name: str, module: nn.Conv1d | nn.Conv2d, group: int | None = None):
        self.kind = layer_kind(module)
        self._in_channels = None
        rows = None
        if group is not None:
            o, c = module.out_channels // module.groups, module.in_channels // module.groups
            rows, self._in_channels = slice(group * o, (group + 1) * o), slice(group * c,
                                                                             (group + 1) * c)
        super().__init__(name, module, rows)
        self._pad = _conv_padding(module)
        self._spatial = len(module.kernel_size)

    def _as_2d(self, t: Tensor, channels: slice | None) -> Tensor:
        """``(B, C, *spatial)`` (or unbatched) -> ``(B, C', H, W)`` of this view's channels."""
        if t.dim() == self._spatial + 1:
            t = t.unsqueeze(0)
        if channels is not None:
            t = t[:, channels]
        return t.unsqueeze(2) if self._spatial == 1 else t

    def input_rows(self, x: Tensor) -> Tensor:
        m = self.module
        x = self._as_2d(x, self._in_channels)
        if any(self._pad):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, self._pad, mode=mode)
        as_2d = (lambda t: tuple(t)) if self._spatial == 2 else (lambda t: (1, *t))
        cols = F.unfold(x, as_2d(m.kernel_size), dilation=as_2d(m.dilation), stride=as_2d(m.stride))
        return cols.transpose(1, 2)

    def output_grad_rows(self, g: Tensor) -> Tensor:
        return self._as_2d(g, self.rows).flatten(2).transpose(1, 2)

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

    def _weight_matrix_of(self, of: Of) -> Tensor:
        g = _full(of(self.weight))
        if g.is_sparse:
            raise ValueError(
                f"layer '{self.name}': sparse Embedding gradients are not supported "
                "(accepted: sparse=False)"
            )
        return _weight_view(self.kind, g)


def _check_initialised(name: str, module: nn.Module) -> None:
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters(False)):
        raise ValueError(
            f"layer '{name}' ({type(module).__name__}) is a lazy module whose parameters are not "
            "initialised yet: run one forward pass of the model before building K-FAC (or add "
            "it to skip_layers)")

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

    def _weight_matrix_of(self, of: Of) -> Tensor:
        return _block(of(self.module.param), self.module.rows)

    def _bias_of(self, of: Of) -> Tensor | None:
        return _block(of(self.module.attention.in_proj_bias), self.module.bias_rows)

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
    """Build the capture view for a supported module (a grouped convolution: ``captures_for``).

    Raises:
        ValueError: unsupported configuration of a supported type, a lazy module before its
            first forward, or a grouped convolution (one view per group: ``captures_for``);
            the message names the layer.
        TypeError: ``module`` is not one of ``SUPPORTED_MODULES``.
    """
    if isinstance(module, InProjection):
        return InProjectionCapture(name, module)
    kind = layer_kind(module)
    if kind is None:
        raise TypeError(
            f"layer '{name}' of type {type(module).__name__} is not supported "
            f"(accepted: {', '.join(SUPPORTED_MODULES)})"
        )
    _check_initialised(name, module)
    if getattr(module, "groups", 1) != 1:
        raise ValueError(f"layer '{name}': a convolution with groups={module.groups} is "
                         "one K-FAC block per group: use captures_for")
    return _CAPTURES[kind](name, module)


def captures_for(name: str, module: nn.Module) -> list[LayerCapture]:
    """The K-FAC blocks of a supported module: ``[capture_for(name, module)]``, or for a
    convolution with ``groups > 1`` one ``ConvCapture`` per group ``i``, named
    ``f"{name}.group{i}"``, over input channels ``i C/groups : (i+1) C/groups``, output
    channels and weight rows ``i o/groups : (i+1) o/groups`` (bias entries likewise).

    Raises:
        ValueError / TypeError: as ``capture_for``.
    """
    groups = getattr(module, "groups", 1)
    if layer_kind(module) not in _CONVOLUTIONS or groups == 1:
        return [capture_for(name, module)]
    _check_initialised(name, module)
    prefix = f"{name}." if name else ""
    return [ConvCapture(f"{prefix}{_GROUP}{i}", module, group=i) for i in range(groups)]


_GROUP = "group"


def split_group_name(name: str) -> tuple[str, int | None]:
    """``"conv.group3"`` -> ``("conv", 3)`` (a layer name ``captures_for`` gave one group of
    a grouped convolution); any other name -> ``(name, None)``."""
    base, _, last = name.rpartition(".")
    if last.startswith(_GROUP) and last[len(_GROUP):].isdigit():
        return base, int(last[len(_GROUP):])
    return name, None


_CAPTURES: dict[str, type[LayerCapture]] = {
    "linear": LinearCapture, "conv1d": HFConv1DCapture, "conv2d": ConvCapture,
    "nn_conv1d": ConvCapture, "embedding": EmbeddingCapture}
