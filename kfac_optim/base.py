"""Base updates: how ``KFAC`` turns the preconditioned gradient into a step.

K-FAC gives a direction per layer (``KFACPreconditioner``); the base update makes it a step
(docs/design.md, "Base update"). Three are offered, per param group (``base``):

- ``"sgd"``: SGD with momentum and coupled L2 weight decay on the preconditioned gradient ``d``
  (``d + wd p``; ``buf = momentum buf + d``; ``p -= lr buf``, Nesterov optional), the classic
  K-FAC update (Martens & Grosse 2015; Ba et al. 2017).
- ``"adamw"``: Adam on the preconditioned gradient with decoupled weight decay (Loshchilov &
  Hutter 2019): the same arithmetic as ``torch.optim.AdamW`` applied to ``d``.
- ``"grafting"``: the K-FAC direction with the length of the Adam step, per layer (Agarwal et
  al. 2020, "learning-rate grafting"): Adam's moments follow the *raw* gradient ``g``; for each
  preconditioned layer the step is ``-lr ||a||_F / ||d||_F d`` with ``a`` the Adam direction of
  the layer's parameters (weight and bias together); parameters K-FAC does not precondition take
  the plain AdamW step. Decoupled weight decay as AdamW.

With the Adam-family bases a user keeps AdamW's learning rate and schedule. The KL clip then
rescales only the direction: ``"adamw"``'s per-coordinate normalisation undoes most of a global
scale (it acts through the first moments' mix of steps), and ``"grafting"`` takes its step
length from Adam, so the clip does not change the step at all.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["BASES", "sgd_update", "adam_direction", "decoupled_step", "graft_norms"]

BASES = ("sgd", "adamw", "grafting")


def sgd_update(p: Tensor, d: Tensor, state: dict, group: dict) -> None:
    """SGD-momentum step of ``p`` along ``d`` (coupled L2 weight decay), in place."""
    lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
    d = d if wd == 0 else d.add(p, alpha=wd)
    if mom != 0:
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = d.clone()
        else:
            buf.mul_(mom).add_(d)
        d = d.add(buf, alpha=mom) if group["nesterov"] else buf
    p.add_(d, alpha=-lr)


def adam_direction(g: Tensor, state: dict, group: dict) -> Tensor:
    """Update Adam's moments with ``g`` and return the bias-corrected direction
    ``m_hat / (sqrt(v_hat) + eps)`` (the step is ``-lr`` times it), computed as
    ``torch.optim.AdamW`` does (same operations, same order).

    State keys: ``step`` (int), ``exp_avg``, ``exp_avg_sq`` (like ``g``).
    """
    beta1, beta2 = group["betas"]
    if "exp_avg" not in state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(g, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(g, memory_format=torch.preserve_format)
    state["step"] += 1
    exp_avg, exp_avg_sq, step = state["exp_avg"], state["exp_avg_sq"], state["step"]
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias1, bias2 = 1 - beta1**step, 1 - beta2**step
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(group["eps"])
    return exp_avg / denom / bias1


def decoupled_step(p: Tensor, direction: Tensor, group: dict, scale: float | Tensor = 1.0
                   ) -> None:
    """``p <- (1 - lr wd) p - lr scale direction`` (decoupled weight decay), in place."""
    lr, wd = group["lr"], group["weight_decay"]
    if wd != 0:
        p.mul_(1 - lr * wd)
    p.add_(direction * scale if isinstance(scale, Tensor) or scale != 1.0 else direction,
           alpha=-lr)


def graft_norms(adam: list[Tensor], kfac: list[Tensor]) -> Tensor:
    """``||a||_F / ||d||_F`` over one layer's parameters (1 where ``d`` is 0): the factor that
    gives the K-FAC direction ``d`` the Adam step's length."""
    a = torch.sqrt(sum(_whole((t.double() ** 2).sum()) for t in adam))
    d = torch.sqrt(sum(_whole((t.double() ** 2).sum()) for t in kfac))
    return torch.where(d > 0, a / d, torch.ones_like(d))


def _whole(t: Tensor) -> Tensor:
    """A sum over a sharded DTensor (FSDP2) as the whole tensor's sum (all-reduced)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
