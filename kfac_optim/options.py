"""K-FAC options: typed, keyword-only, each documented once next to its check.

``KFACOptions`` is the single source of every option's name, type, default, documentation
and validation. ``KFACPreconditioner(model, **options)`` and ``KFAC(model, ..., **options)``
accept these keywords (or ``options=KFACOptions(...)``); their signatures, as ``help()`` and
``inspect.signature`` show them, list every option with its default, and an unknown keyword
gets a close-match suggestion (``KFACOptions.build``).
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
import textwrap
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from .factors import KFAC_APPROXIMATIONS
from .fisher import FISHER_TYPES, TYPE2_MAX_OUTPUTS
from .inverse import DAMPING_MODES

DAMPING_SCALES = ("absolute", "relative")

__all__ = ["KFACOptions", "StepSettings", "INVERSE_POLICIES", "LOSS_REDUCTIONS",
           "WOODBURY_REDUCTIONS", "INVERSE_WORKERS", "check_nonneg", "check_kl_clip",
           "options_signature", "options_doc", "check_model", "check_damping",
           "SCHEDULED_OPTIONS", "scheduled"]

INVERSE_POLICIES = ("eig", "woodbury", "auto", "hybrid")
LOSS_REDUCTIONS = ("mean", "sum")
FACTOR_DTYPES = (None, torch.float32, torch.float64, torch.bfloat16, torch.float16)
INV_DTYPES = (None, torch.float32, torch.float64)
INVERSE_WORKERS = ("replicate", "assign", "owner")
WOODBURY_REDUCTIONS = ("gather", "row_sharded")
STORE_DEVICES = ("auto", "cpu", "compute")


# Checks: each takes (name, value) and returns the normalised value or raises ------------
def check_model(model: Any, where: str) -> None:
    """Raises:
        TypeError: ``model`` is not an ``nn.Module``; for an iterable of parameters (what a
            torch optimizer takes) the message says to pass the model and ``params=``.
    """
    if isinstance(model, nn.Module):
        return
    if isinstance(model, torch.Tensor) or hasattr(model, "__iter__"):
        raise TypeError(
            f"{where} takes the model, not its parameters: K-FAC hooks the model's layers to "
            f"see their inputs and output gradients. Call {where}(model, lr=...)"
            + (", with params=<parameters or param groups> to optimize a subset or use "
               "groups" if where == "KFAC" else "") + f"; got {type(model).__name__}")
    raise TypeError(f"{where}: model must be a torch.nn.Module, got {type(model).__name__}")


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_nonneg(name: str, value: Any) -> float:
    """``value`` as a float >= 0, else ``ValueError``/``TypeError`` naming ``name``."""
    if not _is_real(value):
        raise TypeError(f"{name} must be a finite real number >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


def check_damping(name: str, value: Any) -> float:
    """Damping as a float > 0: with 0 a singular factor makes every step non-finite (and
    skipped), so it is refused rather than accepted and then silently never applied."""
    value = check_nonneg(name, value)
    if value == 0:
        raise ValueError(f"{name} must be > 0 (Tikhonov damping keeps (A (x) G + damping) "
                         "invertible; try 1e-3 to 1e-1), got 0")
    return value


def check_kl_clip(value: Any, name: str = "kl_clip") -> float | None:
    if value is None:
        return None
    if not _is_real(value) or value <= 0:
        raise ValueError(f"{name} must be None (disabled) or a real number > 0, got {value!r}")
    return float(value)


def _choice(accepted: tuple) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        if value not in accepted:
            raise ValueError(f"{name}={value!r} is not accepted; accepted values: {accepted}")
        return value
    return check


def _steps(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    return lambda name, value: None if value is None else check(name, value)


def _positive(name: str, value: Any) -> float:
    if not _is_real(value) or value <= 0:
        raise ValueError(f"{name} must be a real number > 0, got {value!r}")
    return float(value)


def _decay(name: str, value: Any) -> float:
    if not _is_real(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a real number in [0, 1), got {value!r}")
    return float(value)


def _kappa(name: str, value: Any) -> float | None:
    if value is not None and (not _is_real(value) or value < 1):
        raise ValueError(f"{name} must be None or a real number >= 1, got {value!r}")
    return value


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def _seed(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be None (the global RNG) or an int >= 0, got {value!r}")
    return value


def _inv_device(name: str, device: Any) -> torch.device | None:
    """``"auto"`` (the layer's device) -> None; else a ``torch.device``."""
    if device == "auto" or device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name}={device!r} is not accepted; accepted: 'auto', 'cpu', "
                         "a CUDA device such as 'cuda:0', or a torch.device") from None


