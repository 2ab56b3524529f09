"""K-FAC vs AdamW vs SGD-momentum at equal steps: ``python -m kfac_optim.demo``.

Every optimizer trains the same initial model (same seed) on the same batches for
the same number of steps, with the same LR schedule shape (linear warm-up, then
cosine decay to 10% of the peak); only the optimizer and its tuned
hyperparameters differ (tuning grid and results: ``benchmarks/README.md``, "Demo
tuning"). Held-out loss is evaluated every ``--eval-every`` steps and at the end
under ``model.eval()`` and ``torch.no_grad()``; evaluation time is not counted in
the training wall time.

Tasks:

- ``lm`` (default): a small GPT-2 (``transformers.GPT2LMHeadModel``, byte-level
  vocabulary of 257 ids) on the English text that ships with CPython
  (``pydoc_data.topics``), last 10% held out. GPT-2 ties ``lm_head`` to ``wte``;
  K-FAC preconditions the tied matrix with the ``lm_head`` factors. ``--vocab bpe``
  trains a byte-level BPE vocabulary (``--bpe-vocab-size``, 8192 ids) on the
  training text with ``tokenizers``: the head's G (8192 x 8192) then runs on the
  Woodbury policy under ``inverse_policy="auto"``, with a truncated low-rank EMA
  (``woodbury_rank``). Held-out loss is also reported in bits per byte, comparable
  across vocabularies.
- ``digits``: scikit-learn's 8x8 digits with an MLP 64-256-256-10 (or ``--model
  cnn``), stratified 20% held out.

Outputs in ``--out`` (default ``runs/demo``): ``results.json``, ``losses.png``,
the K-FAC-trained model (``kfac_model/``: ``save_pretrained`` for the LM,
``model.pt`` + ``config.json`` for digits; see ``load_digits_model``) and the
K-FAC preconditioner state (``kfac_preconditioner.pt``, ``torch.save`` of
``KFACPreconditioner.state_dict()``).

Needs the ``demo`` extra (``pip install 'kfac-optim[demo]'``: transformers, tokenizers,
matplotlib, scikit-learn, tqdm); without it the demo raises ``ImportError`` saying so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import data as demo_data
from ._extras import require

__all__ = [
    "OPTIMIZERS",
    "Task",
    "build_digits_model",
    "build_lm_model",
    "default_hparams",
    "load_digits_model",
    "main",
    "make_optimizer",
    "make_task",
    "parse_args",
    "train_one",
]

OPTIMIZERS = ("kfac", "adamw", "sgd")
TASKS = ("lm", "digits")

# Tuned with benchmarks/tune_demo.py on the task defaults below (benchmarks/README.md,
# "Demo tuning"): for each optimizer the lowest held-out loss over a 3x3 grid plus
# follow-up points, at the demo's steps, seed and schedule.
DEFAULT_HPARAMS: dict[str, dict[str, dict[str, Any]]] = {
    "lm": {
        "kfac": dict(lr=1.0, momentum=0.9, weight_decay=0.0, damping=0.03,
                     damping_mode="factored", kl_clip=1e-3, factor_decay=0.95,
                     factor_update_steps=1, inv_update_steps=10),
        "adamw": dict(lr=1.5e-3, betas=(0.9, 0.999), weight_decay=0.0),
        "sgd": dict(lr=0.1, momentum=0.9, weight_decay=0.0, nesterov=False),
    },
    "digits": {
        "kfac": dict(lr=1.0, momentum=0.9, weight_decay=0.0, damping=10.0,
                     damping_mode="factored", kl_clip=1e-3, factor_decay=0.95,
                     factor_update_steps=1, inv_update_steps=10),
        "adamw": dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.1),
        "sgd": dict(lr=0.03, momentum=0.9, weight_decay=0.0, nesterov=False),
    },
}

# --vocab bpe: settings that differ from the byte vocabulary's (benchmarks/README.md,
# "BPE demo"). K-FAC: the 8192 x 8192 head G gets 2016 new columns per factor update;
# auto keeps it on Woodbury by truncating the EMA to its top 512 eigenpairs
# (O(o (r + T)^2 + (r + T)^3) per update: seconds on 2 cores, so factors every 10 steps);
# lr 1.0 beat 0.5. AdamW: best of lr 4e-4, 7e-4, 1e-3, 1.5e-3, 3e-3. SGD: not re-tuned.
BPE_HPARAMS: dict[str, dict[str, Any]] = {
    "kfac": dict(inverse_policy="auto", woodbury_rank=512, factor_update_steps=10,
                 inv_update_steps=10),
    "adamw": dict(lr=7e-4),
}

TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "lm": dict(steps=400, batch_size=32, seq_len=64, n_layer=2, n_embd=128, n_head=4,
               eval_every=50, eval_chunks=256, vocab="byte", bpe_vocab_size=8192),
    "digits": dict(steps=300, batch_size=64, model="mlp", hidden=256, eval_every=25),
}


def default_hparams(task: str, optimizer: str, vocab: str = "byte") -> dict[str, Any]:
    """A copy of the tuned default hyperparameters of ``optimizer`` on ``task``
    (for ``vocab="bpe"``, updated with ``BPE_HPARAMS``).

    Raises:
        ValueError: unknown ``task``, ``optimizer`` or ``vocab``.
    """
    if task not in DEFAULT_HPARAMS:
        raise ValueError(f"task={task!r}; accepted: {TASKS}")
    if optimizer not in DEFAULT_HPARAMS[task]:
        raise ValueError(f"optimizer={optimizer!r}; accepted: {OPTIMIZERS}")
    if vocab not in demo_data.VOCABS:
        raise ValueError(f"vocab={vocab!r}; accepted: {demo_data.VOCABS}")
    hp = dict(DEFAULT_HPARAMS[task][optimizer])
    if vocab == "bpe":
        hp.update(BPE_HPARAMS.get(optimizer, {}))
    return hp


# Models ------------------------------------------------------------------------
def build_lm_model(n_layer: int = 2, n_embd: int = 128, n_head: int = 4,
                   seq_len: int = 64, vocab_size: int = demo_data.VOCAB_SIZE,
                   eos_id: int = demo_data.EOS_ID) -> nn.Module:
    """A small GPT-2 (``GPT2LMHeadModel``), by default over the 257-id byte vocabulary.

    Dropout is off (short runs; it would only add noise to the comparison);
    ``lm_head`` is tied to ``wte`` as in GPT-2. Seed the global RNG first for a
    reproducible initialisation.

    Raises:
        ValueError: ``n_embd`` not divisible by ``n_head`` (from transformers).
    """
    transformers = require("transformers", "demo", "kfac_optim.demo.build_lm_model (GPT-2)")
    GPT2Config, GPT2LMHeadModel = transformers.GPT2Config, transformers.GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_positions=seq_len, n_embd=n_embd,
                        n_layer=n_layer, n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=eos_id, eos_token_id=eos_id,
                        tie_word_embeddings=True)
    model = GPT2LMHeadModel(config)
    # The default causal-LM loss, named so transformers does not warn that it guessed it.
    model.loss_type = "ForCausalLM"
    return model


class _SmallCNN(nn.Sequential):
    """Conv(1->16, 3x3) - ReLU - Conv(16->32, 3x3, stride 2) - ReLU - Linear(512->10)."""

    def __init__(self, num_classes: int = 10):
        super().__init__(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * 4 * 4, num_classes),
        )


def build_digits_model(kind: str = "mlp", hidden: int = 256) -> nn.Module:
    """Digits classifier taking ``(B, 64)`` standardized pixels, returning ``(B, 10)`` logits.

    Args:
        kind: ``"mlp"`` (64-hidden-hidden-10, ReLU) or ``"cnn"`` (``_SmallCNN``).
        hidden: MLP width.

    Raises:
        ValueError: unknown ``kind``.
    """
    if kind == "mlp":
        return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                             nn.ReLU(), nn.Linear(hidden, 10))
    if kind == "cnn":
        return _SmallCNN()
    raise ValueError(f"digits model kind={kind!r}; accepted: ('mlp', 'cnn')")


def load_digits_model(directory: str | Path) -> nn.Module:
    """Rebuild a digits model saved by the demo (``config.json`` + ``model.pt``)."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    model = build_digits_model(config["kind"], config["hidden"])
    model.load_state_dict(torch.load(directory / "model.pt", weights_only=True))
    return model


