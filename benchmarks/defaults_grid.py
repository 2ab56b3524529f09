"""The grid that chose K-FAC's defaults: ``python benchmarks/defaults_grid.py``.

Each configuration is ``KFAC(model, lr=AdamW's tuned lr, weight_decay=..., **config)`` on a
workload of ``benchmarks/time_to_target.py`` (same init, data order and schedule as there),
one thread. Prints one line per run and a table, and writes every run (settings, final
held-out loss, held-out curve) to ``--out`` as JSON. ``--configs`` takes a JSON list of
option dicts; the default list is the one in ``benchmarks/README.md``, "Choosing the
defaults".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import time_to_target as ttt  # noqa: E402

# AdamW's tuned lr and weight decay per workload (benchmarks/README.md, "Time to target").
ADAMW = {"digits_ae": dict(lr=3e-3, weight_decay=0.0),
         "digits_cnn": dict(lr=1e-2, weight_decay=0.1),
         "llama_lm": dict(lr=2e-3, weight_decay=0.0),
         "gpt2_lm": dict(lr=1e-3, weight_decay=0.0)}
SCHEDULE = dict(factor_update_steps=10, inv_update_steps=20)
DEFAULT_CONFIGS = [dict(SCHEDULE, damping=d, damping_mode=m)
                   for d in (1e-3, 1e-2, 1e-1) for m in ("exact", "factored")]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default=",".join(ADAMW))
    p.add_argument("--seeds", default="0")
    p.add_argument("--configs", default=None, help="JSON list of KFAC option dicts")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "defaults_grid.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    configs = DEFAULT_CONFIGS if args.configs is None else json.loads(args.configs)
    records = []
    load = os.getloadavg()[0]
    for name in args.workloads.split(","):
        task = ttt.make_workload(name)
        steps = ttt.WORKLOADS[name]["steps"]
        for seed in (int(s) for s in args.seeds.split(",")):
            for config in configs:
                hp = dict(ADAMW[name], **config)
                t0 = time.perf_counter()
                run = ttt._run(task, "kfac", hp, seed, steps, 25)
                records.append(dict(workload=name, seed=seed, hp=hp,
                                    final=run["final_val_loss"], curve=run["val_curve"],
                                    wall_s=time.perf_counter() - t0))
    print(f"{'workload':10s} {'seed':>4s}  {'config':60s} {'final val':>9s}")
    for r in records:
        cfg = {k: v for k, v in r["hp"].items() if k not in ("lr", "weight_decay")}
        print(f"{r['workload']:10s} {r['seed']:4d}  {json.dumps(cfg):60s} {r['final']:9.4f}")
    Path(args.out).write_text(json.dumps(dict(loadavg_start=load, runs=records), indent=1))
    return records


if __name__ == "__main__":
    main()