def _skip_layers(name: str, skip: Any) -> tuple:
    if isinstance(skip, (str, type)):
        skip = (skip,)
    try:
        items = tuple(skip)
    except TypeError:
        raise TypeError(f"{name} must be an iterable of module-name regexes (str) or "
                        f"nn.Module subclasses, got {skip!r}") from None
    for item in items:
        if isinstance(item, str):
            try:
                re.compile(item)
            except re.error as err:
                raise ValueError(f"{name}: {item!r} is not a valid regex ({err})") from None
        elif not (isinstance(item, type) and issubclass(item, nn.Module)):
            raise TypeError(f"{name} entries must be module-name regexes (str) or "
                            f"nn.Module subclasses, got {item!r}")
    return items


def _grad_scaler(name: str, value: Any) -> Any:
    if value is not None and not hasattr(value, "get_scale"):
        raise TypeError(f"{name} must be a torch.amp.GradScaler (or None), got "
                        f"{type(value).__name__}")
    return value


def _process_group(name: str, value: Any) -> Any:
    if value is None or (isinstance(value, str) and value == "auto"):
        return value
    import torch.distributed as dist

    if dist.is_available() and isinstance(value, dist.ProcessGroup):
        return value
    error = ValueError if isinstance(value, str) else TypeError
    raise error(f"{name}={value!r} is not accepted; accepted: 'auto' (the default group when "
                "torch.distributed is initialised), None (no reduction), or a "
                "torch.distributed ProcessGroup")


def _bucket(name: str, value: Any) -> float | None:
    if value is not None and (not _is_real(value) or value <= 0):
        raise ValueError(f"{name} must be None (one buffer per destination) or a real number "
                         f"of MiB > 0, got {value!r}")
    return value


def _schedule(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    """``check`` for a value, or for a callable of the step: a callable is kept (not
    saved in any state) and checked now on what it returns at step 0 (``scheduled``)."""
    def check_or_schedule(name: str, value: Any) -> Any:
        if callable(value):
            scheduled(name, value, check, 0)
            return value
        return check(name, value)
    check_or_schedule.schedule_check = check  # what ``KFACOptions.at`` checks a result with
    return check_or_schedule


def scheduled(name: str, schedule: Callable[[int], Any], check: Callable[[str, Any], Any],
              step: int) -> Any:
    """``schedule(step)``, checked by ``check``.

    Raises:
        ValueError / TypeError: the callable raised, or returned a value ``check`` refuses;
            the message names the option, the step and what it returned.
    """
    try:
        value = schedule(step)
    except Exception as err:  # noqa: BLE001 (re-raised with the option's name)
        raise ValueError(f"{name}: the schedule {schedule!r} raised {type(err).__name__} at "
                         f"step {step}: {err}") from err
    try:
        return check(name, value)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{name}: the schedule {schedule!r} returned {value!r} at step {step}, "
                        f"which is refused: {err}") from None


def _any(name: str, value: Any) -> Any:
    return value