# Tasks -------------------------------------------------------------------------
@dataclass
class Task:
    """What the training loop needs to know about a task.

    Attributes:
        name: ``"lm"`` or ``"digits"``.
        config: the task's settings (recorded in results.json).
        build_model: fresh, untrained model (seeding is the caller's job).
        batches: ``seed -> iterator`` of training batches.
        loss: ``(model, batch) -> scalar`` mean training loss.
        evaluate: ``model -> {"val_loss", "train_loss", ["val_acc", "train_acc"]}``,
            run under ``eval()`` / ``no_grad()``.
        save_model: ``(model, directory)`` writes the model for later reloading.
    """

    name: str
    config: dict[str, Any]
    build_model: Callable[[], nn.Module]
    batches: Callable[[int], Iterator[Any]]
    loss: Callable[[nn.Module, Any], Tensor]
    evaluate: Callable[[nn.Module], dict[str, float]]
    save_model: Callable[[nn.Module, Path], None]


def _lm_loss(model: nn.Module, batch: Tensor) -> Tensor:
    return model(input_ids=batch, labels=batch).loss


@torch.no_grad()
def _lm_eval_loss(model: nn.Module, chunks: Tensor, batch_size: int = 64) -> float:
    # Token-weighted mean over the chunks (every chunk has seq_len - 1 predictions).
    total = 0.0
    for i in range(0, len(chunks), batch_size):
        part = chunks[i : i + batch_size]
        total += float(model(input_ids=part, labels=part).loss) * len(part)
    return total / len(chunks)


