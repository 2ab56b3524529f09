"""Step time of ``fisher_type`` "mc" and "type2" against "empirical":
``python benchmarks/fisher_type.py``.

On the demo's GPT-2 LM (2 x 128, byte vocabulary C = 257, batch 32 x 64 tokens; K-FAC at
the demo's tuned hyperparameters) the extra cost of a Fisher type is paid at factor-update
steps only, so each type is timed on both kinds of step, in one process: a K-FAC optimizer
per type (fresh model, ``factor_update_steps=2``, inverses only at the first step, which
is warm-up with the next one); then ``--repeats`` rounds, each timing, for every type in
turn, one factor-update step and one plain step (zero_grad, forward, backward, step).
Medians over rounds give ``t_update`` and ``t_plain``; the step time at
``factor_update_steps`` f is then ``t_plain + (t_update - t_plain) / f`` (inverse updates
cost the same for every type and are left out), reported for f = 1 and 10 as a ratio to
"empirical" at the same f. "mc" adds one backward to the layer outputs per factor update;
"type2" adds C = 257 (one at a time, ``kfac_optim.fisher.backward_to_outputs``; the script
also times that loop against one ``is_grads_batched`` call). JSON to ``--out``.
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
from step_overhead import _lm_setup  # noqa: E402

from kfac_optim.demo import default_hparams, make_optimizer  # noqa: E402
from kfac_optim.fisher import FISHER_TYPES  # noqa: E402


def loop_vs_batched(setup, seed: int, vectors: int = 8) -> dict[str, float]:
    """Seconds to backpropagate ``vectors`` random logits vectors to every layer output of
    the demo LM, one ``torch.autograd.grad`` each vs one ``is_grads_batched`` call (the
    choice in ``kfac_optim.fisher.backward_to_outputs``)."""
    _, _, build, batches, _ = setup
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
    p.add_argument("--repeats", type=int, default=2, help="timed rounds")
    p.add_argument("--types", default=",".join(FISHER_TYPES))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    types = args.types.split(",")
    if types[0] != "empirical" or any(t not in FISHER_TYPES for t in types):
        p.error(f"--types {args.types!r}: 'empirical' first, then any of {FISHER_TYPES}")
    t0, load = time.perf_counter(), os.getloadavg()
    setup = _lm_setup(args.seed)
    _, desc, build, batches, loss_fn = setup
    runs = {}
    for t in types:
        torch.manual_seed(args.seed)
        model = build().train()
        hp = default_hparams("lm", "kfac")
        hp.update(factor_update_steps=2, inv_update_steps=10**6, fisher_type=t, fisher_seed=0)
        runs[t] = {"model": model, "opt": make_optimizer("kfac", model, hp),
                   "update": [], "plain": []}

    def step(r: dict) -> float:
        start = time.perf_counter()
        r["opt"].zero_grad(set_to_none=True)
        loss_fn(r["model"], next(batches)).backward()
        r["opt"].step()
        return time.perf_counter() - start

    for r in runs.values():  # warm-up: the first update (with the inverses) and a plain step
        step(r)
        step(r)
    for _ in range(args.repeats):
        for r in runs.values():
            r["update"].append(step(r))
            r["plain"].append(step(r))
    batched = loop_vs_batched(setup, args.seed)
    rows = {}
    for t, r in runs.items():
        rows[t] = {"update_s": statistics.median(r["update"]),
                   "plain_s": statistics.median(r["plain"]),
                   "update_samples_s": r["update"], "plain_samples_s": r["plain"]}
        rows[t]["extra_per_update_s"] = rows[t]["update_s"] - rows[t]["plain_s"]
        r["opt"].preconditioner.remove()
    lines = ["| fisher_type | factor-update step s | plain step s | f=1 x empirical | "
             "f=10 x empirical |", "|---|---:|---:|---:|---:|"]
    base = rows["empirical"]
    for t, row in rows.items():
        for f in (1, 10):
            per = row["plain_s"] + row["extra_per_update_s"] / f
            ref = base["plain_s"] + base["extra_per_update_s"] / f
            row[f"step_s_f{f}"], row[f"ratio_to_empirical_f{f}"] = per, per / ref
        lines.append(f"| {t} | {row['update_s']:.2f} | {row['plain_s']:.2f} | "
                     f"{row['ratio_to_empirical_f1']:.2f} | {row['ratio_to_empirical_f10']:.2f} |")
    table = "\n".join(lines)
    out = {"command": "python benchmarks/fisher_type.py " + " ".join(argv or sys.argv[1:]),
           "model": desc, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "loadavg_before": load,
           "loadavg_after": os.getloadavg(), "repeats": args.repeats,
           "loop_vs_batched_s": batched, "wall_s": time.perf_counter() - t0, "types": rows,
           "table": table}
    print(table)
    print(f"{batched['vectors']} vectors to every layer output: loop {batched['loop']:.2f} s, "
          f"is_grads_batched {batched['batched']:.2f} s")
    print(f"threads={out['threads']}  load average before/after {load[0]:.2f}/"
          f"{out['loadavg_after'][0]:.2f}  wall {out['wall_s']:.0f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
