"""Hyperparameter grid for the demo: ``python benchmarks/tune_demo.py --task lm --opt kfac``.

Trains each grid point with ``kfac_optim.demo.train_one`` on exactly the demo's
setting (same model, data, seed, steps, LR schedule) and prints one line per
point and a JSON list (``--out``). Grids are given as JSON: a list of dicts of
overrides of the demo's default hyperparameters, e.g.::

    python benchmarks/tune_demo.py --task lm --opt adamw \\
        --grid '[{"lr": 1e-3}, {"lr": 3e-3}, {"lr": 1e-2}]'

Without ``--grid`` the recorded grid of ``GRIDS`` (benchmarks/README.md, "Demo
tuning") is run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from kfac_optim.demo import TASK_DEFAULTS, default_hparams, make_task, train_one

# The grids behind the demo defaults: the same number of points for each optimizer.
GRIDS: dict[str, dict[str, list[dict]]] = {
    "lm": {
        "kfac": [dict(lr=lr, damping=d) for lr in (0.3, 1.0, 3.0) for d in (0.01, 0.03, 0.1)],
        "adamw": [dict(lr=lr, weight_decay=wd) for lr in (3e-4, 1e-3, 3e-3)
                  for wd in (0.0, 0.01, 0.1)],
        "sgd": [dict(lr=lr, momentum=m) for lr in (0.03, 0.1, 0.3) for m in (0.9, 0.95, 0.99)],
    },
    "digits": {
        "kfac": [dict(lr=lr, damping=d) for lr in (0.3, 1.0, 3.0) for d in (1.0, 10.0, 100.0)],
        "adamw": [dict(lr=lr, weight_decay=wd) for lr in (3e-4, 1e-3, 3e-3)
                  for wd in (0.0, 0.01, 0.1)],
        "sgd": [dict(lr=lr, momentum=m) for lr in (0.01, 0.03, 0.1) for m in (0.9, 0.95, 0.99)],
    },
}


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the grid; print one line per point; return (and optionally save) the rows."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=("lm", "digits"), default="lm")
    p.add_argument("--opt", choices=("kfac", "adamw", "sgd"), required=True)
    p.add_argument("--grid", help="JSON list of hyperparameter overrides")
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--out", help="write the rows as JSON here")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    grid = json.loads(args.grid) if args.grid else GRIDS[args.task][args.opt]
    steps = args.steps or TASK_DEFAULTS[args.task]["steps"]
    task = make_task(args.task, steps=steps, seed=args.seed)
    rows = []
    for overrides in grid:
        hp = default_hparams(args.task, args.opt)
        hp.update(overrides)
        t0 = time.perf_counter()
        r = train_one(task, args.opt, hp, steps=steps, seed=args.seed,
                      eval_every=args.eval_every, warmup=max(1, steps // 20), progress=False)
        row = {"task": args.task, "opt": args.opt, "steps": steps, "seed": args.seed,
               "overrides": overrides, "train_loss": r["final_train_loss"],
               "val_loss": r["final_val_loss"], "val_acc": r.get("final_val_acc"),
               "ms_per_step": r["ms_per_step"], "diverged": r["diverged"],
               "val_curve": r["val_curve"]}
        rows.append(row)
        val = row["val_loss"]
        print(f"{args.opt:5s} {json.dumps(overrides):45s} train {row['train_loss']:.4f} "
              f"val {val:.4f}" + ("" if row["val_acc"] is None else f" acc {row['val_acc']:.4f}")
              + f"  {row['ms_per_step']:.1f} ms/step  ({time.perf_counter() - t0:.0f} s)"
              + ("  DIVERGED" if row["diverged"] or not math.isfinite(val) else ""), flush=True)
        if args.out:  # after every point, so that an interrupted grid keeps what it ran
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(rows, indent=1))
    best = min(rows, key=lambda r: r["val_loss"] if math.isfinite(r["val_loss"]) else math.inf)
    print(f"best {args.opt}: {json.dumps(best['overrides'])} val {best['val_loss']:.4f}",
          file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