def _evaluate_with(model: nn.Module, fn: Callable[[], dict[str, float]]) -> dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return fn()
    finally:
        model.train(was_training)


def _lm_task(cfg: dict[str, Any]) -> Task:
    lm = demo_data.load_lm_data(vocab=cfg["vocab"], bpe_vocab_size=cfg["bpe_vocab_size"])
    val_chunks = demo_data.lm_eval_chunks(lm.val, cfg["seq_len"], cfg["eval_chunks"])
    # The same number of windows from the training text, for a comparable train loss.
    train_chunks = demo_data.lm_eval_chunks(lm.train, cfg["seq_len"], len(val_chunks))
    config = dict(cfg, train_tokens=len(lm.train), val_tokens=len(lm.val),
                  eval_val_tokens=val_chunks.numel(), vocab_size=lm.vocab_size)

    def evaluate(model: nn.Module) -> dict[str, float]:
        def run() -> dict[str, float]:
            val = _lm_eval_loss(model, val_chunks)
            return {"val_loss": val, "val_bpb": lm.bits_per_byte(val, val_chunks),
                    "train_loss": _lm_eval_loss(model, train_chunks)}
        return _evaluate_with(model, run)

    def save(model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory)
        if lm.tokenizer is not None:  # the BPE vocabulary, for fisher_metrics' report data
            lm.tokenizer.save(str(directory / "tokenizer.json"))

    return Task(
        name="lm", config=config,
        build_model=lambda: build_lm_model(cfg["n_layer"], cfg["n_embd"], cfg["n_head"],
                                           cfg["seq_len"], lm.vocab_size, lm.eos_id),
        batches=lambda seed: demo_data.lm_batches(lm.train, cfg["batch_size"], cfg["seq_len"],
                                                  seed),
        loss=_lm_loss, evaluate=evaluate, save_model=save)


