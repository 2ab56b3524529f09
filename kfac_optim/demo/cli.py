"""The demo's command line (``python -m kfac_optim.demo``): plot, table, results files."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .._extras import require
from . import data as demo_data
from .tasks import OPTIMIZERS, TASKS, default_hparams, make_task
from .training import (
    RATIO_SPREAD_LIMIT,
    time_interleaved,
    timing_reliability,
    train_one,
    val_loss_at_step,
)

__all__ = ["format_table", "main", "parse_args", "plot_losses"]


# Reporting ---------------------------------------------------------------------
def _ema(values: Sequence[float], decay: float = 0.95) -> list[float]:
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg = decay * avg + (1 - decay) * v
        weight = decay * weight + (1 - decay)
        out.append(avg / weight)
    return out


def plot_losses(results: dict[str, Any], path: Path) -> None:
    """Loss curves: train (EMA-smoothed) and held-out vs step, held-out vs training time.

    Training time is steps x the interleaved median ms/step (``results["step_time"]``) when
    measured, else the run's own sequential clock."""
    matplotlib = require("matplotlib", "demo", "kfac_optim.demo.plot_losses")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "demo", "kfac_optim.demo.plot_losses")

    fig, (ax_step, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (name, run) in enumerate(results["runs"].items()):
        color = f"C{i}"
        train = run["train_loss_curve"]
        ax_step.plot(range(1, len(train) + 1), _ema(train), color=color, alpha=0.45, lw=1,
                     label=f"{name} train (EMA)")
        steps_, times, vals = zip(*run["val_curve"], strict=True)
        timing = (results.get("step_time") or {}).get(name)
        if timing:
            times = [st * timing["ms_per_step"] / 1000.0 for st in steps_]
        ax_step.plot(steps_, vals, "o-", color=color, ms=3, label=f"{name} held-out")
        ax_time.plot(times, vals, "o-", color=color, ms=3, label=name)
    ax_step.set(xlabel="step", ylabel="loss", title=f"{results['task']}: loss vs step")
    interleaved = bool(results.get("step_time"))
    ax_time.set(xlabel="training time (s): steps x interleaved ms/step" if interleaved
                else "training wall time (s, sequential run)", ylabel="held-out loss",
                title="held-out loss vs wall time")
    for ax in (ax_step, ax_time):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    # Log scale, capped at the initial held-out loss: a diverged run stays readable.
    finite = [v for run in results["runs"].values() for _, _, v in run["val_curve"]
              if math.isfinite(v)]
    initial = [run["val_curve"][0][2] for run in results["runs"].values()]
    if finite and all(math.isfinite(v) for v in initial):
        for ax in (ax_step, ax_time):
            ax.set_yscale("log")
            ax.set_ylim(bottom=min(finite) * 0.95, top=max(initial) * 1.1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(results: dict[str, Any]) -> str:
    """The printed summary table (one row per optimizer). ``wall s`` and ``ms/step`` are the
    sequential training runs' own clocks; ``step x REF`` is the interleaved ratio."""
    with_acc = any("final_val_acc" in r for r in results["runs"].values())
    with_bpb = any("final_val_bpb" in r for r in results["runs"].values())
    head = ["optimizer", "train loss", "val loss"]
    if with_bpb:
        head += ["val bpb"]
    if with_acc:
        head += ["train acc", "val acc"]
    head += ["wall s", "ms/step"]
    timing = results.get("step_time") or {}
    ref = results.get("step_time_reference")
    if timing:
        head += [f"step x {ref}"]
    rows = [head]
    for name, r in results["runs"].items():
        row = [name, f"{r['final_train_loss']:.4f}", f"{r['final_val_loss']:.4f}"]
        if with_bpb:
            row += [f"{r['final_val_bpb']:.4f}"]
        if with_acc:
            row += [f"{r['final_train_acc']:.4f}", f"{r['final_val_acc']:.4f}"]
        row += [f"{r['wall_s']:.1f}", f"{r['ms_per_step']:.1f}"]
        if timing:
            row += [f"{timing[name][f'ratio_to_{ref}']:.2f}" if name in timing else "-"]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _ref_name(runs: dict[str, Any]) -> str:
    return "adamw" if "adamw" in runs else next(iter(runs))


def _comparison(results: dict[str, Any]) -> str | None:
    """Equal-steps and equal-time lines, K-FAC against AdamW; equal time comes from the
    interleaved step-time ratio (``results["step_time"]``), not from the sequential runs'
    wall clocks."""
    runs = results["runs"]
    if "kfac" not in runs or "adamw" not in runs:
        return None
    k, a = runs["kfac"], runs["adamw"]
    steps = min(k["steps"], a["steps"])
    lower = "K-FAC" if k["final_val_loss"] < a["final_val_loss"] else "AdamW"
    lines = [f"equal steps ({steps}): K-FAC val loss {k['final_val_loss']:.4f} vs AdamW "
             f"{a['final_val_loss']:.4f} ({lower} lower)"]
    timing = results.get("step_time")
    if timing and "kfac" in timing:
        ratio = timing["kfac"]["ratio_to_adamw"]
        k_steps, a_steps = (steps / ratio, steps) if ratio >= 1 else (steps, steps * ratio)
        kv, av = val_loss_at_step(k["val_curve"], k_steps), val_loss_at_step(a["val_curve"],
                                                                             a_steps)
        if kv is not None and av is not None:
            word = "" if results["timing_reliable"] else "UNRELIABLE: "
            lower = "K-FAC" if kv < av else "AdamW"
            lines.append(
                f"{word}equal wall time (K-FAC step = {ratio:.2f} x AdamW step, interleaved): "
                f"K-FAC at step {k_steps:.0f} {kv:.4f} vs AdamW at step {a_steps:.0f} "
                f"{av:.4f} ({lower} lower; losses interpolated between evals)")
    return "\n".join(lines)


def _timing_lines(results: dict[str, Any]) -> str:
    """Load average, interleaved step-time ratios, and the reliability verdict."""
    env = results["env"]
    start, end = env["loadavg_start"], env["loadavg_end"]
    lines = [f"load average (1 min) at start {start:.2f}, at end {end:.2f}; "
             f"{env['cpu_count']} cores" if start is not None and end is not None
             else "load average: not available on this platform"]
    timing = results.get("step_time")
    if timing:
        ref = results["step_time_reference"]
        cfg = results["step_time_config"]
        ratios = ", ".join(f"{name} {t[f'ratio_to_{ref}']:.2f}x (spread "
                           f"{t['ratio_spread']:.0%})" for name, t in timing.items()
                           if name != ref)
        lines.append(f"step time vs {ref}, interleaved ({cfg['rounds']} rounds of "
                     f"{cfg['steps']} steps, median): {ratios}")
        if results["timing_reliable"]:
            lines.append(f"timings: reliable (load <= cores, ratio spread <= "
                         f"{RATIO_SPREAD_LIMIT:.0%})")
        else:
            lines.append("timings: UNRELIABLE (" + "; ".join(results["timing_unreliable"])
                         + ")")
    return "\n".join(lines)


# CLI ---------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments of the demo (``--help`` lists them)."""
    p = argparse.ArgumentParser(
        prog="python -m kfac_optim.demo",
        description="Train K-FAC, AdamW and SGD-momentum with equal steps and seed; print and "
                    "save a comparison.")
    p.add_argument("--task", choices=(*TASKS, "finetune"), default="lm")
    p.add_argument("--steps", type=int,
                   help="optimizer steps (lm: 400, digits: 300, finetune: 200 fine-tuning)")
    p.add_argument("--optimizers", default="kfac,adamw,sgd",
                   help="comma-separated subset of kfac,adamw,sgd")
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, help="lm: 32 windows, digits: 64 images")
    p.add_argument("--eval-every", type=int, help="held-out eval period in steps (0: end only)")
    p.add_argument("--warmup", type=int, help="linear LR warm-up steps (default: 5%% of steps)")
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    g = p.add_argument_group("lm model")
    g.add_argument("--seq-len", type=int, help="tokens per window (64)")
    g.add_argument("--n-layer", type=int, help="GPT-2 blocks (2)")
    g.add_argument("--n-embd", type=int, help="GPT-2 width (128)")
    g.add_argument("--n-head", type=int, help="attention heads (4)")
    g.add_argument("--eval-chunks", type=int, help="held-out windows evaluated (256)")
    g.add_argument("--vocab", choices=demo_data.VOCABS,
                   help="byte (257 ids, default) or bpe (trained on the training text)")
    g.add_argument("--bpe-vocab-size", type=int, help="BPE ids with --vocab bpe (8192)")
    g = p.add_argument_group("finetune (the lm model and its options, pretrained, then "
                             "fine-tuned on the standard library's sources)")
    g.add_argument("--pretrain-steps", type=int, help="AdamW pretraining steps (400)")
    g.add_argument("--finetune-lrs", type=_floats,
                   help="AdamW fine-tuning lr grid, comma-separated (3e-4,1e-3,3e-3,1e-2)")
    g.add_argument("--cache-dir", help="where pretrained weights are cached, keyed by their "
                   "settings ('none': always pretrain; default $KFAC_DEMO_CACHE or "
                   "~/.cache/kfac_optim/demo)")
    g = p.add_argument_group("digits model")
    g.add_argument("--model", choices=("mlp", "cnn"), help="digits model (mlp)")
    g.add_argument("--hidden", type=int, help="MLP width (256)")
    g = p.add_argument_group("hyperparameter overrides (defaults: tuned, per task)")
    g.add_argument("--kfac-lr", type=float)
    g.add_argument("--adamw-lr", type=float)
    g.add_argument("--sgd-lr", type=float)
    g.add_argument("--damping", type=float, help="K-FAC damping")
    g.add_argument("--damping-mode", choices=("exact", "factored"), help="K-FAC damping mode")
    g.add_argument("--kl-clip", type=lambda s: None if s.lower() == "none" else float(s),
                   default=..., help="K-FAC KL clip, or 'none'")
    g.add_argument("--factor-update-steps", type=int, help="K-FAC factor update period")
    g.add_argument("--inv-update-steps", type=int, help="K-FAC eigendecomposition period")
    g.add_argument("--factor-decay", type=float, help="K-FAC factor EMA decay")
    g.add_argument("--inverse-policy", choices=("eig", "woodbury", "auto", "hybrid"),
                   help="K-FAC inverse policy (byte: eig; bpe: auto)")
    g.add_argument("--woodbury-rank", type=int,
                   help="K-FAC truncated low-rank EMA columns (bpe: 512)")
    g.add_argument("--kfac-momentum", type=float)
    g.add_argument("--sgd-momentum", type=float)
    g.add_argument("--weight-decay", type=float, help="weight decay of all three optimizers")
    p.add_argument("--time-steps", type=int,
                   help="steps per interleaved timing block (default: K-FAC's "
                        "inv_update_steps, 20 by default)")
    p.add_argument("--time-rounds", type=int, default=3,
                   help="interleaved timing rounds (3; 0: no timing, no equal-time line)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = p.parse_args(argv)
    if args.task != "finetune" and (args.pretrain_steps or args.finetune_lrs
                                    or args.cache_dir):
        p.error("--pretrain-steps, --finetune-lrs and --cache-dir apply to --task finetune")
    if args.task == "finetune":
        # K-FAC runs at its defaults there (a swap-in at AdamW's lr; --kfac-lr overrides
        # the lr), AdamW over --finetune-lrs, and there is no SGD run.
        unused = [f"--{k.replace('_', '-')}" for k in (
            "adamw_lr", "sgd_lr", "damping", "damping_mode", "factor_update_steps",
            "inv_update_steps", "factor_decay", "inverse_policy", "woodbury_rank",
            "kfac_momentum", "sgd_momentum", "model", "hidden", "time_steps")
            if getattr(args, k) is not None]
        unused += ["--kl-clip"] if args.kl_clip is not ... else []
        unused += ["--optimizers"] if args.optimizers != "kfac,adamw,sgd" else []
        if unused:
            p.error(f"{', '.join(unused)}: not used by --task finetune (AdamW over "
                    "--finetune-lrs, then K-FAC at its defaults with AdamW's best lr)")
    if args.finetune_lrs is not None and (not args.finetune_lrs
                                          or min(args.finetune_lrs) <= 0):
        p.error(f"--finetune-lrs must be one or more lrs > 0, got {args.finetune_lrs}")
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    bad = [n for n in names if n not in OPTIMIZERS]
    if bad or not names or len(set(names)) != len(names):
        p.error(f"--optimizers: {args.optimizers!r}; accepted: comma-separated distinct "
                f"names from {OPTIMIZERS}")
    args.optimizers = names
    if args.time_rounds < 0:
        p.error(f"--time-rounds must be >= 0, got {args.time_rounds}")
    if args.task != "lm" and (args.vocab or args.bpe_vocab_size):
        p.error("--vocab and --bpe-vocab-size apply to --task lm only")
    for key in ("steps", "batch_size", "seq_len", "n_layer", "n_embd", "n_head", "hidden",
                "eval_chunks", "woodbury_rank", "time_steps", "pretrain_steps"):
        value = getattr(args, key)
        if value is not None and value < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {value}")
    return args


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"comma-separated numbers expected, got {text!r}") \
            from err


def _hparams_from_args(task: str, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    hps = {name: default_hparams(task, name, args.vocab or "byte") for name in args.optimizers}
    overrides = {
        "kfac": dict(lr=args.kfac_lr, damping=args.damping, damping_mode=args.damping_mode,
                     factor_update_steps=args.factor_update_steps,
                     inv_update_steps=args.inv_update_steps, factor_decay=args.factor_decay,
                     momentum=args.kfac_momentum, weight_decay=args.weight_decay,
                     inverse_policy=args.inverse_policy, woodbury_rank=args.woodbury_rank),
        "adamw": dict(lr=args.adamw_lr, weight_decay=args.weight_decay),
        "sgd": dict(lr=args.sgd_lr, momentum=args.sgd_momentum, weight_decay=args.weight_decay),
    }
    for name, hp in hps.items():
        hp.update({k: v for k, v in overrides[name].items() if v is not None})
    if "kfac" in hps and args.kl_clip is not ...:
        hps["kfac"]["kl_clip"] = args.kl_clip
    return hps


def _require_demo_extra(task: str, vocab: str | None) -> None:
    """Fail before any training when a package of the ``demo`` extra is missing."""
    feature = "python -m kfac_optim.demo"
    needed = ["tqdm", "matplotlib"]
    if task in ("lm", "finetune"):
        needed += ["transformers", "tokenizers"] if vocab == "bpe" else ["transformers"]
    else:
        needed.append("sklearn")
    for module in needed:
        require(module, "demo", feature)


def _loadavg() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _measure_step_time(results: dict[str, Any], task: Any, hps: dict[str, dict[str, Any]],
                       args: argparse.Namespace) -> None:
    """Interleaved per-step times of the demo's optimizers into ``results`` (see
    ``time_interleaved``): the source of the equal-time comparison."""
    from ..options import KFACOptions  # the default when the run does not set it

    period = hps.get("kfac", {}).get("inv_update_steps", KFACOptions().inv_update_steps)
    steps = args.time_steps or (period if isinstance(period, int) else 20)
    ref = _ref_name(hps)
    configs = {name: (name, hps[name]) for name in args.optimizers}
    results["step_time"] = time_interleaved(task, configs, steps=steps,
                                            rounds=args.time_rounds, reference=ref)
    results["step_time_reference"] = ref
    results["step_time_config"] = {"steps": steps, "rounds": args.time_rounds,
                                   "spread_limit": RATIO_SPREAD_LIMIT}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the demo; print the table; write results, plot, K-FAC model and state.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The dict written to ``results.json``.

    Raises:
        ImportError: a package of the ``demo`` extra is missing (before any training).
    """
    args = parse_args(argv)
    _require_demo_extra(args.task, args.vocab)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.task == "finetune":
        from .finetune import run_finetune

        return run_finetune(args)
    t_start = time.perf_counter()
    task = make_task(args.task, steps=args.steps, batch_size=args.batch_size,
                     eval_every=args.eval_every, seq_len=args.seq_len, n_layer=args.n_layer,
                     n_embd=args.n_embd, n_head=args.n_head, eval_chunks=args.eval_chunks,
                     model=args.model, hidden=args.hidden, seed=args.seed, vocab=args.vocab,
                     bpe_vocab_size=args.bpe_vocab_size)
    cfg = task.config
    steps = cfg["steps"]
    warmup = args.warmup if args.warmup is not None else max(1, steps // 20)
    hps = _hparams_from_args(args.task, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    results: dict[str, Any] = {
        "task": args.task,
        "config": dict(cfg, warmup=warmup, schedule=args.schedule,
                       schedule_final_ratio=0.1 if args.schedule == "cosine" else 1.0),
        "runs": {},
        "env": {"torch": torch.__version__, "python": platform.python_version(),
                "threads": torch.get_num_threads(), "platform": platform.platform(),
                "cpu_count": os.cpu_count(), "loadavg_start": _loadavg()},
    }
    try:
        import transformers

        results["env"]["transformers"] = transformers.__version__
    except ImportError:
        pass

    for name in args.optimizers:
        run = train_one(task, name, hps[name], steps=steps, seed=args.seed,
                        eval_every=cfg["eval_every"], warmup=warmup, schedule=args.schedule,
                        progress=not args.no_progress, keep=name == "kfac")
        if name == "kfac":
            model, opt = run.pop("model"), run.pop("optimizer")
            task.save_model(model, out / "kfac_model")
            torch.save(opt.preconditioner.state_dict(), out / "kfac_preconditioner.pt")
            run["saved_model"] = "kfac_model"
            run["saved_preconditioner"] = "kfac_preconditioner.pt"
        results["runs"][name] = run

    if args.time_rounds and len(args.optimizers) > 1:
        _measure_step_time(results, task, hps, args)
    results["env"]["loadavg_end"] = _loadavg()
    if "step_time" in results:
        loads = (results["env"]["loadavg_start"], results["env"]["loadavg_end"])
        results["timing_unreliable"] = timing_reliability(results["step_time"], loads)
        results["timing_reliable"] = not results["timing_unreliable"]

    plot_losses(results, out / "losses.png")
    results["plot"] = "losses.png"
    results["total_wall_s"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=1))

    print()
    vocab = f"  vocab={cfg['vocab']}:{cfg['vocab_size']}" if args.task == "lm" else ""
    print(f"task={args.task}{vocab}  steps={steps}  seed={args.seed}  "
          f"batch={cfg['batch_size']}  threads={torch.get_num_threads()}")
    print(format_table(results))
    print(_timing_lines(results))
    comparison = _comparison(results)
    if comparison:
        print(comparison)
    print(f"total wall time {results['total_wall_s']:.1f} s; wrote {out / 'results.json'}, "
          f"{out / 'losses.png'}" + (f", {out / 'kfac_model'}, {out / 'kfac_preconditioner.pt'}"
                                     if "kfac" in results["runs"] else ""))
    return results
