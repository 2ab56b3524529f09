"""Step time of ``fisher_type`` "mc" and "type2" against "empirical":
``python benchmarks/fisher_type.py``.

On the demo's GPT-2 LM (2 x 128, byte vocabulary C = 257, batch 32 x 64 tokens; K-FAC at
the demo's tuned hyperparameters) this times a full training step for each Fisher type at
``(factor_update_steps, inv_update_steps)`` = (1, 10) and (10, 10) (type2 at (10, 10) only,
``--skip``), with the method of
``benchmarks/step_overhead.py`` (fresh model per configuration, one update period of
warm-up, interleaved rounds of blocks holding whole inverse periods, medians). Each
configuration's ratio is to "empirical" at the same schedule, taken per round. "mc" adds
one backward to the layer outputs per factor update; "type2" adds C = 257 backward vectors
(one at a time, ``kfac_optim.fisher.backward_to_outputs``; the script also times that loop
against one ``is_grads_batched`` call). JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_overhead import _lm_setup, bench_model  # noqa: E402

FISHER_TYPES = ("empirical", "mc", "type2")


def loop_vs_batched(seed: int, vectors: int = 8) -> dict[str, float]:
    """Seconds to backpropagate ``vectors`` random logits vectors to every layer output of
    the demo LM, one ``torch.autograd.grad`` each vs one ``is_grads_batched`` call (the
    choice in ``kfac_optim.fisher.backward_to_outputs``)."""
    _, _, build, batches, _ = _lm_setup(seed)
    torch.manual_seed(seed)
    model = build().train()
    outs: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda mod, i, o: outs.append(o))
               for m in model.modules() if type(m).__name__ in ("Linear", "Conv1D")]
    logits = model(input_ids=next(batches)).logits
    for h in handles:
        h.remove()
    v = torch.randn(vectors, *logits.shape)
    torch.autograd.grad(logits, outs, v[0], retain_graph=True)  # warm-up
    t0 = time.perf_counter()
    for u in v:
        torch.autograd.grad(logits, outs, u, retain_graph=True)
    t1 = time.perf_counter()
    torch.autograd.grad(logits, outs, v, retain_graph=True, is_grads_batched=True)
    return {"vectors": vectors, "loop": t1 - t0, "batched": time.perf_counter() - t1}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/fisher_type.json")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="minimum steps per timed block")
    p.add_argument("--schedules", default="1,10:10,10")
    p.add_argument("--types", default=",".join(FISHER_TYPES))
    p.add_argument("--skip", default="type2(1,10)",
                   help="comma list of configuration labels not timed (type2 at f=1 costs C "
                        "backward vectors every step: minutes per block on 2 CPU cores)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    schedules = [tuple(int(x) for x in pair.split(",")) for pair in args.schedules.split(":")]
    types = args.types.split(",")
    if types[0] != "empirical" or any(t not in FISHER_TYPES for t in types):
        p.error(f"--types {args.types!r}: 'empirical' first, then any of {FISHER_TYPES}")
    configs = [(f"{t}({f},{i})", "kfac", {"factor_update_steps": f, "inv_update_steps": i,
                                          "fisher_type": t, "fisher_seed": 0})
               for f, i in schedules for t in types]
    configs = [c for c in configs if c[0] not in args.skip.split(",")]
    t0 = time.perf_counter()
    load = os.getloadavg()
    res = bench_model(_lm_setup(args.seed), repeats=args.repeats, base_steps=args.steps,
                      seed=args.seed, configs=configs)
    batched = loop_vs_batched(args.seed)
    rows, lines = {}, ["| fisher_type | schedule (f, i) | ms/step | x empirical |",
                       "|---|---|---:|---:|"]
    for (label, _, hp), (_, c) in zip(configs, res["configs"].items(), strict=True):
        f, i = hp["factor_update_steps"], hp["inv_update_steps"]
        base = res["configs"][f"empirical({f},{i})"]["samples_ms"]
        ratio = statistics.median(s / b for s, b in zip(c["samples_ms"], base, strict=True))
        rows[label] = {"fisher_type": hp["fisher_type"], "factor_update_steps": f,
                       "inv_update_steps": i, "ms_per_step": c["ms_per_step"],
                       "ratio_to_empirical": ratio, "samples_ms": c["samples_ms"],
                       "block_steps": c["block_steps"]}
        lines.append(f"| {hp['fisher_type']} | ({f}, {i}) | {c['ms_per_step']:.1f} | "
                     f"{ratio:.2f} |")
    table = "\n".join(lines)
    out = {"command": "python benchmarks/fisher_type.py " + " ".join(argv or sys.argv[1:]),
           "model": res["model"], "torch": torch.__version__,
           "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "loadavg_before": load, "loadavg_after": os.getloadavg(),
           "repeats": args.repeats, "loop_vs_batched_s": batched,
           "wall_s": time.perf_counter() - t0, "configs": rows, "table": table}
    print(table)
    print(f"{batched['vectors']} vectors backpropagated to every layer output: loop "
          f"{batched['loop']:.2f} s, is_grads_batched {batched['batched']:.2f} s")
    print(f"threads={out['threads']}  load average before/after {load[0]:.2f}/"
          f"{out['loadavg_after'][0]:.2f}  wall {out['wall_s']:.0f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
