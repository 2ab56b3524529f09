"""Argument checks shared by every public entry point of :mod:`fisher_metrics`.

Each check raises ``ValueError`` or ``TypeError`` with a message that names the
parameter and the accepted values, so that every function reports bad input the
same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Integral, Real

import torch

LANCZOS_DTYPES = (torch.float32, torch.float64)


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices`` (strings), else raise."""
    choices = tuple(choices)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {choices}; got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")
    return value


def check_int(name: str, value: object, minimum: int = 1) -> int:
    """Return ``value`` as ``int`` if it is an integer >= ``minimum``, else raise."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}; got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value}")
    return int(value)


def check_positive_float(name: str, value: object, allow_zero: bool = False) -> float:
    """Return ``value`` as ``float`` if it is finite and > 0 (>= 0 with ``allow_zero``)."""
    bound = ">= 0" if allow_zero else "> 0"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a finite real number {bound}; got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite real number {bound}; got {value}")
    return value


def check_dtype(name: str, value: object, allowed: tuple[torch.dtype, ...] = LANCZOS_DTYPES):
    """Return ``value`` if it is ``None`` or one of the ``allowed`` torch dtypes."""
    if value is None:
        return None
    if not isinstance(value, torch.dtype):
        raise TypeError(f"{name} must be None or one of {allowed}; got {type(value).__name__}")
    if value not in allowed:
        raise ValueError(f"{name} must be None or one of {allowed}; got {value}")
    return value


def check_seed(name: str, value: object) -> int:
    """Return ``value`` if it is a non-negative integer seed."""
    return check_int(name, value, minimum=0)


def as_eigenvalue_vector(name: str, values: object) -> torch.Tensor:
    """Return ``values`` as a 1-D float64 CPU tensor with finite entries.

    Accepts a 1-D tensor, a NumPy array or a sequence of real numbers.
    """
    if isinstance(values, torch.Tensor):
        tensor = values.detach().to("cpu", torch.float64)
    else:
        try:
            tensor = torch.as_tensor(values, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                f"{name} must be a 1-D tensor or a sequence of real numbers; "
                f"got {type(values).__name__}"
            ) from err
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-D; got shape {tuple(tensor.shape)}")
    if tensor.numel() == 0:
        raise ValueError(f"{name} must contain at least one eigenvalue")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} must contain only finite values")
    return tensor
