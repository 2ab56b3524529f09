"""Hugging Face ``Trainer`` with K-FAC.

``Trainer(optimizer_cls_and_kwargs=...)`` builds optimizers from parameter groups, but
K-FAC needs the model (its hooks live on modules), and under FSDP Trainer requires the
optimizer to be created in ``create_optimizer``. So the recipe is a subclass::

    from kfac_optim.integrations.transformers import KFACTrainer
    trainer = KFACTrainer(model=model, args=args, train_dataset=ds,
                          kfac_kwargs=dict(damping=1e-3, factor_update_steps=10))
    trainer.train()

``lr`` and ``weight_decay`` come from ``TrainingArguments`` (``learning_rate``,
``weight_decay``), as do ``gradient_accumulation_steps``; Trainer's LR scheduler drives
the KFAC param group. Trainer's ``optimizer.train()/eval()`` calls switch statistics
capture on and off around evaluation. Padding needs no extra code: labels of -100 and
``attention_mask`` are read from the batch, and ``num_items_in_batch`` (the token count
Trainer normalises the loss by) from the model call.
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer

from ..optimizer import KFAC

__all__ = ["KFACTrainer"]


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
        if self.optimizer is None:
            kw = dict(lr=self.args.learning_rate, weight_decay=self.args.weight_decay)
            kw.update(self.kfac_kwargs)
            self.optimizer = KFAC(self.model if model is None else model, **kw)
            pre = self.optimizer.preconditioner
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                pre.loss_divisor_ranks = self.accelerator.num_processes
            if self.args.gradient_accumulation_steps > 1:
                # Without num_items_in_batch Trainer divides a per-batch mean by the steps.
                pre.options.accumulation_steps = self.args.gradient_accumulation_steps
        return self.optimizer
