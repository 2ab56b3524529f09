"""Time to a target held-out loss, K-FAC vs tuned AdamW: ``python benchmarks/time_to_target.py``.

Workloads (``--workloads``):

- ``gpt2_lm``: the demo's GPT-2 LM (``make_task("lm")``: 2 blocks, width 128, byte
  vocabulary 257, ``pydoc_data.topics`` text, batch 32 x 64 tokens).
- ``llama_lm``: a LLaMA-architecture LM (``transformers.LlamaConfig``: RMSNorm, SwiGLU,
  rotary positions, grouped-query attention with 2 key/value heads for 4 query heads,
  hidden 64, 2 layers, intermediate 172, untied head) on the same text, bytes and batches.
- ``digits_cnn``: the demo's digits CNN (``make_task("digits", model="cnn")``).
- ``digits_ae``: the deep autoencoder 64-256-128-32-128-256-64 of Martens & Grosse (2015)
  on the digits' pixels scaled to [0, 1] (tanh hidden units, linear 32-unit code, binary
  cross-entropy on the logits, summed over the 64 pixels, mean over images), on the demo's
  held-out split.

Protocol, per workload, every run through the demo's ``train_one`` (same init and data
order for a seed, linear warm-up over 5% of the steps then cosine to 10% of the peak):

1. AdamW at each ``--adamw-lrs`` on seed 0; the lowest final held-out loss wins, and is
   rerun on the other ``--seeds``.
2. K-FAC at its defaults with AdamW's best lr and weight decay,
   ``KFAC(model, lr=best, weight_decay=wd)`` (``--bases defaults``, the default), and
   optionally ``KFAC(model, lr=best, weight_decay=wd, base=B)`` for other bases ``B``, on
   every seed. ``--tune-kfac`` adds, per base, a grid over lr x damping on seed 0 whose best
   point is rerun on every seed (off by default).
3. Target: AdamW's mean final held-out loss over seeds. A run reaches it at the first
   held-out evaluation (every ``--eval-every`` steps) at or below it, with the step and
   the training seconds interpolated linearly from the evaluation before. AdamW is the
   reference: its ratios are 1 by definition (it reaches its own mean at the end of the
   run), so a ratio is ``steps to target / steps`` and ``train seconds to target / AdamW's
   mean train seconds``, averaged over the seeds that reach it ("k/n" says how many).
4. Per-step time against AdamW, interleaved in one process: one model and optimizer per
   configuration (seed 0), a short warm-up, then ``--time-rounds`` rounds in which each
   configuration runs ``--time-steps`` steps (default 100, K-FAC's default inverse period,
   so factor and inverse updates are amortized as in training); the ratio is taken per
   round, median over rounds. The training seconds of step 3 come from the sequential
   runs and so feel the machine's load at their own time; this ratio does not.

Prints one table and writes JSON (``--out``) with every run's held-out curve, the load
average at start and end, and the settings. One thread by default (``--threads``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kfac_optim import KFACCoverageWarning
from kfac_optim.demo import make_task, train_one
from kfac_optim.demo.data import digits_batches, load_digits_data
from kfac_optim.demo.tasks import Task, _evaluate_with
from kfac_optim.demo.training import reach, time_interleaved

# Per workload: steps, evaluation period, AdamW weight decay (the demo's tuned value for
# its tasks) and the AdamW learning-rate grid.
WORKLOADS: dict[str, dict[str, Any]] = {
    "gpt2_lm": dict(steps=400, eval_every=25, weight_decay=0.0,
                    adamw_lrs=(5e-4, 1e-3, 2e-3, 4e-3)),
    "llama_lm": dict(steps=400, eval_every=25, weight_decay=0.0,
                     adamw_lrs=(1e-3, 2e-3, 4e-3, 8e-3)),
    "digits_cnn": dict(steps=500, eval_every=25, weight_decay=0.1,
                       adamw_lrs=(3e-4, 1e-3, 3e-3, 1e-2)),
    "digits_ae": dict(steps=1000, eval_every=25, weight_decay=0.0,
                      adamw_lrs=(3e-4, 1e-3, 3e-3, 1e-2)),
}
QUICK = dict(steps={"gpt2_lm": 30, "llama_lm": 30, "digits_cnn": 60, "digits_ae": 60},
             eval_every=10, seeds=[0], n_lrs=2, time_steps=5, time_rounds=1, eval_chunks=32)
TUNE_LR_MULTS = (0.3, 1.0, 3.0)   # x AdamW's best lr, for the Adam-family bases
TUNE_SGD_LRS = (0.1, 0.3, 1.0)    # base="sgd" steps are not Adam-scaled: absolute lrs
TUNE_DAMPINGS = (1e-3, 1e-2, 1e-1)


# Workloads ---------------------------------------------------------------------
def build_llama_model(seq_len: int, vocab_size: int, eos_id: int, hidden: int = 64,
                      layers: int = 2, heads: int = 4, kv_heads: int = 2,
                      intermediate: int = 172) -> nn.Module:
    """A small ``LlamaForCausalLM`` (GQA, SwiGLU, RMSNorm) over the demo's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=seq_len,
                         bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=None,
                         tie_word_embeddings=False, attention_dropout=0.0)
    model = LlamaForCausalLM(config)
    model.loss_type = "ForCausalLM"
    return model


