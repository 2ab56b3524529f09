"""Fit K-FAC factors from data in one pass, for a model trained without K-FAC.

:func:`fit_factors` runs ``kfac_optim.KFACPreconditioner``'s capture hooks over the data
(capture only: no inverse, no optimizer step, no parameter or ``.grad`` touched) and
returns the factors as a ``KFACPreconditioner.state_dict()`` (schema
``kfac_optim.state``), which :func:`fisher_metrics.report`, :class:`KFACFisher` and
``KFACPreconditioner.load_state_dict`` / ``KFAC`` take. Per layer (docs/design.md,
"The mathematics that must hold"; Martens & Grosse 2015):

    A = (1/T) sum_rows a a^T,      G = (1/N) sum_rows g g^T,

summed over every row of every batch (one factor update: the batches are weighted by their
rows, not by an EMA), with ``g`` the gradient of the *summed* per-row loss with respect to
the layer output, ``T`` the valid input rows (``attention_mask``, else ``labels != -100``)
and ``N`` the loss rows (labels shifted by one for causal LMs, ``-100`` and masked rows
excluded). The per-row loss and the valid rows are those of
:mod:`fisher_metrics.operators` (the curvature operators the report's exact checks use).

Fisher type of G:

- ``"mc"`` (default): each loss row's target is drawn once from the model's predictive
  distribution, ``y ~ softmax(f_r)`` (cross-entropy) or ``y ~ N(f_r, I)`` (squared
  error), and ``g`` is the gradient of the loss at the drawn targets: an unbiased
  estimate of the type-2 / true-Fisher G, ``(1/N) sum_r J_r^T H_r J_r`` (Martens & Grosse
  2015, Sec. 5; Kunstner, Hennig & Balles 2019).
- ``"empirical"``: the data labels (the empirical Fisher's G; not the Fisher, Kunstner et
  al. 2019).

Layers follow ``kfac_optim``'s registry (``kfac_optim.layers``); a head with at least
``hybrid_min_out`` outputs (default 4096: a 50k vocabulary) keeps a low-rank
``G = U U^T / N`` with ``U`` (o x N) the stacked output gradients (the Woodbury policy),
so the head's G costs ``o N`` floats, never ``o^2``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from kfac_optim.layers import IGNORE_INDEX, KFACCoverageWarning
from kfac_optim.preconditioner import KFACPreconditioner

from ._validation import check_choice, check_seed
from .operators import EmpiricalFisherOperator, RowLoss, batch_list

__all__ = ["FISHER_TYPES", "fit_factors", "sample_targets"]

FISHER_TYPES = ("mc", "empirical")
_FIXED = ("loss_reduction", "factor_update_steps", "accumulation_steps", "grad_scaler",
          "kl_clip", "lr", "process_group")


def sample_targets(loss: RowLoss, outputs: Tensor, generator: torch.Generator) -> Tensor:
    """One target per row drawn from the model's predictive distribution.

    Args:
        loss: the per-row loss (``"cross_entropy"``: ``y ~ softmax(outputs)``;
            ``"mse"``: ``y ~ N(outputs, I)``).
        outputs: ``(R, C)`` valid-row model outputs (logits).
        generator: a CPU ``torch.Generator`` (the draws are reproducible).

    Returns:
        ``(R,)`` int64 class ids, or ``(R, C)`` float targets.

    Raises:
        ValueError: a callable loss (no likelihood to sample from).
    """
    return loss.sample(outputs.detach(), 1, generator)[0]


def _token_mask(raw: object, kwargs: Mapping) -> Tensor | None:
    """The ``(B, S)`` mask of valid input rows, as ``KFACPreconditioner`` reads it."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, Tensor):
        return mask
    labels = raw.get("labels") if isinstance(raw, Mapping) else None
    if isinstance(labels, Tensor) and labels.dim() == 2 and not labels.is_floating_point():
        return labels != IGNORE_INDEX
    return None


