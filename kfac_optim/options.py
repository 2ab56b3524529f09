"""K-FAC hyperparameters, validated in one place for every entry point."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .factors import KFAC_APPROXIMATIONS
from .inverse import DAMPING_MODES

__all__ = ["KFACOptions", "INVERSE_POLICIES", "LOSS_REDUCTIONS", "WOODBURY_REDUCTIONS"]

INVERSE_POLICIES = ("eig", "woodbury", "auto", "hybrid")
LOSS_REDUCTIONS = ("mean", "sum")
FACTOR_DTYPES = (None, torch.float32, torch.float64, torch.bfloat16, torch.float16)
INV_DTYPES = (None, torch.float32, torch.float64)
INVERSE_WORKERS = ("replicate", "assign", "owner")
WOODBURY_REDUCTIONS = ("gather", "row_sharded")
STORE_DEVICES = ("auto", "cpu", "compute")


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_nonneg(name: str, value: Any) -> float:
    """``value`` as a float >= 0, else ``ValueError``/``TypeError`` naming ``name``."""
    if not _is_real(value):
        raise TypeError(f"{name} must be a finite real number >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


def check_kl_clip(value: Any) -> float | None:
    if value is None:
        return None
    if not _is_real(value) or value <= 0:
        raise ValueError(f"kl_clip must be None (disabled) or a real number > 0, got {value!r}")
    return float(value)


def _check_choice(name: str, value: Any, accepted: tuple) -> None:
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not accepted; accepted values: {accepted}")


def _check_steps(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


@dataclass
class KFACOptions:
    """All K-FAC hyperparameters; see ``KFACPreconditioner`` for their meaning.

    Raises:
        ValueError / TypeError: naming the argument and the accepted values.
    """

    damping: float = 1e-3
    damping_mode: str = "exact"
    factor_decay: float = 0.95
    factor_update_steps: int = 10
    inv_update_steps: int = 100
    kl_clip: float | None = 1e-3
    lr: float | None = None
    inverse_policy: str = "eig"
    loss_reduction: str = "mean"
    kfac_approx: str = "expand"
    skip_layers: tuple = field(default_factory=tuple)
    factor_dtype: torch.dtype | None = None
    inv_dtype: torch.dtype | None = None
    woodbury_max_rank: int = 8192
    woodbury_rank: int | None = None
    auto_rho: float = 0.75
    auto_t_max: int = 8192
    hybrid_min_out: int = 4096
    max_condition_number: float | None = None
    woodbury_dtype: torch.dtype | None = None
    woodbury_store_device: str = "auto"
    woodbury_store_threshold_bytes: int = 500 * 2**20
    accumulation_steps: int = 1
    eigenvalue_correction: bool = False
    inv_device: Any = "auto"
    process_group: Any = "auto"
    inverse_workers: str = "replicate"
    # "gather" by default: row-sharded states hold one rank's rows of U, which Accelerate /
    # Trainer checkpoints (one optimizer file from rank 0) cannot resume from; measured trade-
    # off in benchmarks/README.md, "Woodbury across ranks"
    woodbury_reduction: str = "gather"
    comm_dtype: torch.dtype | None = None
    comm_bucket_mb: float | None = None
    grad_scaler: Any = None

    def __post_init__(self) -> None:
        self.damping = check_nonneg("damping", self.damping)
        _check_choice("damping_mode", self.damping_mode, DAMPING_MODES)
        if not _is_real(self.factor_decay) or not 0.0 <= self.factor_decay < 1.0:
            raise ValueError(f"factor_decay must be a real number in [0, 1), got "
                             f"{self.factor_decay!r}")
        _check_steps("factor_update_steps", self.factor_update_steps)
        _check_steps("inv_update_steps", self.inv_update_steps)
        self.kl_clip = check_kl_clip(self.kl_clip)
        if self.lr is not None:
            self.lr = check_nonneg("lr", self.lr)
        _check_choice("inverse_policy", self.inverse_policy, INVERSE_POLICIES)
        _check_choice("loss_reduction", self.loss_reduction, LOSS_REDUCTIONS)
        _check_choice("kfac_approx", self.kfac_approx, KFAC_APPROXIMATIONS)
        _check_choice("factor_dtype", self.factor_dtype, FACTOR_DTYPES)
        _check_choice("inv_dtype", self.inv_dtype, INV_DTYPES)
        _check_choice("woodbury_dtype", self.woodbury_dtype, FACTOR_DTYPES)
        _check_choice("woodbury_store_device", self.woodbury_store_device, STORE_DEVICES)
        for name in ("woodbury_max_rank", "auto_t_max", "hybrid_min_out", "accumulation_steps",
                     "woodbury_store_threshold_bytes"):
            _check_steps(name, getattr(self, name))
        if self.woodbury_rank is not None:
            _check_steps("woodbury_rank", self.woodbury_rank)
            if self.woodbury_rank > self.woodbury_max_rank:
                raise ValueError(f"woodbury_rank={self.woodbury_rank} must be <= "
                                 f"woodbury_max_rank={self.woodbury_max_rank} (or None)")
        if not _is_real(self.auto_rho) or self.auto_rho <= 0:
            raise ValueError(f"auto_rho must be a real number > 0, got {self.auto_rho!r}")
        if self.max_condition_number is not None and (
                not _is_real(self.max_condition_number) or self.max_condition_number < 1):
            raise ValueError("max_condition_number must be None or a real number >= 1, got "
                             f"{self.max_condition_number!r}")
        self.inv_device = self._check_inv_device(self.inv_device)
        _check_choice("comm_dtype", self.comm_dtype, FACTOR_DTYPES)
        _check_choice("inverse_workers", self.inverse_workers, INVERSE_WORKERS)
        _check_choice("woodbury_reduction", self.woodbury_reduction, WOODBURY_REDUCTIONS)
        if self.woodbury_reduction == "row_sharded" and self.inverse_workers == "owner":
            raise ValueError("woodbury_reduction='row_sharded' spreads a low-rank G's rows over "
                             "all ranks, inverse_workers='owner' keeps each layer on one rank: "
                             "choose one (accepted with row_sharded: 'replicate', 'assign')")
        if self.comm_bucket_mb is not None and (not _is_real(self.comm_bucket_mb)
                                                or self.comm_bucket_mb <= 0):
            raise ValueError("comm_bucket_mb must be None (one buffer per destination) or a "
                             f"real number of MiB > 0, got {self.comm_bucket_mb!r}")
        if not isinstance(self.eigenvalue_correction, bool):
            raise TypeError("eigenvalue_correction must be a bool, got "
                            f"{self.eigenvalue_correction!r}")
        if self.eigenvalue_correction and self.damping_mode != "exact":
            raise ValueError("eigenvalue_correction=True (EKFAC) needs damping_mode='exact' "
                             f"(got damping_mode={self.damping_mode!r})")
        if self.eigenvalue_correction and self.inverse_workers == "owner":
            raise ValueError(
                "eigenvalue_correction=True (EKFAC) is not supported with inverse_workers="
                "'owner': its per-row statistics live on every rank and the eigenbasis on the "
                "layer's owner only; use inverse_workers='replicate' or 'assign'")
        if self.grad_scaler is not None and not hasattr(self.grad_scaler, "get_scale"):
            raise TypeError("grad_scaler must be a torch.amp.GradScaler (or None), got "
                            f"{type(self.grad_scaler).__name__}")
        self.skip_layers = self._check_skip_layers(self.skip_layers)

    @staticmethod
    def _check_inv_device(device: Any) -> torch.device | None:
        """``"auto"`` (the layer's device) -> None; else a ``torch.device``."""
        if device == "auto":
            return None
        try:
            return torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"inv_device={device!r} is not accepted; accepted: 'auto', 'cpu', "
                             "a CUDA device such as 'cuda:0', or a torch.device") from None

    @staticmethod
    def _check_skip_layers(skip: Any) -> tuple:
        if isinstance(skip, (str, type)):
            skip = (skip,)
        try:
            items = tuple(skip)
        except TypeError:
            raise TypeError("skip_layers must be an iterable of module-name regexes (str) or "
                            f"nn.Module subclasses, got {skip!r}") from None
        for item in items:
            if isinstance(item, str):
                try:
                    re.compile(item)
                except re.error as err:
                    raise ValueError(
                        f"skip_layers: {item!r} is not a valid regex ({err})") from None
            elif not (isinstance(item, type) and issubclass(item, nn.Module)):
                raise TypeError("skip_layers entries must be module-name regexes (str) or "
                                f"nn.Module subclasses, got {item!r}")
        return items

    @property
    def comm_bucket_bytes(self) -> int | None:
        """``comm_bucket_mb`` in bytes (None: no cap)."""
        return None if self.comm_bucket_mb is None else max(1, int(self.comm_bucket_mb * 2**20))

    def uses_low_rank_g(self, out_features: int) -> bool:
        """Whether a layer starts with a low-rank (Woodbury) G under ``inverse_policy``."""
        if self.inverse_policy == "hybrid":
            return out_features >= self.hybrid_min_out
        return self.inverse_policy in ("woodbury", "auto")

    def truncates(self, out_features: int) -> bool:
        """Whether a low-rank G of this layer is kept at ``woodbury_rank`` columns
        (truncated EMA) instead of growing until ``max_low_rank`` and turning dense."""
        return (self.woodbury_rank is not None
                and self.woodbury_rank <= self.max_low_rank(out_features))

    def max_low_rank(self, out_features: int) -> int:
        """Columns past which a low-rank G becomes dense: ``woodbury_max_rank``, and under
        ``"auto"`` also ``auto_rho * o`` and ``auto_t_max`` (Woodbury costs O(o k^2 + k^3)
        against eig's O(o^3), so it pays while ``k <= rho o``; rho = 0.75 from the
        crossover measured by benchmarks/inverse_policies.py: at k = o Woodbury's inverse
        was 1.86x slower than eig, at k = 0.75 o 0.88x)."""
        limit = self.woodbury_max_rank
        if self.inverse_policy == "auto":
            limit = min(limit, self.auto_t_max, int(self.auto_rho * out_features))
        return limit

    def skips(self, name: str, module: nn.Module) -> bool:
        """Whether ``skip_layers`` leaves this module to the base update."""
        for item in self.skip_layers:
            if isinstance(item, str) and re.search(item, name):
                return True
            if isinstance(item, type) and isinstance(module, item):
                return True
        return False
