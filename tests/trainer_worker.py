"""2-rank worker for tests/test_integrations.py: ``KFACTrainer`` under DDP (torchrun, gloo, CPU).

A float64 GPT-2 built from a config trains ``STEPS`` K-FAC steps through Hugging Face
``Trainer`` with 2 processes, ``per_device_train_batch_size=2`` and gradient accumulation 2
(8 examples per step), on right-padded examples whose valid token counts differ between
ranks and between micro-batches, with an evaluation after every step. Each rank then runs a
single-process ``KFAC`` (no Trainer, no process group) on the concatenated 8 examples of
each step, mean loss over the valid shifted tokens, and compares factors and parameters.
Rank 0 writes the results to ``argv[1]``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers

from kfac_optim import KFAC
from kfac_optim.integrations.transformers import KFACTrainer

STEPS, BATCH, ACCUM, LENGTH = 3, 2, 2, 10
LR = 0.05
KFAC_KWARGS = dict(factor_update_steps=1, inv_update_steps=1, damping=1e-2, kl_clip=1e-2,
                   factor_decay=0.7)


def causal_lm_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                   **kwargs):
    """transformers' ForCausalLMLoss (sum over shifted valid labels / num_items_in_batch, or
    their mean) without its float32 upcast, which rounds a float64 model's loss to ~1e-7."""
    shifted = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    loss = F.cross_entropy(logits.reshape(-1, vocab_size), shifted.reshape(-1),
                           ignore_index=ignore_index,
                           reduction="mean" if num_items_in_batch is None else "sum")
    return loss if num_items_in_batch is None else loss / num_items_in_batch


def model_fn():
    cfg = transformers.GPT2Config(vocab_size=20, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).double()
    model.loss_function = causal_lm_loss
    return model


def examples():
    """``STEPS * 8`` examples; Trainer's sequential sampler sends batch k (examples
    ``2k, 2k+1``) to rank ``k % 2``: rank 1's batches carry 4 more padding tokens."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(STEPS * 2 * ACCUM * BATCH):
        rank = (i // BATCH) % 2
        ids = torch.randint(1, 20, (LENGTH,), generator=g)
        mask = torch.ones(LENGTH, dtype=torch.long)
        mask[LENGTH - (i % 3) - 4 * rank:] = 0
        rows.append({"input_ids": ids, "attention_mask": mask,
                     "labels": ids.masked_fill(mask == 0, -100)})
    return rows


class RecordingTrainer(KFACTrainer):
    """Records each micro-batch's valid (shifted) label count on this rank."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.micro_batch_tokens.append(int(inputs["labels"][:, 1:].ne(-100).sum()))
        return super().training_step(model, inputs, num_items_in_batch)


class CaptureDuringEval(transformers.TrainerCallback):
    """Whether K-FAC was capturing at each evaluation step (Trainer's optimizer.eval())."""

    def __init__(self):
        self.seen: set[bool] = set()

    def on_prediction_step(self, args, state, control, optimizer=None, **kwargs):
        self.seen.add(optimizer.optimizer.preconditioner.capture_enabled)  # accelerate's wrapper


def factors(pre):
    return [t for layer in pre.layers.values() for t in (layer.A, layer.G)
            if t is not None]


@torch.no_grad()
def max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def train(out: Path, data: list, steps: int, average_tokens: bool):
    """KFACTrainer run on 2 ranks; returns (trainer, model, the KFAC inside accelerate's
    wrapper, capture flags seen during evaluation)."""
    model = model_fn()
    args = transformers.TrainingArguments(
        output_dir=str(out.parent), per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM, max_steps=steps, learning_rate=LR,
        lr_scheduler_type="constant", max_grad_norm=0.0, train_sampling_strategy="sequential",
        average_tokens_across_devices=average_tokens, use_cpu=True, ddp_backend="gloo",
        report_to=[], save_strategy="no", logging_strategy="no", eval_strategy="steps",
        eval_steps=1, per_device_eval_batch_size=BATCH, ddp_find_unused_parameters=False,
        disable_tqdm=True, seed=0)
    callback = CaptureDuringEval()
    trainer = RecordingTrainer(model=model, args=args, train_dataset=data, eval_dataset=data[:4],
                               kfac_kwargs=KFAC_KWARGS, callbacks=[callback])
    trainer.micro_batch_tokens = []
    trainer.train()
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, KFAC)
    return trainer, model, opt, callback.seen


def main():
    out = Path(sys.argv[1])
    data = examples()
    trainer, model, opt, seen = train(out, data, STEPS, average_tokens=True)
    rank, world = dist.get_rank(), dist.get_world_size()
    capturing_after_train = opt.preconditioner.capture_enabled
    trainer.evaluate()
    pending_after_eval = sum(int(layer.pending) for layer in opt.preconditioner.layers.values())

    # Trainer divides the summed token losses of a step by num_items_in_batch; in
    # transformers 5.23 it counts shifted labels only for models whose loss_type maps to
    # ForCausalLMLoss, and GPT2LMHeadModel's loss_type is None: it counts every valid label.
    shifted = trainer._loss_shifts_labels
    ref_model = model_fn()
    ref = KFAC(ref_model, process_group=None, lr=LR, **KFAC_KWARGS)
    per_step = 2 * ACCUM * BATCH
    first_factors = None
    for step in range(STEPS):
        batch = {k: torch.stack([r[k] for r in data[step * per_step:(step + 1) * per_step]])
                 for k in data[0]}
        items = (batch["labels"][:, 1:] if shifted else batch["labels"]).ne(-100).sum()
        ref.zero_grad()
        ref_model(**batch, num_items_in_batch=items).loss.backward()
        ref.step()
        first_factors = first_factors or [t.clone() for t in factors(ref.preconditioner)]
    result = {
        "world_size": world,
        "trainer_counts_shifted_labels": shifted,
        "loss_divisor_ranks": opt.preconditioner.loss_divisor_ranks,
        "micro_batch_tokens": trainer.micro_batch_tokens,
        "factor_updates": opt.preconditioner.layers["lm_head"].factor_updates,
        "factors": max_diff(factors(opt.preconditioner), factors(ref.preconditioner)),
        "params": max_diff(list(model.parameters()), list(ref_model.parameters())),
        "moved": max_diff(list(model.parameters()), list(model_fn().parameters())),
        "capture_during_eval": sorted(seen),
        "capturing_after_train": capturing_after_train,
        "capturing_after_evaluate": opt.preconditioner.capture_enabled,
        "pending_after_eval": pending_after_eval,
    }
    # Per-rank token counts (no gather, no x R): the factors do not depend on the loss scale.
    _, _, opt, _ = train(out, data, 1, average_tokens=False)
    result["per_rank_items"] = {
        "loss_divisor_ranks": opt.preconditioner.loss_divisor_ranks,
        "factors": max_diff(factors(opt.preconditioner), first_factors)}
    results = [None] * world
    dist.all_gather_object(results, result)
    if rank == 0:
        out.write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # measured: gloo workers sometimes abort at interpreter exit


if __name__ == "__main__":
    main()