def _digits_task(cfg: dict[str, Any]) -> Task:
    d = demo_data.load_digits_data(seed=cfg["seed"])
    config = dict(cfg, train_size=len(d.y_train), val_size=len(d.y_val))

    def loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(model(batch[0]), batch[1])

    def scores(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
        logits = model(x)
        return (float(F.cross_entropy(logits, y)),
                float((logits.argmax(-1) == y).float().mean()))

    def evaluate(model: nn.Module) -> dict[str, float]:
        def run() -> dict[str, float]:
            val_loss, val_acc = scores(model, d.x_val, d.y_val)
            train_loss, train_acc = scores(model, d.x_train, d.y_train)
            return {"val_loss": val_loss, "train_loss": train_loss, "val_acc": val_acc,
                    "train_acc": train_acc}
        return _evaluate_with(model, run)

    def save(model: nn.Module, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), directory / "model.pt")
        (directory / "config.json").write_text(json.dumps(
            {"kind": cfg["model"], "hidden": cfg["hidden"], "in_features": 64,
             "num_classes": 10}, indent=2))

    return Task(
        name="digits", config=config,
        build_model=lambda: build_digits_model(cfg["model"], cfg["hidden"]),
        batches=lambda seed: demo_data.digits_batches(d.x_train, d.y_train, cfg["batch_size"],
                                                      seed),
        loss=loss, evaluate=evaluate, save_model=save)


def make_task(name: str, **cfg: Any) -> Task:
    """Build a task from its settings (``TASK_DEFAULTS[name]`` overridden by ``cfg``).

    Raises:
        ValueError: unknown task name.
    """
    if name not in TASK_DEFAULTS:
        raise ValueError(f"task={name!r}; accepted: {TASKS}")
    full = dict(TASK_DEFAULTS[name], seed=0)
    full.update({k: v for k, v in cfg.items() if v is not None})
    return _lm_task(full) if name == "lm" else _digits_task(full)


