"""The demo's training loop (one optimizer, one fresh model, equal steps and seed), the
interleaved step-time measurement and the held-out curve readers."""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._extras import require
from .tasks import Task, make_optimizer

__all__ = ["RATIO_SPREAD_LIMIT", "reach", "time_interleaved", "timing_reliability", "train_one",
           "val_loss_at_step", "val_loss_at_time"]


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


def _val_loss_at(val_curve: Sequence[Sequence[float]], column: int, x: float) -> float | None:
    """Held-out loss where column ``column`` (0: step, 1: train seconds) of the curve's
    ``(step, seconds, val)`` rows equals ``x``, interpolated linearly between evals; None
    past the end of the curve."""
    for r0, r1 in zip(val_curve, val_curve[1:], strict=False):
        x0, x1, v0, v1 = r0[column], r1[column], r0[2], r1[2]
        if x0 <= x <= x1:
            return v0 if x1 == x0 else v0 + (v1 - v0) * (x - x0) / (x1 - x0)
    return None


def val_loss_at_time(val_curve: Sequence[Sequence[float]], seconds: float) -> float | None:
    """Held-out loss at ``seconds`` of training time, interpolated linearly between evals.

    Returns None when ``seconds`` lies past the end of the curve.
    """
    return _val_loss_at(val_curve, 1, seconds)


def val_loss_at_step(val_curve: Sequence[Sequence[float]], step: float) -> float | None:
    """Held-out loss at ``step`` (fractional allowed), interpolated linearly between evals.

    Returns None when ``step`` lies past the end of the curve.
    """
    return _val_loss_at(val_curve, 0, step)


def reach(val_curve: Sequence[Sequence[float]], target: float) -> tuple[float, float] | None:
    """(step, train seconds) at which the held-out curve first gets to ``target`` or below,
    interpolated linearly from the evaluation before; None if it never does."""
    prev = None
    for row in val_curve:
        step, secs, val = row
        if math.isfinite(val) and val <= target:
            if prev is None or prev[2] == val:
                return float(step), float(secs)
            w = (prev[2] - target) / (prev[2] - val)
            return prev[0] + w * (step - prev[0]), prev[1] + w * (secs - prev[1])
        prev = row
    return None


# Interleaved step time -----------------------------------------------------------
# A timing is called unreliable when the ratio to the reference varies by more than this
# fraction of its median from block to block ((max - min) / median over the rounds), or
# when the 1-minute load average exceeds the number of cores (then other processes take
# turns with this one, and the ratio measures the scheduler as much as the optimizers).
RATIO_SPREAD_LIMIT = 0.25


def _to_device(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    return type(batch)(b.to(device, non_blocking=True) for b in batch)


def time_interleaved(task: Task, configs: dict[str, tuple[str, dict[str, Any]]], *,
                     steps: int, rounds: int, warmup: int = 5, reference: str = "adamw",
                     device: torch.device | str | None = None) -> dict[str, Any]:
    """Per-step training time of several optimizers, measured interleaved in one process.

    One model (seed 0) and optimizer per configuration; each runs ``warmup`` untimed steps,
    then ``rounds`` rounds in which every configuration in turn runs a block of ``steps``
    steps (zero_grad, loss, backward, step; no LR schedule, no evaluation). Machine load
    that changes over minutes hits every configuration of a round alike, so the ratio of
    block times within a round is what is kept: median over rounds. Pick ``steps`` a
    multiple of K-FAC's ``inv_update_steps`` so each block amortizes its inverse updates as
    training does.

    Args:
        task: from ``make_task`` (its ``build_model``, ``batches`` and ``loss``).
        configs: label -> (optimizer name, hyperparameters) for ``make_optimizer``; must
            contain ``reference``.
        steps: steps per timed block (>= 1); rounds: timed rounds (>= 1).
        warmup: untimed steps per configuration first.
        reference: the label whose block times divide the others'.
        device: where models and batches go (None: where ``build_model`` puts them). On
            CUDA each block is closed by ``torch.cuda.synchronize``.

    Returns:
        label -> ``{"ms_per_step"`` (median block), ``"samples_ms"`` (per block),
        ``"round_ratios"`` (block time / the reference's, per round), ``"ratio_to_<reference>"``
        (median of those), ``"ratio_spread"`` ((max - min) / median of them)}.

    Raises:
        ValueError: ``reference`` not in ``configs``, ``steps`` or ``rounds`` < 1.
    """
    if reference not in configs:
        raise ValueError(f"reference={reference!r} is not a label of configs {list(configs)}")
    if steps < 1 or rounds < 1:
        raise ValueError(f"steps and rounds must be >= 1, got steps={steps}, rounds={rounds}")
    device = None if device is None else torch.device(device)
    sync = ((lambda: torch.cuda.synchronize(device)) if device is not None
            and device.type == "cuda" else (lambda: None))
    runs = {}
    for label, (name, hp) in configs.items():
        torch.manual_seed(0)
        model = task.build_model()
        if device is not None:
            model = model.to(device)
        model.train()
        runs[label] = dict(model=model, opt=make_optimizer(name, model, hp),
                           batches=task.batches(0), samples=[])

    def block(r: dict[str, Any], n: int) -> float:
        batches = [_to_device(next(r["batches"]), device) for _ in range(n)]
        sync()
        t0 = time.perf_counter()
        for batch in batches:
            r["opt"].zero_grad(set_to_none=True)
            task.loss(r["model"], batch).backward()
            r["opt"].step()
        sync()
        return 1000.0 * (time.perf_counter() - t0) / n

    try:
        for r in runs.values():
            block(r, warmup)
        for _ in range(rounds):
            for r in runs.values():
                r["samples"].append(block(r, steps))
    finally:
        for r in runs.values():
            if hasattr(r["opt"], "preconditioner"):
                r["opt"].preconditioner.remove()
    ref = runs[reference]["samples"]
    out = {}
    for label, r in runs.items():
        ratios = [s / b for s, b in zip(r["samples"], ref, strict=True)]
        med = statistics.median(ratios)
        out[label] = {"ms_per_step": statistics.median(r["samples"]), "samples_ms": r["samples"],
                      "round_ratios": ratios, f"ratio_to_{reference}": med,
                      "ratio_spread": (max(ratios) - min(ratios)) / med}
    return out


def timing_reliability(step_time: dict[str, Any], loadavg: Sequence[float | None],
                       cores: int | None = None,
                       spread_limit: float = RATIO_SPREAD_LIMIT) -> list[str]:
    """Why the interleaved ratios of ``time_interleaved`` are not to be trusted (empty list:
    no reason found): a 1-minute load average in ``loadavg`` above ``cores`` (default
    ``os.cpu_count()``), or a ratio whose block-to-block spread exceeds ``spread_limit``
    (``RATIO_SPREAD_LIMIT``; with one round the spread is 0 and cannot be judged)."""
    cores = cores or os.cpu_count() or 1
    reasons = [f"load average {load:.2f} > {cores} cores" for load in loadavg
               if load is not None and load > cores]
    reasons += [f"{label}: step-time ratio varies {t['ratio_spread']:.0%} between blocks "
                f"(> {spread_limit:.0%})" for label, t in step_time.items()
                if t["ratio_spread"] > spread_limit]
    rounds = min(len(t["round_ratios"]) for t in step_time.values())
    if rounds < 2:
        reasons.append(f"{rounds} timing round: no spread to judge")
    return reasons
