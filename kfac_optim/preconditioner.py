"""KFACPreconditioner: hooks, update schedule, preconditioning, KL clipping, state.

Data flows one way (DESIGN.md): module hooks -> per-layer statistics (``layers``,
``factors``) -> running factors -> eigendecompositions (``inverse``) ->
preconditioned gradients written back into ``p.grad``.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from .factors import (
    RunningFactor,
    embedding_input_statistics,
    input_statistics,
    output_grad_statistics,
)
from .inverse import eigh_psd, precondition_eig
from .layers import LayerCapture, capture_for, is_supported
from .options import KFACOptions, check_kl_clip, check_nonneg

__all__ = ["KFACPreconditioner"]

log = logging.getLogger("kfac_optim")

IGNORE_INDEX = -100


@dataclass
class _BatchContext:
    """What one forward call of the whole model tells the layers.

    ``mask``: ``(B, S)`` token validity (1 valid, 0 padding) or None.
    ``num_loss_rows``: N, the number of loss terms the loss is a mean / sum over.
    ``counted``: layers that already counted N for this forward (a module applied
    several times in one forward adds rows to A, but its loss terms only once).
    """

    mask: Tensor | None = None
    num_loss_rows: Tensor | float | None = None
    counted: set = field(default_factory=set)


class _Layer:
    """Per-layer state: capture view, running factors, last good eigendecomposition."""

    def __init__(self, capture: LayerCapture):
        self.capture = capture
        self.a = RunningFactor()
        self.g = RunningFactor()
        self.eig: dict[str, Tensor | None] | None = None
        self.nonfinite_skips = 0
        self.warned = False

    def state_dict(self) -> dict:
        return {
            "A": self.a.state_dict(),
            "G": self.g.state_dict(),
            "eig": None if self.eig is None else dict(self.eig),
            "nonfinite_skips": self.nonfinite_skips,
        }


def _unwrap(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model


def _to_device(state: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in state.items()}


def _is_causal_lm(model: nn.Module) -> bool:
    # Hugging Face causal LMs shift labels by one inside their loss.
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


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
        model: the model (a ``DistributedDataParallel`` wrapper is unwrapped).
        damping: lambda >= 0 (Tikhonov damping; units of the Fisher of the mean loss).
        damping_mode: ``"exact"`` or ``"factored"`` (Martens & Grosse 2015, pi-split).
        factor_decay: EMA decay in [0, 1) of A and G; bias-corrected.
        factor_update_steps: capture statistics and update factors every k steps.
        inv_update_steps: recompute eigendecompositions every k steps.
        kl_clip: KL-clip threshold > 0, or None to disable; needs ``lr``.
        lr: learning rate of the update that follows (for the KL clip); ``step(lr=...)``
            overrides it.
        inverse_policy: ``"eig"``.
        loss_reduction: how the loss given to ``backward()`` was reduced over its N
            loss terms: ``"mean"`` (captured gradients are multiplied by N) or ``"sum"``.
        kfac_approx: ``"expand"`` (default) or ``"reduce"`` for weight sharing over
            positions (Eschenhagen et al. 2023); Embedding layers always use expand.
        skip_layers: module-name regexes (``re.search``) or module types left to the
            base update.
        factor_dtype: accumulation/storage dtype of A and G: None (float32, or float64
            for float64 layers), ``torch.float32`` or ``torch.float64``.
        inv_dtype: eigensolver dtype (None: the factor dtype; float64 is retried on
            failure in any case).

    Padding and the loss count N: for each forward call of ``model`` the
    preconditioner reads ``attention_mask`` (else ``labels != -100``) from the call's
    keyword arguments as the token mask (padding rows do not count in T), and takes
    N from ``labels`` (valid labels, shifted by one for Hugging Face causal LMs) or,
    without labels, from the output rows (``logits.shape[:-1]``, masked). Users
    computing their own loss call ``set_token_mask(mask, num_loss_rows=N)`` before
    the forward. Hooks capture only in training mode with grad enabled.

    Raises:
        ValueError / TypeError: bad arguments (naming the argument and accepted values),
            or an unsupported layer configuration (naming the layer).
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
        self.model = _unwrap(model)
        self.steps = 0
        self.capture_enabled = True
        self._ctx: _BatchContext | None = None
        self._pending_mask: tuple[Tensor | None, Any] | None = None
        self._layers: dict[str, _Layer] = {}
        self._handles: list = []
        for name, module in self._select_modules():
            self._layers[name] = _Layer(capture_for(name, module))
        for layer in self._layers.values():
            self._handles.append(layer.capture.module.register_forward_hook(
                partial(self._forward_hook, layer)))
        self._handles.append(self.model.register_forward_pre_hook(
            self._root_pre_hook, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(
            self._root_post_hook, with_kwargs=True))
        log.info("K-FAC preconditions %d layers: %s", len(self._layers), list(self._layers))

    # Registration -------------------------------------------------------------
    def _select_modules(self) -> list[tuple[str, nn.Module]]:
        chosen: dict[int, tuple[str, nn.Module]] = {}
        for name, module in self.model.named_modules():
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

    @property
    def layer_names(self) -> list[str]:
        """Qualified names of the preconditioned modules."""
        return list(self._layers)

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
        if mask is not None and not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor of shape (B, S) or None, got "
                            f"{type(mask).__name__}")
        if num_loss_rows is None and mask is not None:
            num_loss_rows = mask.sum()
        self._pending_mask = (mask, num_loss_rows)

    def _root_pre_hook(self, module, args, kwargs):
        if self._pending_mask is not None:
            mask, rows = self._pending_mask
            self._pending_mask = None
        else:
            mask, rows = kwargs.get("attention_mask"), None
            labels = kwargs.get("labels")
            if mask is None and isinstance(labels, Tensor):
                mask = labels != IGNORE_INDEX
        self._ctx = _BatchContext(mask=mask, num_loss_rows=rows)

    def _root_post_hook(self, module, args, kwargs, output):
        ctx = self._ctx
        if ctx is None or ctx.num_loss_rows is not None:
            return
        labels = kwargs.get("labels")
        if isinstance(labels, Tensor):
            if _is_causal_lm(module):
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

    def _forward_hook(self, layer: _Layer, module, inputs, output):
        if not (self.capturing and module.training and torch.is_grad_enabled()):
            return
        if not isinstance(output, Tensor) or not output.requires_grad or not inputs:
            return
        # Pair this call's input with the gradient of *this* output: forwards that never
        # see a backward (activation-checkpoint recomputation, unused outputs) add nothing.
        output.register_hook(partial(self._grad_hook, layer, inputs[0].detach(), self._ctx))

    def _grad_hook(self, layer: _Layer, x: Tensor, ctx: _BatchContext | None, grad: Tensor):
        cap = layer.capture
        opts = self.options
        dtype = opts.factor_dtype or (torch.float64 if cap.weight.dtype == torch.float64
                                      else torch.float32)
        rows = cap.input_rows(x)
        mask = None
        if ctx is not None and ctx.mask is not None and ctx.mask.shape == cap.mask_shape(x):
            mask = ctx.mask.reshape(rows.shape[:2])
        if cap.diagonal_a:
            a_sum, t = embedding_input_statistics(rows, mask, num_embeddings=cap.in_features,
                                                  dtype=dtype)
            approx = "expand"
        else:
            approx = opts.kfac_approx
            a_sum, t = input_statistics(rows, mask, has_bias=cap.has_bias, approx=approx,
                                        dtype=dtype)
        n = t if ctx is None or ctx.num_loss_rows is None else ctx.num_loss_rows
        scale = n if opts.loss_reduction == "mean" else 1.0
        g_sum = output_grad_statistics(cap.output_grad_rows(grad), mask, scale=scale,
                                       approx=approx, dtype=dtype)
        layer.a.add(a_sum, t)
        if ctx is not None and id(layer) in ctx.counted:
            layer.g.add(g_sum, 0.0)
        else:
            layer.g.add(g_sum, n)
            if ctx is not None:
                ctx.counted.add(id(layer))

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
        self._update_factors()
        if self.steps % opts.inv_update_steps == 0:
            self._update_inverses()
        self._precondition(lr, damping, kl_clip)
        self.steps += 1

    def _update_factors(self) -> None:
        updates = []
        for layer in self._layers.values():
            a, g = layer.a.take_batch(), layer.g.take_batch()
            if a is not None and g is not None:
                updates.append((layer, a, g))
        if not updates:
            return
        finite = torch.stack([torch.isfinite(a).all() & torch.isfinite(g).all()
                              for _, a, g in updates]).tolist()
        for (layer, a, g), ok in zip(updates, finite, strict=True):
            if ok:
                layer.a.update(a, self.options.factor_decay)
                layer.g.update(g, self.options.factor_decay)
                continue
            layer.nonfinite_skips += 1
            if not layer.warned:
                layer.warned = True
                warnings.warn(f"K-FAC layer '{layer.capture.name}': non-finite statistics; "
                              "factor update skipped, last good inverse kept", stacklevel=3)

    def _update_inverses(self) -> None:
        inv_dtype = self.options.inv_dtype
        for layer in self._layers.values():
            a, g = layer.a.value(), layer.g.value()
            if a is None or g is None:
                continue
            eig_g = eigh_psd(g, dtype=inv_dtype)
            eig_a = (a, None) if layer.capture.diagonal_a else eigh_psd(a, dtype=inv_dtype)
            if eig_g is None or eig_a is None:
                log.warning("K-FAC layer '%s': eigendecomposition failed in float64; keeping "
                            "the last good inverse", layer.capture.name)
                continue
            layer.eig = {"s_a": eig_a[0], "q_a": eig_a[1], "s_g": eig_g[0], "q_g": eig_g[1]}

    def _precondition(self, lr: float | None, damping: float, kl_clip: float | None) -> None:
        results = []
        for layer in self._layers.values():
            cap = layer.capture
            if layer.eig is None or not cap.has_grad():
                continue
            grad = cap.grad_matrix()
            e = layer.eig
            pre = precondition_eig(grad, e["q_g"], e["s_g"], e["q_a"], e["s_a"], damping,
                                   self.options.damping_mode)
            results.append((cap, grad, pre))
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

    # State ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Tensors and plain values only: step count, per-layer factors and eigenbases."""
        return {"steps": self.steps,
                "layers": {name: layer.state_dict() for name, layer in self._layers.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``; tensors move to each layer's weight device.

        Raises:
            RuntimeError: the state's layers or factor shapes do not match this model
                (naming the layer): most likely a checkpoint of another model.
        """
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
            layer.a.load_state_dict(_to_device(s["A"], dev))
            layer.g.load_state_dict(_to_device(s["G"], dev))
            layer.eig = None if s["eig"] is None else _to_device(s["eig"], dev)
            layer.nonfinite_skips = int(s.get("nonfinite_skips", 0))
        self.steps = int(state["steps"])

    @staticmethod
    def _check_shapes(layer: _Layer, s: dict) -> None:
        cap = layer.capture
        d, o = cap.in_features, cap.out_features
        expected_a = (d,) if cap.diagonal_a else (d, d)
        for key, expected in (("A", expected_a), ("G", (o, o))):
            ema = s[key]["ema"]
            if ema is not None and tuple(ema.shape) != expected:
                bias = " (a bias in one and not the other?)" if key == "A" else ""
                raise RuntimeError(
                    f"K-FAC state for layer '{cap.name}': factor {key} has shape "
                    f"{tuple(ema.shape)}, the module needs {expected}{bias}; checkpoint mismatch?")
