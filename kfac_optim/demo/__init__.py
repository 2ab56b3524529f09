"""K-FAC vs AdamW vs SGD-momentum at equal steps: ``python -m kfac_optim.demo``.

Every optimizer trains the same initial model (same seed) on the same batches for
the same number of steps, with the same LR schedule shape (linear warm-up, then
cosine decay to 10% of the peak); only the optimizer and its tuned
hyperparameters differ (tuning grid and results: ``benchmarks/README.md``, "Demo
tuning"). Held-out loss is evaluated every ``--eval-every`` steps and at the end
under ``model.eval()`` and ``torch.no_grad()``; evaluation time is not counted in
the training wall time.

Wall time: the sequential runs' clocks feel whatever else the machine does at their
time, so the equal-time comparison does not use them. After training, the optimizers
run again interleaved in one process (``time_interleaved``: ``--time-rounds`` rounds,
3 by default, each running every optimizer for a block of ``--time-steps`` steps,
K-FAC's ``inv_update_steps`` by default) and the median per-round ratio of step times
to AdamW's decides how many steps each gets in equal time. The load average at start
and end is printed, and the timings are flagged ``UNRELIABLE`` when it exceeds the
core count or a ratio varies by more than ``RATIO_SPREAD_LIMIT`` (25%) between rounds.

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
- ``finetune``: pretrain the ``lm`` model on the pydoc text with AdamW (cached, see
  :mod:`~kfac_optim.demo.finetune`), then fine-tune it on another domain, the Python
  standard library's own ``.py`` sources (held out by file), with AdamW over a small lr
  grid and with K-FAC as a swap-in at AdamW's best lr.
- ``digits``: scikit-learn's 8x8 digits with an MLP 64-256-256-10 (or ``--model
  cnn``), stratified 20% held out.

Outputs in ``--out`` (default ``runs/demo``): ``results.json``, ``losses.png``,
the K-FAC-trained model (``kfac_model/``: ``save_pretrained`` for the LM,
``model.pt`` + ``config.json`` for digits; see ``load_digits_model``) and the
K-FAC preconditioner state (``kfac_preconditioner.pt``, ``torch.save`` of
``KFACPreconditioner.state_dict()``).

Needs the ``demo`` extra (``pip install 'kfac-optim[demo]'``: transformers, tokenizers,
matplotlib, scikit-learn, tqdm); without it the demo raises ``ImportError`` saying so.

Modules: :mod:`~kfac_optim.demo.data` (the offline data sets),
:mod:`~kfac_optim.demo.tasks` (tuned hyperparameters, models, tasks, optimizers),
:mod:`~kfac_optim.demo.training` (the training loop) and :mod:`~kfac_optim.demo.cli`
(plot, table, command line; ``__main__`` runs it).
"""

from . import tasks
from .cli import format_table, main, parse_args, plot_losses
from .tasks import *  # noqa: F403 (the tasks' public names, listed in tasks.__all__)
from .training import (
    RATIO_SPREAD_LIMIT,
    reach,
    time_interleaved,
    timing_reliability,
    train_one,
    val_loss_at_step,
    val_loss_at_time,
)

__all__ = [*tasks.__all__, "RATIO_SPREAD_LIMIT", "format_table", "main", "parse_args",
           "plot_losses", "reach", "time_interleaved", "timing_reliability", "train_one",
           "val_loss_at_step", "val_loss_at_time"]