# Optimizers --------------------------------------------------------------------
def make_optimizer(name: str, model: nn.Module, hp: dict[str, Any]) -> torch.optim.Optimizer:
    """``kfac`` (``kfac_optim.KFAC``), ``adamw`` or ``sgd`` (momentum) over ``model``.

    Args:
        name: one of ``OPTIMIZERS``.
        model: the model (K-FAC registers its hooks on it).
        hp: hyperparameters, as in ``DEFAULT_HPARAMS``.

    Raises:
        ValueError: unknown ``name``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "kfac":
        from .optimizer import KFAC

        return KFAC(model, **hp)
    if name == "adamw":
        return torch.optim.AdamW(params, **hp)
    if name == "sgd":
        return torch.optim.SGD(params, **hp)
    raise ValueError(f"optimizer={name!r}; accepted: {OPTIMIZERS}")


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


# Reporting ---------------------------------------------------------------------
def _ema(values: Sequence[float], decay: float = 0.95) -> list[float]:
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg = decay * avg + (1 - decay) * v
        weight = decay * weight + (1 - decay)
        out.append(avg / weight)
    return out


def plot_losses(results: dict[str, Any], path: Path) -> None:
    """Loss curves: train (EMA-smoothed) and held-out vs step, held-out vs training time."""
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
        ax_step.plot(steps_, vals, "o-", color=color, ms=3, label=f"{name} held-out")
        ax_time.plot(times, vals, "o-", color=color, ms=3, label=name)
    ax_step.set(xlabel="step", ylabel="loss", title=f"{results['task']}: loss vs step")
    ax_time.set(xlabel="training wall time (s)", ylabel="held-out loss",
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
    """The printed summary table (one row per optimizer)."""
    with_acc = any("final_val_acc" in r for r in results["runs"].values())
    with_bpb = any("final_val_bpb" in r for r in results["runs"].values())
    head = ["optimizer", "train loss", "val loss"]
    if with_bpb:
        head += ["val bpb"]
    if with_acc:
        head += ["train acc", "val acc"]
    head += ["wall s", "ms/step"]
    rows = [head]
    for name, r in results["runs"].items():
        row = [name, f"{r['final_train_loss']:.4f}", f"{r['final_val_loss']:.4f}"]
        if with_bpb:
            row += [f"{r['final_val_bpb']:.4f}"]
        if with_acc:
            row += [f"{r['final_train_acc']:.4f}", f"{r['final_val_acc']:.4f}"]
        row += [f"{r['wall_s']:.1f}", f"{r['ms_per_step']:.1f}"]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _comparison(results: dict[str, Any]) -> str | None:
    runs = results["runs"]
    if "kfac" not in runs or "adamw" not in runs:
        return None
    k, a = runs["kfac"], runs["adamw"]
    lower = "K-FAC" if k["final_val_loss"] < a["final_val_loss"] else "AdamW"
    lines = [f"equal steps: K-FAC val loss {k['final_val_loss']:.4f} vs AdamW "
             f"{a['final_val_loss']:.4f} ({lower} lower)"]
    budget = min(k["val_curve"][-1][1], a["val_curve"][-1][1])  # the shorter training time
    kv, av = val_loss_at_time(k["val_curve"], budget), val_loss_at_time(a["val_curve"], budget)
    if kv is not None and av is not None:
        lines.append(f"equal wall time ({budget:.1f} s of training, interpolated between "
                     f"evals): K-FAC {kv:.4f} vs AdamW {av:.4f}")
    return "\n".join(lines)


# CLI ---------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments of the demo (``--help`` lists them)."""
    p = argparse.ArgumentParser(
        prog="python -m kfac_optim.demo",
        description="Train K-FAC, AdamW and SGD-momentum with equal steps and seed; print and "
                    "save a comparison.")
    p.add_argument("--task", choices=TASKS, default="lm")
    p.add_argument("--steps", type=int, help="optimizer steps (lm: 400, digits: 300)")
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
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    bad = [n for n in names if n not in OPTIMIZERS]
    if bad or not names or len(set(names)) != len(names):
        p.error(f"--optimizers: {args.optimizers!r}; accepted: comma-separated distinct "
                f"names from {OPTIMIZERS}")
    args.optimizers = names
    if args.task != "lm" and (args.vocab or args.bpe_vocab_size):
        p.error("--vocab and --bpe-vocab-size apply to --task lm only")
    for key in ("steps", "batch_size", "seq_len", "n_layer", "n_embd", "n_head", "hidden",
                "eval_chunks", "woodbury_rank"):
        value = getattr(args, key)
        if value is not None and value < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {value}")
    return args


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
    if task == "lm":
        needed += ["transformers", "tokenizers"] if vocab == "bpe" else ["transformers"]
    else:
        needed.append("sklearn")
    for module in needed:
        require(module, "demo", feature)


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
                "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None},
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

    plot_losses(results, out / "losses.png")
    results["plot"] = "losses.png"
    results["total_wall_s"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=1))

    print()
    vocab = f"  vocab={cfg['vocab']}:{cfg['vocab_size']}" if args.task == "lm" else ""
    print(f"task={args.task}{vocab}  steps={steps}  seed={args.seed}  "
          f"batch={cfg['batch_size']}  threads={torch.get_num_threads()}")
    print(format_table(results))
    comparison = _comparison(results)
    if comparison:
        print(comparison)
    print(f"total wall time {results['total_wall_s']:.1f} s; wrote {out / 'results.json'}, "
          f"{out / 'losses.png'}" + (f", {out / 'kfac_model'}, {out / 'kfac_preconditioner.pt'}"
                                     if "kfac" in results["runs"] else ""))
    return results


if __name__ == "__main__":
    main()