class DeepAutoencoder(nn.Sequential):
    """64-256-128-32-128-256-64, tanh hidden units, linear code layer, logits out."""

    def __init__(self, sizes: tuple[int, ...] = (64, 256, 128, 32, 128, 256, 64)):
        code = sizes.index(min(sizes))
        mods: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
            mods.append(nn.Linear(a, b))
            if i + 1 not in (code, len(sizes) - 1):
                mods.append(nn.Tanh())
        super().__init__(*mods)


def _ae_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Binary cross-entropy summed over pixels, mean over images (nats per image)."""
    return F.binary_cross_entropy_with_logits(model(batch[0]), batch[1],
                                              reduction="sum") / len(batch[0])


def _ae_task(batch_size: int = 64) -> Task:
    d = load_digits_data(seed=0, scale="unit")

    def evaluate(model: nn.Module) -> dict[str, float]:
        return _evaluate_with(model, lambda: {
            "val_loss": float(_ae_loss(model, (d.x_val, d.x_val))),
            "train_loss": float(_ae_loss(model, (d.x_train, d.x_train)))})

    return Task(name="digits_ae", config=dict(sizes=[64, 256, 128, 32, 128, 256, 64],
                                             activation="tanh", loss="bce_sum_over_pixels",
                                             batch_size=batch_size, train_size=len(d.x_train),
                                             val_size=len(d.x_val)),
                build_model=DeepAutoencoder,
                batches=lambda seed: digits_batches(d.x_train, d.x_train, batch_size, seed),
                loss=_ae_loss, evaluate=evaluate, save_model=lambda model, path: None)


def make_workload(name: str, quick: bool = False) -> Task:
    """The ``Task`` of a workload (demo tasks reused; the LLaMA LM swaps the model only)."""
    lm_cfg = dict(eval_chunks=QUICK["eval_chunks"]) if quick else {}
    if name == "gpt2_lm":
        return dataclasses.replace(make_task("lm", **lm_cfg), name=name)
    if name == "llama_lm":
        task = make_task("lm", **lm_cfg)
        cfg = task.config
        return dataclasses.replace(
            task, name=name, config=dict(cfg, model="llama", hidden=64, layers=2, heads=4,
                                         kv_heads=2, intermediate=172),
            build_model=lambda: build_llama_model(cfg["seq_len"], cfg["vocab_size"], 256))
    if name == "digits_cnn":
        task = make_task("digits", model="cnn")
        return dataclasses.replace(task, name=name)
    if name == "digits_ae":
        return _ae_task()
    raise ValueError(f"workload={name!r}; accepted: {tuple(WORKLOADS)}")


# Runs --------------------------------------------------------------------------
def _run(task: Task, opt: str, hp: dict[str, Any], seed: int, steps: int,
         eval_every: int) -> dict[str, Any]:
    res = train_one(task, opt, hp, steps=steps, seed=seed, eval_every=eval_every,
                    warmup=max(1, round(0.05 * steps)), progress=False)
    keep = ("final_val_loss", "final_train_loss", "wall_s", "ms_per_step", "steps",
            "diverged", "best_val_loss", "hparams", "val_curve", "kfac_skipped_steps",
            "final_val_acc")
    out = {k: res[k] for k in keep if k in res}
    out["seed"] = seed
    print(f"  {task.name} {opt} {_short(hp)} seed {seed}: val {res['final_val_loss']:.4f} "
          f"({res['wall_s']:.1f} s)", file=sys.stderr)
    return out


def _short(hp: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in hp.items())


def _final(run: dict[str, Any]) -> float:
    v = run["final_val_loss"]
    return v if math.isfinite(v) and not run["diverged"] else math.inf


def bench_workload(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The whole protocol on one workload; returns its JSON record."""
    spec = WORKLOADS[name]
    task = make_workload(name, args.quick)
    steps = args.steps or (QUICK["steps"][name] if args.quick else spec["steps"])
    eval_every = args.eval_every or (QUICK["eval_every"] if args.quick else spec["eval_every"])
    wd = spec["weight_decay"] if args.weight_decay is None else args.weight_decay
    lrs = args.adamw_lrs or list(spec["adamw_lrs"])[: QUICK["n_lrs"] if args.quick else None]
    seeds = args.seeds
    rec: dict[str, Any] = dict(task_config=task.config, steps=steps, eval_every=eval_every,
                               weight_decay=wd, seeds=seeds, adamw_lrs=lrs, tuning={},
                               optimizers={})

    # 1. AdamW grid on the first seed, best lr on every seed.
    grid = {lr: _run(task, "adamw", dict(lr=lr, weight_decay=wd), seeds[0], steps, eval_every)
            for lr in lrs}
    rec["tuning"]["adamw"] = [dict(lr=lr, final_val_loss=r["final_val_loss"])
                              for lr, r in grid.items()]
    best_lr = min(grid, key=lambda lr: _final(grid[lr]))
    best_hp = dict(lr=best_lr, weight_decay=wd)
    rec["best_adamw_lr"] = best_lr
    runs: dict[str, list[dict[str, Any]]] = {"adamw": [grid[best_lr]] + [
        _run(task, "adamw", best_hp, s, steps, eval_every) for s in seeds[1:]]}
    configs: dict[str, tuple[str, dict[str, Any]]] = {"adamw": ("adamw", best_hp)}

    # 2. K-FAC at its defaults, with AdamW's lr and weight decay; optionally tuned.
    for base in args.bases:  # "defaults": KFAC(model, lr=best, weight_decay=wd), nothing else
        hp = dict(lr=best_lr, weight_decay=wd, **({} if base == "defaults" else dict(base=base)))
        label = "kfac" if base == "defaults" else f"kfac-{base}"
        configs[label] = ("kfac", hp)
        runs[label] = [_run(task, "kfac", hp, s, steps, eval_every) for s in seeds]
        if args.tune_kfac:
            lrs_k = (TUNE_SGD_LRS if base == "sgd" else [m * best_lr for m in TUNE_LR_MULTS])
            tgrid = {(lr, d): _run(task, "kfac", dict(hp, lr=lr, damping=d), seeds[0], steps,
                                   eval_every) for lr in lrs_k for d in TUNE_DAMPINGS}
            rec["tuning"][label] = [dict(lr=lr, damping=d, final_val_loss=r["final_val_loss"])
                                    for (lr, d), r in tgrid.items()]
            lr, d = min(tgrid, key=lambda k: _final(tgrid[k]))
            thp = dict(hp, lr=lr, damping=d)
            runs[f"{label} tuned"] = [tgrid[(lr, d)]] + [
                _run(task, "kfac", thp, s, steps, eval_every) for s in seeds[1:]]

    # 3. Target and ratios.
    adamw_finals = [r["final_val_loss"] for r in runs["adamw"]]
    target = statistics.fmean(adamw_finals)
    adamw_secs = statistics.fmean(r["wall_s"] for r in runs["adamw"])
    rec["target_val_loss"] = target
    for label, rs in runs.items():
        finals = [r["final_val_loss"] for r in rs]
        hits = [reach(r["val_curve"], target) for r in rs]
        got = [h for h in hits if h is not None]
        rec["optimizers"][label] = dict(
            hparams=rs[0]["hparams"], final_val_mean=statistics.fmean(finals),
            final_val_sd=statistics.stdev(finals) if len(finals) > 1 else 0.0,
            reached=len(got), n=len(rs),
            steps_to_target=[h and h[0] for h in hits],
            seconds_to_target=[h and h[1] for h in hits],
            steps_ratio=1.0 if label == "adamw" else (
                statistics.fmean(h[0] for h in got) / steps if got else None),
            seconds_ratio=1.0 if label == "adamw" else (
                statistics.fmean(h[1] for h in got) / adamw_secs if got else None),
            ms_per_step_sequential=statistics.fmean(r["ms_per_step"] for r in rs),
            runs=rs)

    # 4. Per-step time, interleaved.
    rec["step_time"] = time_interleaved(task, configs, steps=args.time_steps or (
        QUICK["time_steps"] if args.quick else 100), rounds=args.time_rounds or (
        QUICK["time_rounds"] if args.quick else 2))
    return rec


