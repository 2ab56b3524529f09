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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LayerCapture", "capture_for", "is_supported", "SUPPORTED_MODULES", "fsdp1_root",
           "strip_wrapper_names", "layer_kind"]

SUPPORTED_MODULES = ("Linear", "Conv2d", "Embedding", "transformers Conv1D")


def _is_hf_conv1d(module: nn.Module) -> bool:
    # Avoid importing transformers (slow) just to test a type.
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def is_supported(module: nn.Module) -> bool:
    """Whether ``module`` is a layer type K-FAC preconditions (see ``SUPPORTED_MODULES``)."""
    return isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)) or _is_hf_conv1d(module)


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
        name: the module's qualified name in the model.
        module: the module itself.
        diagonal_a: True when A is stored as its diagonal (Embedding).
        in_features: ``d`` including the bias column.
        out_features: ``o``.
    """

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
        return _full(self.weight.grad)

    def _set_weight_matrix_grad(self, v: Tensor) -> None:
        _assign(self.weight.grad, v)

    # Generic ------------------------------------------------------------------
    @property
    def out_features(self) -> int:
        return self._shape[0]

    @property
    def in_features(self) -> int:
        return self._shape[1] + int(self.has_bias)

    def _weight_shape(self) -> tuple[int, int]:
        w = self.weight
        return w.shape[0], w.numel() // w.shape[0]

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
            b = self.bias.grad
            b = torch.zeros_like(v[:, 0]) if b is None else _full(b)
            v = torch.cat([v, b.unsqueeze(1)], dim=1)
        return v

    def set_grad_matrix(self, v: Tensor) -> None:
        """Write a ``(o, d [+1])`` matrix back into the parameters' ``.grad``."""
        if self.has_bias:
            if self.bias.grad is None:
                self.bias.grad = torch.zeros_like(self.bias)
            _assign(self.bias.grad, v[:, -1])
            v = v[:, :-1]
        self._set_weight_matrix_grad(v)


class LinearCapture(LayerCapture):
    """``nn.Linear``: weight ``(o, d)``; any leading dims, every token is a row."""


class HFConv1DCapture(LayerCapture):
    """``transformers.pytorch_utils.Conv1D`` (GPT-2): ``y = x @ W + b`` with W ``(d, o)``."""

    def _weight_shape(self) -> tuple[int, int]:
        d, o = self.weight.shape
        return o, d

    def _weight_matrix_grad(self) -> Tensor:
        return _full(self.weight.grad).t()

    def _set_weight_matrix_grad(self, v: Tensor) -> None:
        _assign(self.weight.grad, v.t())


class Conv2dCapture(LayerCapture):
    """``nn.Conv2d`` as in KFC (Grosse & Martens 2016): rows are im2col patches.

    Input ``(B, C, H, W)`` -> ``(B, L, C kh kw)`` with ``L = H_out W_out`` positions;
    output gradient ``(B, o, H_out, W_out)`` -> ``(B, L, o)``. Stride, zero padding and
    dilation are supported; ``groups > 1`` and non-zero padding modes are refused.
    """

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

    def _weight_matrix_grad(self) -> Tensor:
        return _full(self.weight.grad).reshape(self.weight.shape[0], -1)

    def _set_weight_matrix_grad(self, v: Tensor) -> None:
        _assign(self.weight.grad, v.reshape(self.weight.shape))


class EmbeddingCapture(LayerCapture):
    """``nn.Embedding``: ``s = W^T onehot(i)``, so in K-FAC convention o = embedding_dim,
    d = num_embeddings, and ``A = diag(token counts) / T`` (stored as a vector).
    """

    diagonal_a = True

    def __init__(self, name: str, module: nn.Embedding):
        super().__init__(name, module)
        if module.max_norm is not None:
            raise ValueError(
                f"layer '{name}': Embedding with max_norm renormalises weights in forward and is "
                "not supported (accepted: max_norm=None); add it to skip_layers"
            )

    def _weight_shape(self) -> tuple[int, int]:
        v, e = self.weight.shape
        return e, v

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
        return g.t()

    def _set_weight_matrix_grad(self, v: Tensor) -> None:
        _assign(self.weight.grad, v.t())


def capture_for(name: str, module: nn.Module) -> LayerCapture:
    """Build the capture view for a supported module.

    Raises:
        ValueError: unsupported configuration of a supported type (names the layer).
        TypeError: ``module`` is not one of ``SUPPORTED_MODULES``.
    """
    if isinstance(module, nn.Linear):
        return LinearCapture(name, module)
    if isinstance(module, nn.Conv2d):
        return Conv2dCapture(name, module)
    if isinstance(module, nn.Embedding):
        return EmbeddingCapture(name, module)
    if _is_hf_conv1d(module):
        return HFConv1DCapture(name, module)
    raise TypeError(
        f"layer '{name}' of type {type(module).__name__} is not supported "
        f"(accepted: {', '.join(SUPPORTED_MODULES)})"
    )


def layer_kind(module: nn.Module) -> str | None:
    """K-FAC layer kind of ``module`` ("linear", "conv1d" (Hugging Face Conv1D), "conv2d",
    "embedding"), or None when unsupported."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return "conv1d" if _is_hf_conv1d(module) else None