def option(default: Any, doc: str, check: Callable[[str, Any], Any] = _any) -> Any:
    """A ``KFACOptions`` field: its default, its documentation and its check, together."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable default")
    return field(default=default, metadata={"doc": doc, "check": check})


_SCHEDULE_DOC = ("Or a callable ``f(step) -> value`` (step: the preconditioner's step count, "
                 "from 0), checked on each value it returns; it is not saved in "
                 "``state_dict()``: pass it again when resuming, as with an LR scheduler.")
SCHEDULED_OPTIONS = ("factor_decay", "factor_update_steps", "inv_update_steps")


@dataclass
class KFACOptions:
    """Every K-FAC option. Build with keywords (``KFACOptions(damping=1e-2)``), or through
    ``KFACPreconditioner`` / ``KFAC``, which take the same keywords.

    Raises:
        ValueError / TypeError: naming the option and the accepted values.
    """

    # Damping and the step -------------------------------------------------------
    damping: float = option(
        1e-2, "lambda > 0, Tikhonov damping in units of the Fisher of the mean loss "
        "(``step(damping=...)`` or a KFAC param group's ``damping`` overrides it per step).",
        check_damping)
    damping_mode: str | None = option(
        None, "``\"factored\"``: ``(G + lambda_G I)^{-1} V (A + lambda_A I)^{-1}``, the pi-split "
        "of Martens & Grosse 2015, Sec. 6.3; ``\"exact\"``: ``(A (x) G + lambda I)^{-1}``; "
        "None (default): ``\"factored\"``, or ``\"exact\"`` with ``eigenvalue_correction`` "
        "(EKFAC needs it).", _optional(_choice(DAMPING_MODES)))
    damping_scale: str = option(
        "absolute", "``\"absolute\"``: lambda is ``damping`` itself; ``\"relative\"``: "
        "lambda is ``damping`` times each layer's mean Kronecker eigenvalue "
        "``(tr(A) / d) (tr(G) / o)`` at its last inverse update, so one value fits every "
        "layer and loss scale (the step is then invariant to scaling the loss, as Adam's "
        "is; docs/design.md \"Damping\"). A layer whose factors have zero trace falls back "
        "to the absolute value.", _choice(DAMPING_SCALES))
    kl_clip: float | None = option(
        1e-3, "KL-clip threshold > 0 (Ba, Grosse & Martens 2017): the step is scaled by "
        "``min(1, sqrt(kl_clip / (lr^2 sum_layers <V_pre, V>)))``; None disables it. Needs "
        "``lr``.", lambda name, value: check_kl_clip(value, name))
    lr: float | None = option(
        None, "learning rate of the update that follows (for the KL clip); "
        "``step(lr=...)`` overrides it. ``KFAC`` passes its group's lr.",
        _optional(check_nonneg))
    # Factors ----------------------------------------------------------------------
    factor_decay: float | Callable[[int], float] = option(
        0.95, "EMA decay in [0, 1) of A and G; bias-corrected. " + _SCHEDULE_DOC, _schedule(_decay))
    factor_update_steps: int | Callable[[int], int] = option(
        10, "capture statistics and update the factors at the steps where ``step % k == 0``. "
        + _SCHEDULE_DOC, _schedule(_steps))
    inv_update_steps: int | Callable[[int], int] = option(
        20, "recompute the inverses (eigendecompositions, Woodbury systems) at the steps where "
        "``step % k == 0``; a layer with factors and no inverse yet gets its first one at once. "
        + _SCHEDULE_DOC, _schedule(_steps))
    loss_reduction: str = option(
        "mean", "how the loss given to ``backward()`` was reduced over its N loss terms: "
        "``\"mean\"`` (captured gradients are multiplied by N) or ``\"sum\"``.",
        _choice(LOSS_REDUCTIONS))
    kfac_approx: str = option(
        "expand", "weight sharing over positions (Eschenhagen et al. 2023): ``\"expand\"`` "
        "(one row per position) or ``\"reduce\"`` (one row per sample); Embedding layers "
        "always use expand.", _choice(KFAC_APPROXIMATIONS))
    skip_layers: tuple = option(
        (), "module-name regexes (``re.search``) or module types left to the base update.",
        _skip_layers)
    accumulation_steps: int = option(
        1, "micro-batches per optimizer step when each micro-batch loss is divided by it: "
        "captured gradients are multiplied back, and every micro-batch enters one factor "
        "update.", _steps)
    grad_scaler: Any = option(
        None, "a ``torch.amp.GradScaler``: captured gradients are divided by its scale, and "
        "statistics of a step whose gradients overflowed are dropped. With a plain optimizer "
        "call ``scaler.unscale_(opt)`` before ``pre.step()``.", _grad_scaler)
    factor_dtype: torch.dtype | None = option(
        None, "storage dtype of A and G: None (float32, or float64 for float64 layers), "
        "float32, float64, or bfloat16 / float16 (accumulated in float32).",
        _choice(FACTOR_DTYPES))
    factor_row_limit: int | None = option(
        None, "None (every row) or m >= 1: at factor updates, a forward call with more valid "
        "rows than ``max(m, n)`` forms each dense factor (n x n: A with n = d, G with n = o) "
        "from a uniform sample of ``max(m, n)`` valid rows without replacement, its sum of "
        "outer products scaled by T / max(m, n) (unbiased; T, the row count, is unchanged). "
        "Padding rows are excluded before sampling. A diagonal A (Embedding), a low-rank "
        "(Woodbury) G and EKFAC's eigenbasis moments keep every row (docs/design.md, "
        "\"Subsampled statistics\").", _optional(_steps))
    eigenvalue_correction: bool = option(
        False, "EKFAC (George et al. 2018): running second moments of the per-row gradients "
        "in the Kronecker eigenbasis replace ``s_G s_A^T`` (exact damping; layers with a "
        "dense G).", _bool)
    fisher_type: str = option(
        "empirical", "what G is built from (docs/design.md, \"Fisher type for G\"; "
        "``kfac_optim.fisher``): ``\"empirical\"`` (the output gradients of the training "
        "loss's backward), ``\"mc\"`` (Martens & Grosse 2015: at factor-update steps one extra "
        "backward to the layer outputs of the loss at targets sampled from the model's "
        "predictive distribution; A unchanged, ``.grad`` untouched) or ``\"type2\"`` (C "
        "extra backward vectors, the columns of the output-Hessian square root; C <= "
        f"{TYPE2_MAX_OUTPUTS}). With \"mc\" / \"type2\" the extra backward runs by itself "
        "for Hugging Face causal LMs and single-label sequence classifiers called with "
        "``labels``; other models call ``pre.fisher_backward(logits, likelihood=...)`` after "
        "the forward, before the loss's backward.", _choice(FISHER_TYPES))
    fisher_seed: int | None = option(
        None, "``\"mc\"`` sampling: None (the global torch RNG of the logits' device) or an int "
        "seeding one ``torch.Generator`` per device (plus the process rank when "
        "torch.distributed is initialised, so ranks draw different targets).",
        _optional(_seed))
    # Inverses ----------------------------------------------------------------------
    inverse_policy: str = option(
        "hybrid", "``\"eig\"`` (eigendecompose A and G), ``\"woodbury\"`` (G kept as ``U U^T`` "
        "from stacked output gradients, docs/design.md \"Woodbury policy\"), ``\"auto\"`` "
        "(Woodbury while its column count k <= ``auto_rho`` o and k <= ``auto_t_max``, then "
        "dense eig) or ``\"hybrid\"`` (Woodbury for layers with o >= ``hybrid_min_out``, eig "
        "elsewhere; the default: a 50k-vocabulary head keeps a rank-``woodbury_rank`` G instead "
        "of a 10 GB dense one); ``kfac_optim.policies``. All give the same result on the same "
        "factors.",
        _choice(INVERSE_POLICIES))
    inv_dtype: torch.dtype | None = option(
        None, "eigensolver dtype (None: the factor dtype; float64 is retried on failure in "
        "any case).", _choice(INV_DTYPES))
    inv_device: Any = option(
        "auto", "eigensolver device: ``\"auto\"`` (the layer's), ``\"cpu\"`` or a CUDA "
        "device; results come back to the layer's device.", _inv_device)
    max_condition_number: float | None = option(
        None, "clip factor eigenvalues below ``max / kappa`` (None: off); counts in "
        "``describe()``.", _kappa)
    woodbury_max_rank: int = option(
        8192, "columns past which a low-rank G becomes dense (logged).", _steps)
    woodbury_rank: int | None = option(
        1024, "r >= 1 (default 1024): a truncated EMA. After each factor update a low-rank G "
        "with more than r columns keeps its top r eigenpairs, ``G_t = top_r(decay G_{t-1} + "
        "(1 - decay) G_batch)`` (Eckart-Young optimal), at O(o (r + T)^2) per update; the trace "
        "fraction dropped is ``dropped_G`` in ``describe()``. Applies to low-rank layers whose "
        "column limit is >= r (a smaller limit turns the layer dense first); None: no "
        "truncation, the stack grows until it turns dense. Keeps a large-vocabulary head on "
        "Woodbury at O(o r) memory.", _optional(_steps))
    auto_rho: float = option(
        0.75, "``\"auto\"``: Woodbury while k <= rho o (the measured crossover, "
        "``kfac_optim.policies``).", _positive)
    auto_t_max: int = option(8192, "``\"auto\"``: Woodbury while k <= this.", _steps)
    hybrid_min_out: int = option(
        4096, "``\"hybrid\"``: Woodbury for layers with o >= this.", _steps)
    woodbury_dtype: torch.dtype | None = option(
        None, "storage dtype of U (None, float32, bfloat16, float16; computed in float32).",
        _choice(FACTOR_DTYPES))
    woodbury_store_device: str = option(
        "auto", "``\"auto\"`` (next to the layer while U takes at most "
        "``woodbury_store_threshold_bytes``, else pinned host memory, moved on use), "
        "``\"cpu\"`` or ``\"compute\"``.", _choice(STORE_DEVICES))
    woodbury_store_threshold_bytes: int = option(
        500 * 2**20, "see ``woodbury_store_device`` (default 500 MiB).", _steps)
    # Distributed -------------------------------------------------------------------
    process_group: Any = option(
        "auto", "``\"auto\"`` (the default group when torch.distributed is initialised with "
        "more than one rank), None (no reduction), or a torch.distributed ProcessGroup.",
        _process_group)
    inverse_workers: str = option(
        "replicate", "with several ranks (``kfac_optim.placement``): ``\"replicate\"`` (every "
        "rank computes every inverse), ``\"assign\"`` (each layer's inverse computed by one "
        "rank, greedy by cost, then broadcast; KAISA, Pauloski et al. 2021) or ``\"owner\"`` "
        "(KAISA's MEM-OPT: each layer's factors, inverse and preconditioning on one owner "
        "rank, the result broadcast at every step; ``state_dict()`` then holds this rank's "
        "layers: save and load one state per rank, same number of ranks).",
        _choice(INVERSE_WORKERS))
    woodbury_reduction: str = option(
        "gather", "how a low-rank G is reduced with several ranks: ``\"gather\"`` (every rank "
        "holds the whole U; traffic only at factor updates) or ``\"row_sharded\"`` (each rank "
        "holds its rows of U, the FSDP2 ``Shard(0)`` split: 1/R of U's memory and of the "
        "per-step Woodbury products, for about k d + o d values sent per step; a rank's state "
        "then loads only at the same rank and world size). Default \"gather\": Accelerate's "
        "``save_state`` and the Trainer write one optimizer file from the main process, which "
        "a row-sharded state cannot resume from (benchmarks/README.md, \"Woodbury across "
        "ranks\").", _choice(WOODBURY_REDUCTIONS))
    comm_dtype: torch.dtype | None = option(
        None, "wire dtype of the factor sums (None: the factor dtype; counts are always "
        "float64).", _choice(FACTOR_DTYPES))
    comm_bucket_mb: float | None = option(
        None, "cap in MiB on one communication buffer (None: one buffer per destination, "
        "measured fastest on gloo CPU, benchmarks/README.md); buffers are issued "
        "asynchronously and unpacked in order.", _bucket)

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, f.metadata["check"](f.name, getattr(self, f.name)))
        if self.woodbury_reduction == "row_sharded" and self.inverse_workers == "owner":
            raise ValueError("woodbury_reduction='row_sharded' spreads a low-rank G's rows over "
                             "all ranks, inverse_workers='owner' keeps each layer on one rank: "
                             "choose one (accepted with row_sharded: 'replicate', 'assign')")
        if self.damping_mode is None:
            self.damping_mode = "exact" if self.eigenvalue_correction else "factored"
        if self.eigenvalue_correction and self.damping_mode != "exact":
            raise ValueError("eigenvalue_correction=True (EKFAC) needs damping_mode='exact' "
                             f"(got damping_mode={self.damping_mode!r})")
        if self.eigenvalue_correction and self.inverse_workers == "owner":
            raise ValueError(
                "eigenvalue_correction=True (EKFAC) is not supported with inverse_workers="
                "'owner': its per-row statistics live on every rank and the eigenbasis on the "
                "layer's owner only; use inverse_workers='replicate' or 'assign'")

    @classmethod
    def build(cls, options: KFACOptions | None, overrides: dict[str, Any],
              where: str) -> KFACOptions:
        """``options`` (default: all defaults) with ``overrides`` applied.

        Raises:
            TypeError: an unknown keyword (with the closest option names), or ``options``
                not a ``KFACOptions``.
        """
        names = [f.name for f in fields(cls)]
        for key in overrides:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=3)
                hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else (
                    f"; accepted options: {', '.join(names)}")
                raise TypeError(f"{where} got an unexpected keyword argument {key!r}{hint}")
        if options is None:
            return cls(**overrides)
        if not isinstance(options, cls):
            raise TypeError(f"{where}: options must be a KFACOptions, got "
                            f"{type(options).__name__}")
        return replace(options, **overrides)

    def at(self, name: str, step: int) -> Any:
        """Option ``name`` in effect at ``step``: its value, or what its schedule (one of
        ``SCHEDULED_OPTIONS`` given as a callable) returns at ``step``, checked.

        Raises:
            ValueError / TypeError: the schedule returned a refused value (``scheduled``).
        """
        value = getattr(self, name)
        if name not in SCHEDULED_OPTIONS or not callable(value):
            return value
        check = next(f for f in fields(self) if f.name == name).metadata["check"]
        return scheduled(name, value, check.schedule_check, step)

    @property
    def comm_bucket_bytes(self) -> int | None:
        """``comm_bucket_mb`` in bytes (None: no cap)."""
        return None if self.comm_bucket_mb is None else max(1, int(self.comm_bucket_mb * 2**20))

    def skips(self, name: str, module: nn.Module) -> bool:
        """Whether ``skip_layers`` leaves this module to the base update."""
        for item in self.skip_layers:
            if isinstance(item, str) and re.search(item, name):
                return True
            if isinstance(item, type) and isinstance(module, item):
                return True
        return False


@dataclass(frozen=True)
class StepSettings:
    """The values one step used, resolved once: ``lr``, ``damping``, ``kl_clip`` and the
    schedulable ``factor_decay``, ``factor_update_steps``, ``inv_update_steps`` at ``step``."""

    lr: float | None
    damping: float
    kl_clip: float | None
    step: int = 0
    factor_decay: float = 0.95
    factor_update_steps: int = 10
    inv_update_steps: int = 100

    @classmethod
    def resolve(cls, options: KFACOptions, lr: Any = None, damping: Any = None,
                kl_clip: Any = ..., step: int = 0) -> StepSettings:
        """The step's values: the arguments where given (checked), else the options' (a
        schedule's value at ``step``).

        Raises:
            ValueError: a bad value (a schedule's: naming the option, the step and what it
                returned), or a KL clip without any lr.
        """
        damping = options.damping if damping is None else check_damping("damping", damping)
        kl_clip = options.kl_clip if kl_clip is ... else check_kl_clip(kl_clip)
        lr = options.lr if lr is None else check_nonneg("lr", lr)
        if kl_clip is not None and lr is None:
            raise ValueError("kl_clip needs lr: pass step(lr=...) or lr= at construction")
        return cls(lr, damping, kl_clip, step,
                   **{name: options.at(name, step) for name in SCHEDULED_OPTIONS})


def options_signature(func: Callable, skip: tuple[str, ...] = ()) -> inspect.Signature:
    """``func``'s signature with its ``**options`` replaced by one keyword-only parameter
    per ``KFACOptions`` field (name, annotation, default), minus ``skip``."""
    sig = inspect.signature(func)
    params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    for f in fields(KFACOptions):
        if f.name in skip:
            continue
        default = f.default if f.default is not MISSING else inspect.Parameter.empty
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                        default=default, annotation=f.type))
    return sig.replace(parameters=params)


def options_doc(skip: tuple[str, ...] = (), indent: str = "    ") -> str:
    """The ``Options:`` section listing every option, indented like a class docstring's
    body (appended to ``KFACPreconditioner.__doc__`` and ``KFAC.__doc__``)."""
    lines = ["Options (keyword-only; ``kfac_optim.KFACOptions``):"]
    for f in fields(KFACOptions):
        if f.name not in skip:
            doc = textwrap.fill(f"{f.name} (default {f.default!r}): {f.metadata['doc']}",
                                88, subsequent_indent="        ")
            lines.append("    " + doc)
    return textwrap.indent("\n".join(lines), indent)