# Output ------------------------------------------------------------------------
def _ratio(value: float | None, reached: int, n: int, ref: bool) -> str:
    if ref:
        return "1 (ref)"
    if value is None:
        return "not reached"
    return f"{value:.2f}" + ("" if reached == n else f" ({reached}/{n})")


def format_table(results: dict[str, Any]) -> str:
    """Markdown table: one row per workload and optimizer."""
    lines = ["| workload | optimizer | lr | final val loss (mean +- sd, n) | steps to target "
             "x AdamW | train s to target x AdamW | step time x AdamW |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for wname, rec in results["workloads"].items():
        for label, o in rec["optimizers"].items():
            st = rec["step_time"].get(label)
            lines.append(
                f"| {wname} | {label} | {o['hparams']['lr']:.3g} | {o['final_val_mean']:.4f} "
                f"+- {o['final_val_sd']:.4f} ({o['n']}) | "
                f"{_ratio(o['steps_ratio'], o['reached'], o['n'], label == 'adamw')} | "
                f"{_ratio(o['seconds_ratio'], o['reached'], o['n'], label == 'adamw')} | "
                f"{'-' if st is None else format(st['ratio_to_adamw'], '.2f')} |")
    return "\n".join(lines)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma list of {','.join(WORKLOADS)}")
    p.add_argument("--steps", type=int, help="steps per run (default: 400 for the LMs, 500 "
                   "digits_cnn, 1000 digits_ae)")
    p.add_argument("--eval-every", type=int, help="held-out evaluation period (default 25)")
    p.add_argument("--seeds", help="comma list; the first tunes AdamW (default 0,1,2; "
                   "--quick: 0)")
    p.add_argument("--adamw-lrs", help="comma list (default: 4 per workload, WORKLOADS)")
    p.add_argument("--weight-decay", type=float,
                   help="AdamW's and K-FAC's (default: 0 for the LMs and the autoencoder, "
                   "0.1 for the CNN, the demo's tuned AdamW value)")
    p.add_argument("--bases", default="defaults",
                   help="K-FAC runs: 'defaults' (every option at its default) and/or base "
                        "updates sgd, adamw, grafting (everything else default)")
    p.add_argument("--tune-kfac", action="store_true",
                   help="also tune K-FAC per base over lr x damping on the first seed")
    p.add_argument("--time-steps", type=int, help="steps per interleaved timing block (100)")
    p.add_argument("--time-rounds", type=int, help="interleaved timing rounds (2)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1)")
    p.add_argument("--quick", action="store_true",
                   help="tiny end-to-end check: few steps, 1 seed, 2 lrs")
    p.add_argument("--out", help="JSON path (default benchmarks/results/time_to_target.json, "
                   "time_to_target_quick.json with --quick)")
    args = p.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not args.workloads or any(w not in WORKLOADS for w in args.workloads):
        p.error(f"--workloads {args.workloads}; accepted: {tuple(WORKLOADS)}")
    args.bases = [b.strip() for b in args.bases.split(",") if b.strip()]
    if any(b not in ("defaults", "sgd", "adamw", "grafting") for b in args.bases):
        p.error(f"--bases {args.bases}; accepted: defaults, sgd, adamw, grafting")
    args.seeds = ([int(s) for s in args.seeds.split(",") if s.strip()] if args.seeds
                  else QUICK["seeds"] if args.quick else [0, 1, 2])
    args.adamw_lrs = _floats(args.adamw_lrs) if args.adamw_lrs else None
    if not args.seeds:
        p.error("--seeds: at least one")
    args.out = args.out or ("benchmarks/results/time_to_target"
                            f"{'_quick' if args.quick else ''}.json")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, write the JSON; returns the results."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=KFACCoverageWarning)
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "command": "python benchmarks/time_to_target.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "loadavg_start": os.getloadavg(), "workloads": {},
    }
    for name in args.workloads:
        results["workloads"][name] = bench_workload(name, args)
        print(f"{name} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    results["loadavg_end"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - t0
    results["table"] = format_table(results)
    print(results["table"])
    start, end = results["loadavg_start"][0], results["loadavg_end"][0]
    print(f"threads={results['threads']}  load average start/end {start:.2f}/{end:.2f}  "
          f"wall {results['wall_s']:.0f} s  -> {args.out}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
