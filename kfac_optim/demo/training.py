"""The demo's training loop: one optimizer, one fresh model, equal steps and seed."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._extras import require
from .tasks import Task, make_optimizer

__all__ = ["train_one", "val_loss_at_time"]


def _warmup_cosine(steps: int, warmup: int, final_ratio: float = 0.1) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


# Training ----------------------------------------------------------------------
def train_one(task: Task, name: str, hp: dict[str, Any], *, steps: int, seed: int,
              eval_every: int, warmup: int, schedule: str = "cosine", progress: bool = True,
              keep: bool = False) -> dict[str, Any]:
    """Train a fresh model (seeded with ``seed``) with one optimizer for ``steps`` steps.

    Args:
        task: from ``make_task``.
        name, hp: optimizer name and hyperparameters (``make_optimizer``).
        steps: optimizer steps; eval_every: held-out evaluation period (0: only at the end).
        warmup: linear warm-up steps; schedule: ``"cosine"`` (to 10% of the peak after
            warm-up) or ``"constant"`` (after warm-up).
        progress: show a tqdm progress bar.
        keep: also return the trained ``model`` and ``optimizer`` under those keys.

    Returns:
        Final train/held-out loss (and accuracy), training wall time ``wall_s`` (no
        evaluation), ``ms_per_step``, the per-step train loss curve, and the held-out
        curve as ``[step, train_seconds, val_loss]`` rows.
    """
    tqdm = require("tqdm.auto", "demo", "kfac_optim.demo.train_one (progress bar)").tqdm

    torch.manual_seed(seed)
    model = task.build_model()
    model.train()
    opt = make_optimizer(name, model, hp)
    if schedule == "cosine":
        factor = _warmup_cosine(steps, warmup)
    elif schedule == "constant":
        def factor(step: int) -> float:
            return min(1.0, (step + 1) / max(1, warmup))
    else:
        raise ValueError(f"schedule={schedule!r}; accepted: ('cosine', 'constant')")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    batches = task.batches(seed)

    train_curve: list[float] = []
    val_curve: list[list[float]] = []
    train_s = 0.0

    def record_eval(step: int) -> dict[str, float]:
        metrics = task.evaluate(model)
        val_curve.append([step, round(train_s, 4), metrics["val_loss"]])
        return metrics

    record_eval(0)
    bar = tqdm(range(steps), desc=f"{task.name}/{name}", disable=not progress, leave=True,
               dynamic_ncols=True, file=sys.stderr)
    for step in bar:
        batch = next(batches)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model, batch)
        loss.backward()
        opt.step()
        sched.step()
        loss_value = float(loss.detach())
        train_s += time.perf_counter() - t0
        train_curve.append(loss_value)
        if not math.isfinite(loss_value):
            bar.close()
            break
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            record_eval(step + 1)
            bar.set_postfix(loss=f"{loss_value:.3f}", val=f"{val_curve[-1][2]:.3f}")
    bar.close()
    final = record_eval(len(train_curve))
    done = len(train_curve)
    result: dict[str, Any] = {
        "final_train_loss": final["train_loss"],
        "final_val_loss": final["val_loss"],
        "wall_s": train_s,
        "ms_per_step": 1000.0 * train_s / max(1, done),
        "steps": done,
        "diverged": done < steps or not math.isfinite(final["val_loss"]),
        "best_val_loss": min(v for _, _, v in val_curve),
        "best_val_step": min(val_curve, key=lambda row: row[2])[0],
        "hparams": _jsonable(hp),
        "train_loss_curve": train_curve,
        "val_curve": val_curve,
    }
    for key in ("train_acc", "val_acc", "val_bpb"):
        if key in final:
            result[f"final_{key}"] = final[key]
    if name == "kfac":
        result["kfac_skipped_steps"] = opt.skipped_steps
        result["kfac_layers"] = _jsonable(opt.preconditioner.describe())
    if keep:
        result["model"], result["optimizer"] = model, opt
    return result


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def val_loss_at_time(val_curve: Sequence[Sequence[float]], seconds: float) -> float | None:
    """Held-out loss at ``seconds`` of training time, interpolated linearly between evals.

    Returns None when ``seconds`` lies past the end of the curve.
    """
    for (_, t0, v0), (_, t1, v1) in zip(val_curve, val_curve[1:], strict=False):
        if t0 <= seconds <= t1:
            return v0 if t1 == t0 else v0 + (v1 - v0) * (seconds - t0) / (t1 - t0)
    return None
