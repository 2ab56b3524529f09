"""Adaptive damping: the Levenberg-Marquardt rule of Martens & Grosse (2015), Sec. 6.5.

Every ``T1`` steps (``damping_adaptation_steps``) the step ``delta`` that ``KFAC`` actually
took (preconditioned, KL-clipped, through the base update: ``theta_new - theta_old``) is
judged by the reduction ratio of the K-FAC quadratic model::

    M(delta) = grad^T delta + 1/2 delta^T (F + lambda I) delta
    rho      = (h(theta + delta) - h(theta)) / M(delta)

``h`` is the closure's loss on the step's batch (evaluated again after the update), ``grad``
its gradient at ``theta`` (before preconditioning), ``F`` the K-FAC curvature (block
diagonal, ``A (x) G`` per preconditioned layer, ``KFACPreconditioner.curvature_quadratic``;
parameters outside K-FAC's layers contribute their ``grad^T delta`` and ``lambda |delta|^2``
terms only) and ``lambda`` the damping the step used. Then, with ``omega = (19/20)^T1``::

    rho > 3/4:  lambda <- omega lambda      (the model is good: trust it more)
    rho < 1/4:  lambda <- lambda / omega    (the model is poor: damp more)

and ``lambda`` is clamped into ``[damping_min, damping_max]``. Undefined ratios are handled
so that nothing non-finite reaches the damping: a non-finite ``h(theta + delta)``, and a
model value ``M(delta) > 0`` (the damped model itself predicts that the step taken
increases the loss: too long a step for the damping, as with a stale inverse at a small
lambda), count as ``rho = -inf`` (damp more); ``M(delta) = 0`` (a zero step) or a
non-finite model value gives ``rho = nan`` and leaves ``lambda`` unchanged. See
docs/design.md, "Damping and schedules".
"""

from __future__ import annotations

import math
from typing import Any

from .options import _is_real, _steps, check_damping

__all__ = ["DAMPING_ADAPTATIONS", "LevenbergMarquardt"]

DAMPING_ADAPTATIONS = (None, "levenberg_marquardt")
LM_DECAY = 19 / 20  # omega = (19/20)^T1 (Martens & Grosse 2015, Sec. 6.5)
LM_RAISE, LM_LOWER = 0.25, 0.75  # rho < 1/4: damp more; rho > 3/4: damp less


class LevenbergMarquardt:
    """The rule and its state: the damping ``lambda``, the last ratio ``rho`` and the step
    counter (``state_dict``: plain floats and ints).

    Args:
        interval: ``T1`` >= 1, adapt at every ``T1``-th step (the ``T1``-th, ``2 T1``-th,
            ...; default 5 as in the paper).
        damping_min, damping_max: the clamp range, ``0 < damping_min <= damping_max``.

    Attributes:
        omega: ``(19/20)^T1``.
        steps: steps counted so far (every ``KFAC.step``, skipped ones included).
        rho: the last reduction ratio (nan before the first adaptation, or when undefined).
        damping: the damping after the last adaptation (None before the first).
        raised, lowered: how many adaptations divided / multiplied lambda by omega.

    Raises:
        ValueError / TypeError: naming the argument and the accepted values.
    """

    def __init__(self, interval: int = 5, damping_min: float = 1e-6,
                 damping_max: float = 10.0) -> None:
        self.interval = _steps("damping_adaptation_steps", interval)
        self.damping_min = check_damping("damping_min", damping_min)
        self.damping_max = check_damping("damping_max", damping_max)
        if self.damping_min > self.damping_max:
            raise ValueError(f"damping_min={damping_min!r} must be <= damping_max="
                             f"{damping_max!r}")
        self.omega = LM_DECAY ** self.interval
        self.steps = 0
        self.rho = math.nan
        self.damping: float | None = None
        self.raised = 0
        self.lowered = 0

    def settings(self) -> dict[str, Any]:
        """What every rank must agree on (``KFACPreconditioner.check_ranks_agree``)."""
        return {"damping_adaptation_steps": self.interval, "damping_min": self.damping_min,
                "damping_max": self.damping_max}

    def check_start(self, damping: float) -> None:
        """Refuse a starting damping outside ``[damping_min, damping_max]``.

        Raises:
            ValueError: naming the three values.
        """
        if not self.damping_min <= damping <= self.damping_max:
            raise ValueError(f"damping={damping!r} must lie in [damping_min, damping_max] = "
                             f"[{self.damping_min!r}, {self.damping_max!r}] with "
                             "damping_adaptation")

    @property
    def due(self) -> bool:
        """Whether the step about to be taken is an adaptation step (every ``T1``-th)."""
        return (self.steps + 1) % self.interval == 0

    @staticmethod
    def ratio(loss_before: float, loss_after: float, model: float) -> float:
        """``rho = (h(theta + delta) - h(theta)) / M(delta)``; ``-inf`` for a non-finite
        ``loss_after`` or ``M(delta) > 0``, ``nan`` for ``M(delta) = 0`` or a non-finite
        ``M(delta)`` or ``loss_before`` (module docstring)."""
        if not (math.isfinite(model) and math.isfinite(loss_before)) or model == 0:
            return math.nan
        if not math.isfinite(loss_after) or model > 0:
            return -math.inf
        return (loss_after - loss_before) / model

    def adjust(self, damping: float, rho: float) -> float:
        """The new damping from ``damping`` and ``rho`` (module docstring), clamped; records
        both."""
        if rho > LM_LOWER:
            damping, self.lowered = damping * self.omega, self.lowered + 1
        elif rho < LM_RAISE:  # nan compares False: unchanged
            damping, self.raised = damping / self.omega, self.raised + 1
        self.damping = min(max(damping, self.damping_min), self.damping_max)
        self.rho = rho
        return self.damping

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "rho": self.rho, "damping": self.damping,
                "raised": self.raised, "lowered": self.lowered}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict()``.

        Raises:
            ValueError: a malformed state (naming the key).
        """
        for key in ("steps", "rho", "damping", "raised", "lowered"):
            if key not in state:
                raise ValueError(f"damping_adaptation state lacks {key!r}: not a "
                                 "LevenbergMarquardt.state_dict()")
        damping = state["damping"]
        if damping is not None and not _is_real(damping):
            raise ValueError(f"damping_adaptation state: damping={damping!r} is not a number")
        self.steps = int(state["steps"])
        self.rho = float(state["rho"])
        self.damping = None if damping is None else float(damping)
        self.raised, self.lowered = int(state["raised"]), int(state["lowered"])
