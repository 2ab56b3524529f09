"""The demo's fine-tuning task: ``python -m kfac_optim.demo --task finetune``.

1. Pretrain: the ``lm`` task's GPT-2 (byte vocabulary) on the pydoc text
   (``load_lm_data``) with AdamW at the ``lm`` task's tuned settings for
   ``pretrain_steps`` steps (warm-up over 5%, cosine to 10%). The weights are saved with
   ``save_pretrained`` in a cache directory keyed by a hash of everything that decides
   them (``pretrain_key``), so a rerun with the same settings loads them instead.
2. Fine-tune on another domain, the standard library's ``.py`` sources as bytes
   (``load_code_data``: one file in ten held out), every run starting from the same
   pretrained weights with the same batches and schedule:

   a. AdamW at each of ``finetune_lrs``; the lowest final held-out loss picks the best lr;
   b. K-FAC as a swap-in at that lr: ``KFAC(model, lr=best, weight_decay=W)``, every
      other option at its default.

Reported: the pretrained model's held-out loss on the new domain (step 0 of every curve),
each run's final and best held-out loss, whether K-FAC's held-out loss ever rose above
the pretrained model's, and the steps (interpolated between evaluations) each run takes to
reach AdamW's best final held-out loss.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import data as demo_data
from .tasks import (
    DEFAULT_HPARAMS,
    TASK_DEFAULTS,
    Task,
    _evaluate_with,
    _lm_eval_loss,
    _lm_loss,
    build_lm_model,
    make_task,
)
from .training import reach, train_one

__all__ = ["FINETUNE_DEFAULTS", "default_cache_dir", "finetune_task", "pretrain_key",
           "pretrained_state", "run_finetune"]

FINETUNE_DEFAULTS: dict[str, Any] = dict(
    pretrain_steps=400, steps=200, eval_every=25, finetune_lrs=(3e-4, 1e-3, 3e-3, 1e-2),
    weight_decay=0.0)
_MODEL_KEYS = ("n_layer", "n_embd", "n_head", "seq_len")


def default_cache_dir() -> Path:
    """``$KFAC_DEMO_CACHE``, else ``$XDG_CACHE_HOME/kfac_optim/demo`` (``~/.cache`` when
    unset): where pretrained weights are kept between runs."""
    if os.environ.get("KFAC_DEMO_CACHE"):
        return Path(os.environ["KFAC_DEMO_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kfac_optim" / "demo"


def pretrain_key(config: dict[str, Any]) -> str:
    """A 16-hex-digit hash of the pretraining settings (model shape, batch, steps,
    optimizer settings, seed, schedule, torch and transformers versions)."""
    import transformers

    blob = json.dumps(dict(config, torch=torch.__version__,
                           transformers=transformers.__version__), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pretrained_state(cfg: dict[str, Any], cache_dir: Path | None,
                     progress: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The pretrained weights: loaded from ``cache_dir`` or trained (and saved there).

    Args:
        cfg: ``n_layer``, ``n_embd``, ``n_head``, ``seq_len``, ``batch_size``,
            ``pretrain_steps``, ``seed``, ``eval_chunks``.
        cache_dir: root of the cache (None: train in-process, save nothing).
        progress: show the pretraining progress bar.

    Returns:
        (state_dict, record): the record says ``cached`` (loaded, not trained), ``key``,
        ``path`` and, when trained here, the pretraining run's final losses and seconds.
    """
    from transformers import GPT2LMHeadModel

    hp = dict(DEFAULT_HPARAMS["lm"]["adamw"])
    steps = cfg["pretrain_steps"]
    settings = dict({k: cfg[k] for k in (*_MODEL_KEYS, "batch_size", "seed")},
                    pretrain_steps=steps, optimizer="adamw", hparams=hp, schedule="cosine",
                    warmup=max(1, steps // 20), vocab="byte", data="pydoc_data.topics")
    key = pretrain_key(settings)
    path = None if cache_dir is None else Path(cache_dir) / f"pretrained-{key}"
    record: dict[str, Any] = {"key": key, "path": None if path is None else str(path),
                              "settings": settings}
    if path is not None and (path / "config.json").exists():
        model = GPT2LMHeadModel.from_pretrained(path)
        return model.state_dict(), dict(record, cached=True)

    lm = make_task("lm", **{k: cfg[k] for k in (*_MODEL_KEYS, "batch_size", "eval_chunks")},
                   steps=steps, eval_every=0)
    run = train_one(lm, "adamw", hp, steps=steps, seed=cfg["seed"], eval_every=0,
                    warmup=settings["warmup"], progress=progress, keep=True)
    model = run["model"]
    record.update(cached=False, final_val_loss=run["final_val_loss"],
                  final_train_loss=run["final_train_loss"], wall_s=run["wall_s"])
    if path is not None:
        # Written next to its final name, then renamed: a killed run leaves no half model.
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        model.save_pretrained(tmp)
        (tmp / "pretrain.json").write_text(json.dumps(
            {k: v for k, v in record.items() if k != "path"}, indent=1))
        try:
            tmp.rename(path)
        except OSError:  # another run saved it first
            shutil.rmtree(tmp, ignore_errors=True)
    return model.state_dict(), record


def finetune_task(cfg: dict[str, Any], state: dict[str, torch.Tensor]) -> Task:
    """The fine-tuning ``Task``: the pretrained model (``state``) on the standard-library
    sources (``load_code_data``); held-out loss on ``eval_chunks`` evenly spaced windows of
    the held-out files, train loss on as many windows of the training files (nats per
    byte, token-weighted means)."""
    code = demo_data.load_code_data()
    val_chunks = demo_data.lm_eval_chunks(code.val, cfg["seq_len"], cfg["eval_chunks"])
    train_chunks = demo_data.lm_eval_chunks(code.train, cfg["seq_len"], len(val_chunks))
    config = dict(cfg, data="stdlib_sources", train_tokens=len(code.train),
                  val_tokens=len(code.val), eval_val_tokens=val_chunks.numel(),
                  train_files=len(code.train_files), val_files=list(code.val_files),
                  vocab_size=demo_data.VOCAB_SIZE)

    def build() -> nn.Module:
        model = build_lm_model(cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["seq_len"])
        model.load_state_dict(state)
        return model

    def evaluate(model: nn.Module) -> dict[str, float]:
        return _evaluate_with(model, lambda: {"val_loss": _lm_eval_loss(model, val_chunks),
                                              "train_loss": _lm_eval_loss(model, train_chunks)})

    return Task(name="finetune", config=config, build_model=build,
                batches=lambda seed: demo_data.lm_batches(code.train, cfg["batch_size"],
                                                          cfg["seq_len"], seed),
                loss=_lm_loss, evaluate=evaluate,
                save_model=lambda model, directory: model.save_pretrained(directory))


def _lr_label(lr: float) -> str:
    return f"adamw lr={lr:g}"


def run_finetune(args: argparse.Namespace) -> dict[str, Any]:
    """The whole fine-tuning protocol (module docstring) from the demo's parsed arguments;
    prints the table and the checks, writes ``results.json``, ``losses.png`` and the
    K-FAC-fine-tuned model (``kfac_model/``) to ``args.out``; returns the results."""
    from .cli import format_table, plot_losses

    t_start = time.perf_counter()
    lm_defaults = TASK_DEFAULTS["lm"]
    cfg = {k: getattr(args, k) if getattr(args, k) is not None else lm_defaults[k]
           for k in (*_MODEL_KEYS, "batch_size", "eval_chunks")}
    cfg.update(seed=args.seed,
               pretrain_steps=args.pretrain_steps or FINETUNE_DEFAULTS["pretrain_steps"],
               steps=args.steps or FINETUNE_DEFAULTS["steps"],
               eval_every=(FINETUNE_DEFAULTS["eval_every"] if args.eval_every is None
                           else args.eval_every))
    steps = cfg["steps"]
    warmup = args.warmup if args.warmup is not None else max(1, steps // 20)
    wd = FINETUNE_DEFAULTS["weight_decay"] if args.weight_decay is None else args.weight_decay
    lrs = args.finetune_lrs or list(FINETUNE_DEFAULTS["finetune_lrs"])
    cache = None if args.cache_dir == "none" else Path(args.cache_dir or default_cache_dir())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    state, pretrain = pretrained_state(cfg, cache, progress=not args.no_progress)
    task = finetune_task(cfg, state)
    common = dict(steps=steps, seed=args.seed, eval_every=cfg["eval_every"], warmup=warmup,
                  schedule=args.schedule, progress=not args.no_progress)
    runs: dict[str, Any] = {}
    for lr in lrs:
        runs[_lr_label(lr)] = train_one(task, "adamw", dict(lr=lr, weight_decay=wd), **common)
    finals = {lr: runs[_lr_label(lr)]["final_val_loss"] for lr in lrs}
    best_lr = min(lrs, key=lambda lr: finals[lr] if math.isfinite(finals[lr]) else math.inf)
    # the swap-in (docs/design.md, "Must hold" 6): KFAC(model, lr=X, weight_decay=W) at
    # AdamW's X and W, every other option at its default
    kfac_hp = dict(lr=best_lr if args.kfac_lr is None else args.kfac_lr, weight_decay=wd)
    kfac = train_one(task, "kfac", kfac_hp, keep=True, **common)
    model, opt = kfac.pop("model"), kfac.pop("optimizer")
    task.save_model(model, out / "kfac_model")
    opt.preconditioner.remove()
    runs["kfac"] = kfac

    pretrained_val = kfac["val_curve"][0][2]
    target = finals[best_lr]
    kfac_vals = [v for _, _, v in kfac["val_curve"]]
    results: dict[str, Any] = {
        "task": "finetune",
        "config": dict(task.config, warmup=warmup, schedule=args.schedule,
                       weight_decay=wd, finetune_lrs=lrs),
        "pretrain": pretrain,
        "pretrained_val_loss": pretrained_val,
        "best_adamw_lr": best_lr,
        "target_val_loss": target,
        "kfac_max_val_loss": max(kfac_vals),
        "kfac_never_above_pretrained": all(math.isfinite(v) and v <= pretrained_val
                                           for v in kfac_vals),
        "steps_to_target": {name: (None if (h := reach(r["val_curve"], target)) is None
                                   else h[0]) for name, r in runs.items()},
        "runs": runs,
        "env": {"torch": torch.__version__, "python": platform.python_version(),
                "threads": torch.get_num_threads(), "platform": platform.platform()},
    }
    plot_losses(results, out / "losses.png")
    results["plot"] = "losses.png"
    results["saved_model"] = "kfac_model"
    results["total_wall_s"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=1))

    print()
    source = ("loaded from cache" if pretrain["cached"] else
              f"trained here in {pretrain['wall_s']:.1f} s, pydoc held-out loss "
              f"{pretrain['final_val_loss']:.4f}")
    print(f"task=finetune  pretrain={cfg['pretrain_steps']} AdamW steps on pydoc text "
          f"({source}{'' if pretrain['path'] is None else ': ' + pretrain['path']})")
    print(f"fine-tune: {steps} steps on the standard library's sources "
          f"({task.config['train_files']} files, {task.config['train_tokens']} bytes; "
          f"held out {len(task.config['val_files'])} files, {task.config['val_tokens']} "
          f"bytes)  seed={args.seed}  batch={cfg['batch_size']}  "
          f"threads={torch.get_num_threads()}")
    print(f"pretrained model's held-out loss on the sources (step 0): {pretrained_val:.4f}")
    print(format_table(results))
    print(f"best AdamW fine-tuning lr {best_lr:g} (grid {', '.join(f'{lr:g}' for lr in lrs)});"
          f" K-FAC: KFAC(model, lr={kfac_hp['lr']:g}, weight_decay={wd:g}), defaults otherwise")
    never = results["kfac_never_above_pretrained"]
    print(f"check: K-FAC's held-out loss never above the pretrained model's "
          f"({pretrained_val:.4f}): {'yes' if never else 'NO'} (max {max(kfac_vals):.4f})")
    reached = ", ".join(f"{name} {'not reached' if s is None else f'{s:.0f}'}"
                        for name, s in results["steps_to_target"].items())
    print(f"steps to reach AdamW's best fine-tuned held-out loss {target:.4f}: {reached}")
    print(f"total wall time {results['total_wall_s']:.1f} s; wrote {out / 'results.json'}, "
          f"{out / 'losses.png'}, {out / 'kfac_model'}")
    return results
