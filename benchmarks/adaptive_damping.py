"""Adaptive vs fixed damping: ``python benchmarks/adaptive_damping.py``.

The deep autoencoder of Martens & Grosse (2015) (64-256-128-32-128-256-64, tanh, linear
code, Bernoulli cross-entropy summed over the 64 pixels of the digits scaled to [0, 1],
nats per image; ``time_to_target.py``'s ``digits_ae``), trained with ``KFAC`` (SGD-momentum
base, lr ``--lr``, factors every step, inverses every 10 steps, KL clip 1e-3) from each
starting damping in ``--dampings``, once with the damping fixed (the baseline) and once
with ``damping_adaptation="levenberg_marquardt"`` (T1 = 5). Both runs of a starting damping
use the same initial weights and batches (batch 64) and a closure on the step's batch.

Per starting damping the table gives the final training and held-out losses of both runs,
the adaptive run's final damping and number of raises / lowers, and its wall time as a
ratio to the fixed run's (the extra closure call every T1 steps and the step's bookkeeping;
runs interleaved in one process, one thread). Writes JSON (``--out``) with the loss curves
(every ``--eval-every`` steps), the damping trajectory and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from time_to_target import DeepAutoencoder, _ae_loss  # noqa: E402 (the same workload)

from kfac_optim import KFAC  # noqa: E402
from kfac_optim.demo.data import digits_batches, load_digits_data  # noqa: E402


def run(damping: float, adaptive: bool, args: argparse.Namespace, data: Any) -> dict:
    torch.manual_seed(args.seed)
    model = DeepAutoencoder()
    # the classic K-FAC update the results were measured with (SGD-momentum, exact damping)
    opt = KFAC(model, lr=args.lr, momentum=0.9, base="sgd", damping=damping,
               damping_mode="exact", factor_update_steps=1, inv_update_steps=10,
               damping_adaptation="levenberg_marquardt" if adaptive else None,
               damping_min=min(1e-6, damping), damping_max=max(10.0, damping))
    batches = digits_batches(data.x_train, data.x_train, 64, args.seed)
    curve, dampings = [], []
    seconds = 0.0
    for step in range(args.steps):
        batch = next(batches)

        def closure(batch=batch):
            opt.zero_grad()
            loss = _ae_loss(model, batch)
            loss.backward()
            return loss

        start = time.perf_counter()
        opt.step(closure)
        seconds += time.perf_counter() - start
        dampings.append(opt.param_groups[0]["damping"])
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            with torch.no_grad():
                curve.append([step + 1, float(_ae_loss(model, (data.x_train, data.x_train))),
                              float(_ae_loss(model, (data.x_val, data.x_val)))])
    lm = opt.damping_adaptation
    return {"damping": damping, "adaptive": adaptive, "seconds": seconds, "curve": curve,
            "dampings": dampings[:: args.eval_every],
            "final_damping": dampings[-1],
            "raised": lm.raised if lm else 0, "lowered": lm.lowered if lm else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dampings", default="1e-4,1e-3,1e-2,1e-1")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"
                                             / "adaptive_damping.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_digits_data(seed=0, scale="unit")
    load_start = os.getloadavg()
    rows = []
    for damping in [float(v) for v in args.dampings.split(",")]:
        fixed = run(damping, False, args, data)
        adaptive = run(damping, True, args, data)
        rows.append((fixed, adaptive))
    print("| start damping | fixed: train / val loss | adaptive: train / val loss | "
          "adaptive final damping | raised / lowered | time x fixed |")
    print("|---:|---:|---:|---:|---:|---:|")
    for fixed, adaptive in rows:
        f, a = fixed["curve"][-1], adaptive["curve"][-1]
        print(f"| {fixed['damping']:g} | {f[1]:.3f} / {f[2]:.3f} | {a[1]:.3f} / {a[2]:.3f} | "
              f"{adaptive['final_damping']:.3g} | {adaptive['raised']} / {adaptive['lowered']} "
              f"| {adaptive['seconds'] / fixed['seconds']:.2f} |")
    out = {"settings": vars(args), "load_average": [load_start, os.getloadavg()],
           "torch": torch.__version__, "platform": platform.platform(),
           "runs": [r for pair in rows for r in pair]}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
