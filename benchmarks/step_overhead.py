"""Step-time overhead of K-FAC relative to SGD and AdamW: ``python benchmarks/step_overhead.py``.

For each model (the digits MLP 64-256-256-10 at batch 64, and the demo's GPT-2 LM
at its default size and batch) this times a full training step (zero_grad,
forward, backward, optimizer step) for SGD-momentum, AdamW and K-FAC at
``(factor_update_steps, inv_update_steps)`` = (1, 1), (1, 10), (10, 100), all in
one process, and reports each as a ratio to SGD's step time.

Method: every configuration gets a fresh model and optimizer and a warm-up of one
full update period (at least 5 steps), excluded from timing. Then ``--repeats``
rounds; in each round every configuration runs a block of steps whose length is a
multiple of its inverse-update period (so every block holds the same number of
factor and inverse updates: the amortized cost), and the block's mean ms/step is
one sample. Rounds interleave the configurations so that a slow spell on a shared
machine hits all of them; the reported time is the median over rounds, and the
ratio is taken per round before the median (to SGD and to AdamW). Results go to
``--out`` as JSON (with the load average, since a busy machine inflates every number).

``--variants 'name:option=value,...;...'`` adds, for every schedule, K-FAC runs with
those options on top of the demo's (e.g. ``rows512:factor_row_limit=512``), timed in
the same interleaved rounds. ``--profile`` then runs ``torch.profiler`` (CPU) over one
inverse period of every configuration and stores the top operators by self time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kfac_optim.demo import (
    TASK_DEFAULTS,
    build_digits_model,
    build_lm_model,
    default_hparams,
    make_optimizer,
)
from kfac_optim.demo.data import digits_batches, lm_batches, load_digits_data, load_lm_data

SCHEDULES = ((1, 1), (1, 10), (10, 100))


def _configs(schedules=SCHEDULES, variants: dict[str, dict[str, Any]] | None = None,
             baselines=("sgd", "adamw")) -> list[tuple[str, str, dict[str, Any]]]:
    """``(label, optimizer, hyperparameter overrides)`` for every timed configuration."""
    out: list[tuple[str, str, dict[str, Any]]] = [(b, b, {}) for b in baselines]
    for f, i in schedules:
        for vname, extra in {"": {}, **(variants or {})}.items():
            label = f"kfac({f},{i})" + (f" {vname}" if vname else "")
            out.append((label, "kfac", {"factor_update_steps": f, "inv_update_steps": i,
                                        **extra}))
    return out


def parse_variants(text: str) -> dict[str, dict[str, Any]]:
    """``'name:opt=value,opt=value;name2:...'`` -> ``{name: {opt: value}}`` (values are
    Python literals, e.g. ``512``, ``None``, ``True``).

    Raises:
        ValueError: a malformed entry (naming it).
    """
    import ast

    out: dict[str, dict[str, Any]] = {}
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        name, sep, body = entry.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"--variants entry {entry!r}: expected 'name:option=value,...'")
        opts = {}
        for pair in filter(None, (x.strip() for x in body.split(","))):
            key, eq, value = pair.partition("=")
            if not eq:
                raise ValueError(f"--variants entry {entry!r}: {pair!r} is not option=value")
            opts[key.strip()] = ast.literal_eval(value.strip())
        out[name.strip()] = opts
    return out


def _lm_setup(seed: int):
    cfg = TASK_DEFAULTS["lm"]
    tokens = load_lm_data().train
    batches = lm_batches(tokens, cfg["batch_size"], cfg["seq_len"], seed)

    def build():
        return build_lm_model(cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["seq_len"])

    def loss(model, batch):
        return model(input_ids=batch, labels=batch).loss

    desc = (f"GPT-2 LM {cfg['n_layer']}x{cfg['n_embd']} (heads {cfg['n_head']}), batch "
            f"{cfg['batch_size']}x{cfg['seq_len']} tokens")
    return "lm", desc, build, batches, loss


def _mlp_setup(seed: int):
    d = load_digits_data(seed=seed)
    batches = digits_batches(d.x_train, d.y_train, 64, seed)

    def build():
        return build_digits_model("mlp", 256)

    def loss(model, batch):
        return F.cross_entropy(model(batch[0]), batch[1])

    return "digits", "digits MLP 64-256-256-10, batch 64", build, batches, loss


def _block_len(label: str, hp: dict[str, Any], base: int) -> int:
    period = hp.get("inv_update_steps", 1)
    return max(period, math.ceil(base / period) * period)


def bench_model(setup, *, repeats: int, base_steps: int, seed: int,
                schedules=SCHEDULES, variants: dict[str, dict[str, Any]] | None = None,
                profile: bool = False, chunk: int = 0,
                baselines=("sgd", "adamw")) -> dict[str, Any]:
    """Time every configuration on one model; returns per-configuration samples and ratios
    (and, with ``profile``, each configuration's top operators by self CPU time)."""
    task, desc, build, batches, loss_fn = setup
    runs = []
    for label, name, overrides in _configs(schedules, variants, baselines):
        torch.manual_seed(seed)
        model = build()
        model.train()
        hp = default_hparams(task, name)
        hp.update(overrides)
        opt = make_optimizer(name, model, hp)
        runs.append({"label": label, "model": model, "opt": opt, "hp": hp,
                     "block": _block_len(label, hp, base_steps), "samples": []})

    def run_steps(r: dict, n: int) -> float:
        model, opt = r["model"], r["opt"]
        t0 = time.perf_counter()
        for _ in range(n):
            batch = next(batches)
            opt.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            opt.step()
        return (time.perf_counter() - t0) / n

    for r in runs:  # warm-up: one full update period, not timed
        run_steps(r, max(5, r["hp"].get("inv_update_steps", 1)))
    if chunk:  # every block the same length, run in interleaved chunks of `chunk` steps
        length = math.lcm(*(r["block"] for r in runs))
        if length % chunk:
            raise ValueError(f"--chunk {chunk} must divide the common block, {length} steps")
        for r in runs:
            r["block"] = length
    for _ in range(repeats):
        if not chunk:
            for r in runs:
                r["samples"].append(1000.0 * run_steps(r, r["block"]))
            continue
        total = {id(r): 0.0 for r in runs}
        for _ in range(length // chunk):
            for r in runs:
                total[id(r)] += run_steps(r, chunk) * chunk
        for r in runs:
            r["samples"].append(1000.0 * total[id(r)] / length)

    by_label = {r["label"]: r["samples"] for r in runs}
    out = {"model": desc, "configs": {}}
    for r in runs:
        ratios = {f"ratio_to_{b}": statistics.median(
            [s / t for s, t in zip(r["samples"], by_label[b], strict=True)]) for b in baselines}
        out["configs"][r["label"]] = {
            "ms_per_step": statistics.median(r["samples"]),
            **ratios,
            "samples_ms": r["samples"],
            "block_steps": r["block"],
            "hparams": {k: v for k, v in r["hp"].items() if not isinstance(v, tuple)},
        }
        if profile:
            out["configs"][r["label"]]["profile"] = _profile(run_steps, r)
        if hasattr(r["opt"], "preconditioner"):
            r["opt"].preconditioner.remove()
    return out


def _profile(run_steps, r: dict[str, Any], top: int = 12) -> list[dict[str, Any]]:
    """``torch.profiler`` (CPU) over one inverse period of ``r``: the ``top`` operators by
    self CPU time, ``{"op", "calls", "self_ms_per_step"}``."""
    from torch.profiler import ProfilerActivity, profile

    n = max(5, r["hp"].get("inv_update_steps", 1))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_steps(r, n)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "calls": e.count, "self_ms_per_step": e.self_cpu_time_total / 1e3 / n}
            for e in events[:top]]