def fit_factors(
    model: nn.Module,
    data: object,
    *,
    loss: str | Callable[[Tensor, Tensor], Tensor] | None = None,
    fisher: str = "mc",
    seed: int = 0,
    shift_labels: bool | None = None,
    progress: Callable[[int], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """K-FAC factors ``A``, ``G`` of every supported layer, fitted from ``data`` in one pass.

    Args:
        model: the model (``nn.Module``; Hugging Face models included). It is run in eval
            mode (dropout off) with only the K-FAC layers' hooks capturing; its training
            flags, parameters and ``.grad`` are left as they were.
        data: ``(inputs, targets)``, a dict batch with ``labels``, or an iterable of
            either, as for :func:`fisher_metrics.make_operator`: integer targets ``(*)``
            with outputs ``(*, C)`` (cross-entropy; ``-100`` rows ignored; causal-LM dict
            batches shifted by one) or float targets ``(B, ...)`` (squared error).
        loss: ``None`` (cross-entropy for integer targets, squared error for float),
            ``"cross_entropy"``, ``"mse"`` (``0.5 ||f - y||^2`` per row), or a callable
            ``loss(outputs (R, C), targets) -> (R,)`` (``fisher="empirical"`` only).
        fisher: ``"mc"`` (targets sampled from the model, one draw per row) or
            ``"empirical"`` (the data labels).
        seed: seed of the Monte-Carlo draws (a CPU ``torch.Generator``).
        shift_labels: as for :func:`fisher_metrics.make_operator` (``None``: shift for
            Hugging Face causal LMs).
        progress: called with 1 after each batch (e.g. a tqdm bar's ``update``), or None.
        **options: ``kfac_optim.KFACOptions`` fields for the capture (default
            ``inverse_policy="hybrid"``: a low-rank G for layers with
            ``o >= hybrid_min_out``); e.g. ``kfac_approx``, ``factor_dtype``,
            ``skip_layers``, ``woodbury_rank`` (truncate a head's G to its top r
            eigenpairs when the data has more than ``woodbury_max_rank`` rows).
            ``loss_reduction``, ``factor_update_steps``, ``accumulation_steps``,
            ``grad_scaler``, ``kl_clip``, ``lr`` and ``process_group`` are fixed here.

    Returns:
        A ``KFACPreconditioner.state_dict()`` (``{"version", "steps": 0, "layers",
        "owners": None}``, one factor update per layer, no inverses) with one more
        entry, ``"fit"``: ``{"source": "fitted", "fisher": "mc" | "empirical", "loss",
        "num_batches", "num_rows" (N, loss rows), "seed", "seconds"}``, the provenance
        the report prints. ``torch.save`` it and load it with ``torch.load(...,
        weights_only=True)``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; bad ``data`` / ``loss`` (as for
            :func:`fisher_metrics.make_operator`).
        ValueError: ``fisher`` not in :data:`FISHER_TYPES`; ``fisher="mc"`` with a
            callable loss; a fixed option passed in ``options``; bad K-FAC options
            (naming them); ``data`` without a valid row
            (:class:`~fisher_metrics.EmptyBatchError`); or no layer that K-FAC captures.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    fisher = check_choice("fisher", fisher, FISHER_TYPES)
    seed = check_seed("seed", seed)
    fixed = sorted(set(options) & set(_FIXED))
    if fixed:
        raise ValueError(f"options {fixed} are fixed by fit_factors (it sums the per-row "
                         "losses itself and makes one factor update); leave them out")
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be None or a callable; got {type(progress).__name__}")
    started = time.perf_counter()
    raw = batch_list(data)
    # Valid rows, targets and the label shift exactly as the curvature operators see them
    # (one no-grad forward per batch, before any hook is installed).
    prepared = EmpiricalFisherOperator(model, raw, loss_fn=loss, shift_labels=shift_labels)
    row_loss = prepared.loss
    if fisher == "mc" and row_loss.name == "callable":
        raise ValueError("fisher='mc' samples targets from the model's likelihood: use loss in "
                         "('cross_entropy', 'mse') or fisher='empirical' with a callable loss")
    options.setdefault("inverse_policy", "hybrid")
    with warnings.catch_warnings():  # "left to the base update": no update here; the
        warnings.simplefilter("ignore", KFACCoverageWarning)  # report lists what it covers
        pre = KFACPreconditioner(model, loss_reduction="sum", factor_update_steps=1,
                                 kl_clip=None, process_group=None, **options)
    if not pre.layer_names:
        pre.remove()
        raise ValueError("K-FAC captures no layer of this model (no trainable nn.Linear, "
                         "Conv1d/2d, Embedding or Hugging Face Conv1D): nothing to fit")
    modes = [(module, module.training) for module in model.modules()]
    captured = [view.module for view in pre.layers.values()]
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)

    def call(_params: dict, args: tuple, kwargs: dict) -> object:
        return model(*args, **kwargs)

    try:
        model.eval()
        for module in captured:  # hooks capture in training mode only; dropout stays off
            module.training = True
        for batch, source in zip(prepared.batches, raw, strict=True):
            pre.set_token_mask(_token_mask(source, batch.kwargs), num_loss_rows=batch.num_rows)
            outputs = batch.rows(call, {})  # (R, C), the hooks see this forward
            targets = batch.targets if fisher == "empirical" else sample_targets(
                row_loss, outputs, generator)
            total = row_loss.row_losses(outputs, targets).sum()
            if total.requires_grad:  # the gradients only reach the hooks; .grad untouched
                torch.autograd.grad(total, params, allow_unused=True)
            if progress is not None:
                progress(1)
        pre.update_factors()
        state = pre.state_dict()
    finally:
        pre.remove()
        for module, training in modes:
            module.training = training
    state["fit"] = {
        "source": "fitted",
        "fisher": fisher,
        "loss": row_loss.name,
        "num_batches": prepared.num_batches,
        "num_rows": prepared.num_rows,
        "seed": seed,
        "seconds": time.perf_counter() - started,
    }
    return state
