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

__all__ = ["KFACOptions", "INVERSE_POLICIES", "LOSS_REDUCTIONS"]

INVERSE_POLICIES = ("eig",)
LOSS_REDUCTIONS = ("mean", "sum")
FACTOR_DTYPES = (None, torch.float32, torch.float64)


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
        _check_choice("inv_dtype", self.inv_dtype, FACTOR_DTYPES)
        self.skip_layers = self._check_skip_layers(self.skip_layers)

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

    def skips(self, name: str, module: nn.Module) -> bool:
        """Whether ``skip_layers`` leaves this module to the base update."""
        for item in self.skip_layers:
            if isinstance(item, str) and re.search(item, name):
                return True
            if isinstance(item, type) and isinstance(module, item):
                return True
        return False
