"""KFAC: a torch.optim.Optimizer = K-FAC preconditioner + a base update (SGD-momentum,
AdamW on the preconditioned gradient, or grafting; ``kfac_optim.base``)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .base import BASES, adam_direction, decoupled_step, graft_norms, sgd_update
from .damping import DAMPING_ADAPTATIONS, LevenbergMarquardt
from .options import KFACOptions, check_model, check_nonneg, options_doc, options_signature
from .preconditioner import KFACPreconditioner

__all__ = ["KFAC"]


_SUPPORTED_SHARDING = ("single process, DDP, FSDP2 (fully_shard), FSDP1 with "
                       "use_orig_params=True, Accelerate, DeepSpeed ZeRO stage 0")


def _refuse_partitioned(groups: list[dict], model_params: set[int] | None = None) -> None:
    """K-FAC needs each layer's whole gradient matrix. DeepSpeed ZeRO 1/2 hands the client
    optimizer flat 1-D partitions that cut across parameters, ZeRO 3 leaves empty (0,)
    placeholders in the module: refuse both with what works.

    Raises:
        RuntimeError: parameters are not the model's own, or are ZeRO-3 placeholders.
    """
    for group in groups:
        for p in group["params"]:
            if hasattr(p, "ds_shape") or hasattr(p, "ds_id"):
                raise RuntimeError("KFAC cannot precondition DeepSpeed ZeRO stage 3 parameters "
                                   f"(partitioned placeholders); supported: {_SUPPORTED_SHARDING}")
            if model_params is not None and id(p) not in model_params:
                raise RuntimeError(
                    "KFAC's parameter groups no longer hold the model's parameters: either "
                    "the model's parameters were replaced after KFAC was built (FSDP2 "
                    "fully_shard does this: build KFAC after fully_shard, or let "
                    "accelerator.prepare swap them), or the groups hold a flat partition (as "
                    "DeepSpeed ZeRO stage 1/2 passes to its client optimizer); supported: "
                    f"{_SUPPORTED_SHARDING}")


def _refuse_sharded_for_adaptation(params: Any) -> None:
    """Raises:
        RuntimeError: a sharded parameter (FSDP2 DTensor, FSDP1 flat view): the step and
            ``grad^T delta`` would be this rank's shard only.
    """
    for p in params:
        if type(p).__name__ == "DTensor" or getattr(p, "_fsdp_flattened", False):
            raise RuntimeError("damping_adaptation supports a single process and DDP "
                               "(whole parameters on every rank), not sharded (FSDP) "
                               "parameters; use damping_adaptation=None with FSDP")


def _loss_value(loss: Any) -> float:
    """A closure's loss as a float (a tensor of one element, or a number).

    Raises:
        TypeError: the closure returned something else (damping_adaptation needs the loss).
    """
    if isinstance(loss, Tensor) and loss.numel() == 1:
        return float(loss.detach())
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return float(loss)
    raise TypeError("damping_adaptation: the closure must return the loss (a one-element "
                    f"tensor or a number), got {type(loss).__name__}")


class KFAC(torch.optim.Optimizer):
    """K-FAC natural-gradient optimizer (Martens & Grosse 2015).

    Each ``step()`` preconditions the gradients of the supported layers with
    ``KFACPreconditioner`` (KL-clipped at the group's ``lr``), then applies the group's
    base update (``kfac_optim.base``) to every parameter. ``base="adamw"`` (default) is
    AdamW (``betas``, ``eps``, decoupled ``weight_decay``) on the preconditioned gradient
    ``d``, so ``KFAC(model, lr=X, weight_decay=W)`` is a swap-in for
    ``torch.optim.AdamW(model.parameters(), lr=X, weight_decay=W)`` at AdamW's own ``X``
    (docs/design.md, "Base update"; the defaults are chosen by
    ``benchmarks/time_to_target.py``)::

        m = b1 m + (1 - b1) d;  v = b2 v + (1 - b2) d^2
        p = (1 - lr wd) p - lr m_hat / (sqrt(v_hat) + eps)

    ``base="grafting"`` takes K-FAC's direction with the length of the AdamW step on the
    raw gradient, per layer (Agarwal et al. 2020). ``base="sgd"`` is the classic K-FAC
    update, SGD with momentum and coupled weight decay (it wants its own, larger ``lr``)::

        d = grad_pre + weight_decay * p;  buf = momentum * buf + d
        p -= lr * (d + momentum * buf if nesterov else buf)

    Parameters K-FAC does not precondition (norms, biases of skipped layers, position
    tables) take the plain base update of their own param group.

    Hyperparameters live in ``param_groups``: ``lr``, ``momentum``, ``weight_decay``,
    ``nesterov``, ``base``, ``betas``, ``eps`` per group; ``damping`` and ``kl_clip`` are
    read from the first group at every step, so LR schedulers (and a scheduler writing
    ``group["damping"]``) work: ``preconditioner.describe()`` reports the damping the last
    step used.

    Args:
        model: the model whose trainable parameters are optimized.
        lr: learning rate > 0 (default 1e-3, AdamW's).
        momentum: in [0, 1) (``base="sgd"``).
        weight_decay: >= 0 (``"sgd"``: L2, added to the preconditioned gradient; Adam bases:
            decoupled, ``p *= 1 - lr weight_decay``).
        nesterov: Nesterov momentum (``base="sgd"``).
        base: ``"adamw"`` (default), ``"grafting"`` or ``"sgd"`` (``kfac_optim.base``).
        betas, eps: Adam's moment decays in [0, 1) and denominator term > 0 (Adam bases).
        damping_adaptation: None (default: the damping is the group's ``damping``, as set
            or scheduled) or ``"levenberg_marquardt"``: every ``damping_adaptation_steps``
            steps the damping is adjusted from the reduction ratio of the K-FAC quadratic
            model (Martens & Grosse 2015, Sec. 6.5; ``kfac_optim.damping``)::

                M(delta) = grad^T delta + 1/2 delta^T (F + lambda I) delta
                rho = (h(theta + delta) - h(theta)) / M(delta)
                rho > 3/4: lambda *= omega;  rho < 1/4: lambda /= omega;
                omega = (19/20)^damping_adaptation_steps

            with ``delta`` the step taken (after KL clip and base update), ``F`` the K-FAC
            curvature (``A (x) G`` per layer) and ``lambda`` clamped into ``[damping_min,
            damping_max]``. The new value is written to every param group's ``damping``
            (saved in ``state_dict()``; ``preconditioner.describe()`` reports it as the
            damping used, and ``rho``). Needs ``step(closure)`` (one extra closure call at
            each adaptation step), ``loss_reduction="mean"``, no ``grad_scaler``, whole
            parameters (single process or DDP; the losses are averaged over ranks). Each
            adaptation starts from the group's current ``damping``: a scheduler writing it
            composes with the rule (and overrides it when it writes every step).
        damping_adaptation_steps: ``T1`` >= 1 (default 5, as in the paper).
        damping_min, damping_max: the clamp range of the adapted damping, ``0 <
            damping_min <= damping <= damping_max`` (defaults 1e-6 and 10).
        params: optional parameter groups (as for any torch optimizer) over a subset of
            ``model``'s parameters; default: all parameters with ``requires_grad``. Only
            layers whose weight is among them are preconditioned: the gradients of other
            parameters (another optimizer's) are left as they are.
        options: a ``KFACOptions`` to start from (keywords override its fields).
        **options: any ``KFACOptions`` field but ``lr`` (listed below and in the
            signature); ``damping`` and ``kl_clip`` become param-group defaults.

    State: ``state_dict()`` is the usual optimizer state plus the preconditioner's under
    key ``"kfac"`` (and the damping adaptation's under ``"damping_adaptation"``); tensors
    and plain values only, valid right after construction. Schedules given as callables
    (``factor_decay``, ``factor_update_steps``, ``inv_update_steps``) are not saved: pass
    them again when resuming, as with an LR scheduler.

    Example (adaptive damping; the closure re-evaluates the same batch)::

        opt = KFAC(model, lr=0.1, damping=1e-2, damping_adaptation="levenberg_marquardt")
        for x, y in loader:
            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss
            opt.step(closure)
        opt.param_groups[0]["damping"], opt.damping_adaptation.rho  # lambda, last rho

    Raises:
        ValueError / TypeError: bad arguments, naming the argument and accepted values (an
            unknown keyword gets the closest option names); with several ranks, damping
            adaptation settings that differ between ranks (naming each rank's value).
        RuntimeError: ``damping_adaptation`` with sharded (FSDP) parameters.
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, momentum: float = 0.9,
                 weight_decay: float = 0.0, nesterov: bool = False, *, params: Any = None,
                 base: str = "adamw", betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, damping_adaptation: str | None = None,
                 damping_adaptation_steps: int = 5, damping_min: float = 1e-6,
                 damping_max: float = 10.0, options: KFACOptions | None = None,
                 **overrides: Any):
        check_model(model, "KFAC")
        if check_nonneg("lr", lr) <= 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if not 0.0 <= check_nonneg("momentum", momentum) < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        check_nonneg("weight_decay", weight_decay)
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        if "lr" in overrides:
            raise TypeError("lr given twice")
        if base not in BASES:
            raise ValueError(f"base={base!r} is not accepted; accepted values: {BASES}")
        if (not isinstance(betas, (tuple, list)) or len(betas) != 2
                or not all(0.0 <= check_nonneg("betas", b) < 1.0 for b in betas)):
            raise ValueError(f"betas must be two real numbers in [0, 1), got {betas!r}")
        if check_nonneg("eps", eps) <= 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        if base == "grafting" and any(getattr(p, "_fsdp_flattened", False)
                                      for p in model.parameters()):
            raise ValueError("base='grafting' needs each layer's whole gradient for its norm; "
                             "FSDP1 holds flat shards: use base='adamw' or 'sgd' with FSDP1 "
                             "(grafting works under DDP and FSDP2)")
        if damping_adaptation not in DAMPING_ADAPTATIONS:
            raise ValueError(f"damping_adaptation={damping_adaptation!r} is not accepted; "
                             f"accepted values: {DAMPING_ADAPTATIONS}")
        adaptation = None if damping_adaptation is None else LevenbergMarquardt(
            damping_adaptation_steps, damping_min, damping_max)
        if params is not None:
            params = list(params)  # may be a generator: read once, used twice
        self.preconditioner = KFACPreconditioner(model, params=params, options=options, lr=lr,
                                                 **overrides)
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        opts = self.preconditioner.options
        try:
            if adaptation is not None:
                self._check_adaptation(adaptation, opts, model)
            # every rank adapts, or none: the adaptation's all-reduces must match
            self.preconditioner.check_ranks_agree(
                {"damping_adaptation": damping_adaptation,
                 **({} if adaptation is None else adaptation.settings())})
        except (ValueError, RuntimeError):
            self.preconditioner.remove()  # leave the model as it was
            raise
        self.damping_adaptation = adaptation
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                        damping=opts.damping, kl_clip=opts.kl_clip, base=base,
                        betas=tuple(betas), eps=eps)
        super().__init__(params, defaults)
        self._model = model
        self._param_names = {id(p): name for name, p in model.named_parameters()}
        self._model_params = set(self._param_names)
        _refuse_partitioned(self.param_groups)
        self.skipped_steps = 0

    @staticmethod
    def _check_adaptation(adaptation: LevenbergMarquardt, opts: KFACOptions,
                          model: nn.Module) -> None:
        """Refuse what adaptive damping cannot judge.

        Raises:
            ValueError: a starting damping outside the clamp range; ``loss_reduction="sum"``
                (the factors are the Fisher of the mean loss: the quadratic model would need
                N F); a ``grad_scaler`` (GradScaler.step takes no closure);
                ``woodbury_reduction="row_sharded"``; ``damping_scale="relative"`` (M(delta)
                takes one lambda).
            RuntimeError: sharded (FSDP) parameters.
        """
        adaptation.check_start(opts.damping)
        refused = {"loss_reduction": (opts.loss_reduction, "sum", "'mean'"),
                   "grad_scaler": (opts.grad_scaler is not None, True, "None"),
                   "woodbury_reduction": (opts.woodbury_reduction, "row_sharded", "'gather'"),
                   # the quadratic model's lambda |delta|^2 takes the group's lambda
                   "damping_scale": (opts.damping_scale, "relative", "'absolute'")}
        for name, (value, bad, accepted) in refused.items():
            if value == bad:
                raise ValueError(f"damping_adaptation needs {name}={accepted} (got "
                                 f"{getattr(opts, name)!r}): docs/design.md, \"Damping and "
                                 "schedules\"")
        _refuse_sharded_for_adaptation(model.parameters())

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:
        """Precondition, then take the base update (``base``). Returns ``closure()``'s loss.

        A step whose preconditioned gradients are not finite is skipped (weights and
        momentum unchanged, ``skipped_steps`` incremented, a warning). Parameters the model
        replaced since construction (FSDP2's ``fully_shard`` after building ``KFAC``) are
        first rebound in the param groups (``_rebind_replaced``).

        With ``damping_adaptation`` every step needs ``closure`` (it zeroes the gradients,
        computes the loss on the step's batch, calls ``backward()`` and returns the loss);
        at an adaptation step it is called a second time after the update, with statistics
        capture off, to evaluate ``h(theta + delta)`` (``_adapt_damping``). The gradients
        left in ``.grad`` afterwards are those of that second call. An adaptation step also
        holds a copy of the parameters and of their gradients until its end.

        Raises:
            RuntimeError: the groups hold parameters that are not the model's (a flat
                partition, ZeRO-3 placeholders), or a replaced parameter had optimizer
                state (see ``_rebind_replaced``); ``damping_adaptation`` without a closure;
                sharded parameters at an adaptation step.
        """
        self._rebind_replaced()
        _refuse_partitioned(self.param_groups, self._model_params)
        adaptation = self.damping_adaptation
        if adaptation is not None and closure is None:
            raise RuntimeError(
                "KFAC(damping_adaptation='levenberg_marquardt') needs step(closure): the "
                "closure re-evaluates the loss on the same batch after the update (reduction "
                "ratio, Martens & Grosse 2015 Sec. 6.5); pass a closure that zeroes the "
                "gradients, computes the loss, calls backward() and returns the loss, or "
                "build KFAC with damping_adaptation=None")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        first = self.param_groups[0]
        before = self._snapshot() if adaptation is not None and adaptation.due else None
        raw = self._raw_gradients()
        damping = first["damping"]
        self.preconditioner.step(lr=first["lr"], damping=damping, kl_clip=first["kl_clip"])
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            self.skipped_steps += 1
            warnings.warn("KFAC: non-finite gradient; step skipped, weights unchanged",
                          stacklevel=2)
            if adaptation is not None:
                adaptation.steps += 1
            return loss
        self._base_update(raw)
        if before is not None:
            self._adapt_damping(closure, loss, before, damping)
        if adaptation is not None:
            adaptation.steps += 1
        return loss

    def _snapshot(self) -> list[tuple[Tensor, Tensor, Tensor | None]]:
        """``(param, its value, its raw gradient)`` of every group parameter, before the
        step (what ``_adapt_damping`` measures the step and ``grad^T delta`` with).

        Raises:
            RuntimeError: sharded parameters (``_refuse_sharded_for_adaptation``).
        """
        params = [p for g in self.param_groups for p in g["params"]]
        _refuse_sharded_for_adaptation(params)
        return [(p, p.detach().clone(), None if p.grad is None else p.grad.detach().clone())
                for p in params]

    def _adapt_damping(self, closure: Callable[[], Any], loss: Any,
                       before: list[tuple[Tensor, Tensor, Tensor | None]],
                       damping: float) -> None:
        """The Levenberg-Marquardt adjustment (``kfac_optim.damping``) after the update.

        ``delta = theta_new - theta_old`` over every group parameter; in float64::

            M(delta) = sum_p grad_p . delta_p
                       + 1/2 (delta^T F delta + damping * sum_p |delta_p|^2)

        with ``delta^T F delta`` from ``KFACPreconditioner.curvature_quadratic``. The losses
        ``h(theta)`` (the step's closure) and ``h(theta + delta)`` (called again, capture
        off) are averaged over ranks, so rho, and the damping written to every param
        group's ``"damping"``, are the same on every rank.
        """
        pre = self.preconditioner
        f64 = torch.float64
        deltas = {id(p): p.detach() - old for p, old, _ in before}
        linear = sum(((g.to(f64) * deltas[id(p)].to(f64)).sum().cpu()
                      for p, _, g in before if g is not None), torch.zeros((), dtype=f64))
        squares = sum((deltas[id(p)].to(f64).square().sum().cpu() for p, _, _ in before),
                      torch.zeros((), dtype=f64))
        quad = pre.curvature_quadratic(lambda p: deltas.get(id(p))).cpu()
        model = float(linear + 0.5 * (quad + damping * squares))
        capture, pre.capture_enabled = pre.capture_enabled, False
        try:
            with torch.enable_grad():
                after = closure()
        finally:
            pre.capture_enabled = capture
        h_before, h_after = pre.mean_over_ranks([_loss_value(loss), _loss_value(after)])
        adaptation = self.damping_adaptation
        rho = adaptation.ratio(h_before, h_after, model)
        new = adaptation.adjust(damping, rho)
        pre.reduction_ratio = rho
        for group in self.param_groups:
            group["damping"] = new
    def _rebind_replaced(self) -> None:
        """Point the param groups at the model's current parameters.

        FSDP2's ``fully_shard`` (called after building ``KFAC``) replaces each
        ``nn.Parameter`` by a sharded (DTensor) one at the same module attribute; the groups
        would keep the old ones and train nothing. A group parameter whose name (at
        construction) now holds another parameter of the same (global) shape is replaced
        by it; anything else is left to ``_refuse_partitioned``.

        Raises:
            RuntimeError: a replaced parameter already has optimizer state (momentum of
                steps taken, or loaded, before the replacement).
        """
        live = dict(self._model.named_parameters())
        for group in self.param_groups:
            params = group["params"]
            for i, old in enumerate(params):
                new = live.get(self._param_names.get(id(old), ""))
                if new is None or new is old or tuple(new.shape) != tuple(old.shape):
                    continue
                if self.state.get(old):
                    raise RuntimeError(
                        f"KFAC: the model replaced parameter '{self._param_names[id(old)]}' "
                        "(FSDP2 fully_shard after building KFAC?) after optimizer state was "
                        "kept for it: build KFAC after fully_shard, or shard before the first "
                        "step and load_state_dict")
                params[i] = new
                self._param_names[id(new)] = self._param_names.pop(id(old))
        self._model_params = {id(p) for p in live.values()}

    def _layer_params(self) -> list[list[Tensor]]:
        """The parameters of each preconditioned layer (weight, bias)."""
        return [[p for p in (view.module.weight, getattr(view.module, "bias", None))
                 if isinstance(p, Tensor)] for view in self.preconditioner.layers.values()]

    def _raw_gradients(self) -> dict[int, Tensor]:
        """Copies of the gradients grafting needs before preconditioning rewrites them: the
        preconditioned layers' parameters in ``base="grafting"`` groups."""
        grafted = {id(p) for g in self.param_groups if g["base"] == "grafting"
                   for p in g["params"]}
        if not grafted:
            return {}
        return {id(p): p.grad.clone() for params in self._layer_params() for p in params
                if id(p) in grafted and p.grad is not None}

    def _base_update(self, raw: dict[int, Tensor]) -> None:
        """Each group's base update (``kfac_optim.base``) along the preconditioned gradients."""
        graft: dict[int, tuple[Tensor, Tensor, dict]] = {}  # id -> (param, Adam dir, group)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["base"] == "sgd":
                    sgd_update(p, p.grad, self.state[p], group)
                elif group["base"] == "adamw":
                    decoupled_step(p, adam_direction(p.grad, self.state[p], group), group)
                else:
                    graft[id(p)] = (p, adam_direction(raw.get(id(p), p.grad), self.state[p],
                                                      group), group)
        if not graft:
            return
        for params in self._layer_params():  # K-FAC direction, Adam's length, per layer
            mine = [graft.pop(id(p)) for p in params if id(p) in graft]
            if mine:
                scale = graft_norms([a for _, a, _ in mine], [p.grad for p, _, _ in mine])
                for p, _, group in mine:
                    decoupled_step(p, p.grad, group, scale.to(p.dtype))
        for p, direction, group in graft.values():  # not preconditioned: plain AdamW
            decoupled_step(p, direction, group)

    def train(self) -> None:
        """Resume statistics capture (Hugging Face Trainer calls this before training)."""
        self.preconditioner.capture_enabled = True

    def eval(self) -> None:
        """Stop statistics capture (Hugging Face Trainer calls this before evaluation)."""
        self.preconditioner.capture_enabled = False

    def state_dict(self) -> dict:
        """The base optimizer's ``state`` and ``param_groups`` (each group's ``damping``:
        the adapted value with ``damping_adaptation``), the preconditioner's state under
        ``"kfac"`` and, with ``damping_adaptation``, its state under ``"damping_adaptation"``
        (``LevenbergMarquardt.state_dict``). Schedules given as callables are not saved."""
        state = super().state_dict()
        state["kfac"] = self.preconditioner.state_dict()
        if self.damping_adaptation is not None:
            state["damping_adaptation"] = self.damping_adaptation.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore from ``state_dict()`` (the damping adaptation's state too, when both
        this optimizer and the state have one; a state without it starts the rule afresh,
        one with it loaded without ``damping_adaptation`` keeps only the groups' damping).

        Raises:
            ValueError: not a ``KFAC`` state (no ``"kfac"`` entry), or as
                ``KFACPreconditioner.load_state_dict``.
        """
        if not isinstance(state_dict, dict) or "kfac" not in state_dict:
            keys = sorted(map(str, state_dict)) if isinstance(state_dict, dict) else None
            raise ValueError(
                "not a KFAC optimizer state: KFAC.state_dict() holds the base optimizer's "
                "'state' and 'param_groups' and the preconditioner's 'kfac' entry; got "
                f"{type(state_dict).__name__} with keys {keys} (another optimizer's state? "
                "a preconditioner's state loads with opt.preconditioner.load_state_dict)")
        state_dict = dict(state_dict)
        adaptation = state_dict.pop("damping_adaptation", None)
        if adaptation is not None and self.damping_adaptation is not None:
            self.damping_adaptation.load_state_dict(adaptation)
            self.preconditioner.reduction_ratio = self.damping_adaptation.rho
        self.preconditioner.load_state_dict(state_dict.pop("kfac"))
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # groups saved before a key existed (0.1.0: base)
            if "base" not in group:  # 0.1.0 had only the SGD-momentum update
                group["base"] = "sgd"
            for key, value in self.defaults.items():
                group.setdefault(key, value)


KFAC.__init__.__signature__ = options_signature(KFAC.__init__, skip=("lr",))
KFAC.__doc__ += "\n" + options_doc(skip=("lr",))
