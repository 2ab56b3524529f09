"""Hugging Face ``Trainer`` with K-FAC.

``Trainer(optimizer_cls_and_kwargs=...)`` builds optimizers from parameter groups, but
K-FAC needs the model (its hooks live on modules), and under FSDP Trainer requires the
optimizer to be created in ``create_optimizer``. So the recipe is a subclass::

    from kfac_optim.integrations.transformers import KFACTrainer
    trainer = KFACTrainer(model=model, args=args, train_dataset=ds,
                          kfac_kwargs=dict(factor_update_steps=10))  # any KFAC option
    trainer.train()

Where the learning rate comes from: ``KFAC``'s ``lr`` is ``TrainingArguments.learning_rate``
(Trainer's default 5e-5) unless ``kfac_kwargs`` gives ``lr``; Trainer's LR scheduler
(``lr_scheduler_type``, ``warmup_steps``, ...) then drives the KFAC param group's ``lr`` from
it. ``weight_decay`` comes from ``TrainingArguments.weight_decay``, as do
``gradient_accumulation_steps`` and, for the Adam-family bases (``"adamw"``,
``"grafting"``), ``betas`` and ``eps`` (``adam_beta1``, ``adam_beta2``, ``adam_epsilon``);
``kfac_kwargs`` overrides any of them. The base update is ``kfac_kwargs["base"]``, else
``KFAC``'s default. Trainer's default ``learning_rate`` (5e-5) is an AdamW fine-tuning rate:
it means the same with the Adam-family bases, whose steps are Adam-scaled, but with the
SGD-momentum base (``base="sgd"``, K-FAC lrs of order 0.1-1) it barely moves the weights,
so ``create_optimizer`` warns when the SGD base meets Trainer's default ``learning_rate``
(``LR_MEANING`` says, per base, what an lr means).

Trainer's ``optimizer.train()/eval()`` calls switch statistics capture on and off around
evaluation. Padding needs no extra code: labels of -100 and
``attention_mask`` are read from the batch, and ``num_items_in_batch`` (the token count
Trainer normalises the loss by) from the model call.

Several processes:

- DDP: launch the same script with ``torchrun --nproc_per_node N`` (on CPU:
  ``TrainingArguments(use_cpu=True, ddp_backend="gloo")``). K-FAC is built before Trainer
  wraps the model in DDP and reduces factor statistics over the ranks. With
  ``average_tokens_across_devices=True`` (the default) Trainer divides each rank's summed
  loss by the global ``num_items_in_batch`` and multiplies it by the number of processes;
  ``create_optimizer`` sets ``loss_divisor_ranks`` so the captured gradients are those of
  the summed loss either way. Tested on 2 gloo processes with gradient accumulation 2 and
  uneven valid tokens per rank: factors and parameters after 3 steps equal a single-process
  ``KFAC`` run on the concatenated batches to 1e-14 in float64
  (``tests/trainer_worker.py``).
- FSDP: under FSDP1 Trainer builds the optimizer on the wrapped model, which K-FAC supports
  with ``use_orig_params=True`` only (``fsdp_config={"use_orig_params": True}``; otherwise
  construction raises ``ValueError`` naming what works). The FSDP1 and FSDP2 paths are tested
  directly (``tests/test_distributed.py``), not through Trainer.

Trainer counts ``num_items_in_batch`` itself: in transformers 5.23 it counts shifted labels
only for models whose ``loss_type`` maps to ``ForCausalLMLoss``; for ``GPT2LMHeadModel``
(``loss_type`` None) it counts every valid label, one per row more than the loss terms, so
the loss is the token mean times ``terms / num_items_in_batch``. K-FAC's factors do not
depend on it (captured gradients are rescaled by the divisor actually used, and G counts
the loss terms from the shifted labels). Hugging Face causal-LM losses upcast logits to
float32, so a float64 model's factors carry ~1e-7 relative rounding.

Needs the ``hf`` extra (``pip install 'kfac-optim[hf]'``); importing this module without
transformers raises ``ImportError`` saying so.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from typing import Any

from .._extras import require
from ..optimizer import KFAC

# The base class is needed at import: this module is the feature (the ``hf`` extra).
_transformers = require("transformers", "hf", "kfac_optim.integrations.transformers")
Trainer = _transformers.Trainer

__all__ = ["KFACTrainer", "LR_MEANING", "trainer_default_lr"]

# Per base update: None when its steps are Adam-scaled (an AdamW lr such as Trainer's
# default means the same), else the lr range it needs instead.
LR_MEANING: dict[str, str | None] = {
    "sgd": "K-FAC with the SGD-momentum base: lrs of order 0.1-1",
    "adamw": None,
    "grafting": None,
}


def trainer_default_lr() -> float:
    """``transformers.TrainingArguments``' default ``learning_rate`` (5e-5), read from the
    dataclass."""
    fields = {f.name: f for f in dataclasses.fields(_transformers.TrainingArguments)}
    return float(fields["learning_rate"].default)


def _kfac_default_base() -> str:
    return inspect.signature(KFAC.__init__).parameters["base"].default


class KFACTrainer(Trainer):
    """``transformers.Trainer`` whose optimizer is ``KFAC`` on the model.

    Args:
        kfac_kwargs: extra ``KFAC`` arguments (``damping``, ``kl_clip``, ``momentum``,
            ``factor_update_steps``, ...); override the values taken from ``args``.
        *args, **kwargs: as for ``Trainer``. Passing ``optimizers=`` as well is refused.

    Raises:
        ValueError: an optimizer was also passed through ``optimizers``.
    """

    def __init__(self, *args: Any, kfac_kwargs: dict | None = None, **kwargs: Any):
        optimizers = kwargs.get("optimizers", (None, None))
        if optimizers[0] is not None:
            raise ValueError("KFACTrainer builds its own optimizer: pass kfac_kwargs, not "
                             "optimizers=(optimizer, scheduler)")
        self.kfac_kwargs = dict(kfac_kwargs or {})
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model: Any = None) -> KFAC:
        """Build ``KFAC`` on the model once (lr, weight decay, Adam settings from ``args``;
        see the module docstring).

        Warns:
            UserWarning: the base update needs another lr scale (``LR_MEANING``) and lr is
                Trainer's default ``learning_rate``, not set through ``kfac_kwargs``.
        """
        if self.optimizer is None:
            args = self.args
            base = self.kfac_kwargs.get("base", _kfac_default_base())
            kw = dict(lr=args.learning_rate, weight_decay=args.weight_decay)
            if base != "sgd":
                kw.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
            kw.update(self.kfac_kwargs)
            needs = LR_MEANING.get(base)
            if needs and "lr" not in self.kfac_kwargs and kw["lr"] == trainer_default_lr():
                warnings.warn(
                    f"KFACTrainer: lr={kw['lr']} is TrainingArguments' default learning_rate, an "
                    f"AdamW fine-tuning rate; with base={base!r} it barely moves the weights "
                    f"({needs}): set learning_rate, or pass kfac_kwargs=dict(base='adamw') to "
                    "keep AdamW's rate", stacklevel=2)
            self.optimizer = KFAC(self.model if model is None else model, **kw)
            pre = self.optimizer.preconditioner
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                pre.loss_divisor_ranks = self.accelerator.num_processes
            if self.args.gradient_accumulation_steps > 1:
                # Without num_items_in_batch Trainer divides a per-batch mean by the steps.
                pre.options.accumulation_steps = self.args.gradient_accumulation_steps
        return self.optimizer