def format_table(results: dict[str, Any]) -> str:
    """Markdown table: one row per configuration, ms/step and ratios to SGD and AdamW per
    model."""
    models = list(results["models"])
    labels = list(results["models"][models[0]]["configs"])
    bases = [b for b in ("sgd", "adamw") if b in results["models"][models[0]]["configs"]]
    names = {"sgd": "SGD", "adamw": "AdamW"}
    head = "| optimizer | " + " | ".join(
        " | ".join([f"{m} ms/step"] + [f"{m} x {names[b]}" for b in bases])
        for m in models) + " |"
    sep = "|---|" + ("---:|" * (1 + len(bases))) * len(models)
    lines = [head, sep]
    for label in labels:
        cells = []
        for m in models:
            c = results["models"][m]["configs"][label]
            cells += [f"{c['ms_per_step']:.1f}"] + [f"{c[f'ratio_to_{b}']:.2f}" for b in bases]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, write the JSON; returns the results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/step_overhead.json")
    p.add_argument("--models", default="digits,lm", help="comma list of digits,lm")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per configuration")
    p.add_argument("--steps", type=int, default=30,
                   help="minimum steps per timed block (rounded up to the inverse period)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--schedules", default="1,1:1,10:10,100",
                   help="K-FAC (factor_update_steps,inv_update_steps) pairs, colon-separated")
    p.add_argument("--variants", default="",
                   help="extra K-FAC option sets per schedule: 'name:opt=value,...;name2:...'")
    p.add_argument("--chunk", type=int, default=0,
                   help="run every configuration for the same number of steps per round, "
                        "interleaved in chunks of this many steps (0: one block each)")
    p.add_argument("--baselines", default="sgd,adamw",
                   help="comma list of the baselines timed: sgd, adamw (AdamW is required)")
    p.add_argument("--profile", action="store_true",
                   help="also torch.profiler one inverse period of every configuration")
    args = p.parse_args(argv)
    baselines = tuple(b.strip() for b in args.baselines.split(",") if b.strip())
    if "adamw" not in baselines or not set(baselines) <= {"sgd", "adamw"}:
        p.error(f"--baselines {args.baselines!r}: accepted: sgd,adamw or adamw")
    try:
        variants = parse_variants(args.variants)
    except (ValueError, SyntaxError) as err:
        p.error(str(err))
    try:
        schedules = [tuple(int(x) for x in pair.split(",")) for pair in args.schedules.split(":")]
        if any(len(pair) != 2 or min(pair) < 1 for pair in schedules):
            raise ValueError
    except ValueError:
        p.error(f"--schedules {args.schedules!r}: expected pairs like 1,10:10,100")
    if args.threads:
        torch.set_num_threads(args.threads)
    setups = {"digits": _mlp_setup, "lm": _lm_setup}
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    if not names or any(m not in setups for m in names):
        p.error(f"--models {args.models!r}; accepted: comma list of {tuple(setups)}")

    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "command": "python benchmarks/step_overhead.py " + " ".join(argv or sys.argv[1:]),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "loadavg_before": os.getloadavg(), "repeats": args.repeats, "chunk": args.chunk,
        "models": {},
    }
    for name in names:
        results["models"][name] = bench_model(setups[name](args.seed), repeats=args.repeats,
                                              base_steps=args.steps, seed=args.seed,
                                              schedules=schedules, variants=variants,
                                              profile=args.profile, chunk=args.chunk,
                                              baselines=baselines)
        print(f"{name}: {results['models'][name]['model']} done "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    results["loadavg_after"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - t0
    table = format_table(results)
    results["table"] = table
    print(table)
    print(f"threads={results['threads']}  load average before/after "
          f"{results['loadavg_before'][0]:.2f}/{results['loadavg_after'][0]:.2f}  "
          f"wall {results['wall_s']:.0f} s")
    for name, res in results["models"].items():
        for label, c in res["configs"].items():
            for sched, bound in (("kfac(1,10)", 1.4), ("kfac(10,100)", 1.1)):
                if label == sched or label.startswith(sched + " "):
                    ratio = c["ratio_to_adamw"]
                    verdict = "met" if ratio <= bound else "NOT met"
                    print(f"target {label} <= {bound}x AdamW on {name}: {ratio:.2f}x ({verdict})")
        if args.profile:
            for label, c in res["configs"].items():
                print(f"\n{name} {label}: top operators, self ms/step")
                for row in c["profile"]:
                    print(f"  {row['self_ms_per_step']:8.2f}  {row['calls']:6d}  {row['op']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
