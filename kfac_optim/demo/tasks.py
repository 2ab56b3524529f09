"""The demo's tasks, models, tuned hyperparameters and optimizers (see :mod:`kfac_optim.demo`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._extras import require
from . import data as demo_data

__all__ = ["BPE_HPARAMS", "DEFAULT_HPARAMS", "OPTIMIZERS", "TASKS", "TASK_DEFAULTS", "Task",
           "build_digits_model", "build_lm_model", "default_hparams", "load_digits_model",
           "make_optimizer", "make_task"]

OPTIMIZERS = ("kfac", "adamw", "sgd")
TASKS = ("lm", "digits")

# AdamW and SGD: tuned with benchmarks/tune_demo.py on the task defaults below
# (benchmarks/README.md, "Demo tuning"). K-FAC is the swap-in for AdamW: KFAC(model, lr=X,
# weight_decay=W) at AdamW's tuned X and W, every other option at its default
# (benchmarks/time_to_target.py chose the defaults).
DEFAULT_HPARAMS: dict[str, dict[str, dict[str, Any]]] = {
    "lm": {
        "kfac": dict(lr=1.5e-3, weight_decay=0.0),
        "adamw": dict(lr=1.5e-3, betas=(0.9, 0.999), weight_decay=0.0),
        "sgd": dict(lr=0.1, momentum=0.9, weight_decay=0.0, nesterov=False),
    },
    "digits": {
        "kfac": dict(lr=1e-3, weight_decay=0.1),
        "adamw": dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.1),
        "sgd": dict(lr=0.03, momentum=0.9, weight_decay=0.0, nesterov=False),
    },
}

# --vocab bpe: settings that differ from the byte vocabulary's (benchmarks/README.md,
# "BPE demo"). K-FAC: AdamW's lr; the 8192 x 8192 head G gets 2016 new columns per factor
# update; auto keeps it on Woodbury by truncating the EMA to its top 512 eigenpairs
# (O(o (r + T)^2 + (r + T)^3) per update: seconds on 2 cores, hence r = 512, not the default
# 1024). AdamW: best of lr 4e-4, 7e-4, 1e-3, 1.5e-3, 3e-3. SGD: not re-tuned.
BPE_HPARAMS: dict[str, dict[str, Any]] = {
    "kfac": dict(lr=7e-4, inverse_policy="auto", woodbury_rank=512, factor_update_steps=10,
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
        from ..optimizer import KFAC

        return KFAC(model, **hp)
    if name == "adamw":
        return torch.optim.AdamW(params, **hp)
    if name == "sgd":
        return torch.optim.SGD(params, **hp)
    raise ValueError(f"optimizer={name!r}; accepted: {OPTIMIZERS}")
