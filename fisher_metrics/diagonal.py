"""Diagonal Fisher from per-row squared gradients: one-shot, EMA and Welford, one Fisher per task.

For ``R`` valid rows ``r`` (samples, or tokens for sequence models; the rows,
losses and label conventions of :mod:`fisher_metrics.operators`) the diagonal
of a Fisher-type curvature of the mean loss is a mean of per-row squares,

    F_ii = (1/R) sum_r c_r,i,

with the per-row contribution ``c_r`` (parameter-shaped) of each ``fisher``:

- ``"empirical"``: ``c_r = g_r^2``, ``g_r = grad_theta l(f_r, y_r)`` with the data
  label (diagonal of :class:`~fisher_metrics.operators.EmpiricalFisherOperator`);
- ``"mc"``: ``c_r = (1/S) sum_s g_rs^2`` with labels ``y_rs ~ p(y | f_r)`` drawn
  once from a seeded generator, exactly as
  :class:`~fisher_metrics.operators.FisherMCOperator` draws them (its diagonal
  for the same data and seed); an unbiased estimate of the GGN diagonal;
- ``"ggn"``: ``c_r = sum_c (B_r^T J_r)_c^2`` with ``H_r = B_r B_r^T`` the output
  Hessian of the loss and ``J_r`` the output Jacobian: the exact diagonal of
  ``G = (1/R) sum_r J_r^T H_r J_r`` (= the Fisher for cross-entropy and squared
  error; Martens 2020, Sec. 9.2). ``B_r^T J_r`` is the Jacobian of
  ``h_r(theta) = B_r^T f_r(theta)`` with ``B_r`` held fixed (cross-entropy:
  ``h_rc = sqrt(p_c) (f_rc - sum_c' p_c' f_rc')``, ``p = softmax(f_r)``; squared
  error: ``h_r = f_r``), so ``C`` per-row gradients give it.

Squares are taken per row and per entry before any sum (never the square of a
mean gradient: ``(E g)^2 <= E g^2``, with equality only when every row agrees).
Per-row gradients come from ``torch.func``: ``per_sample="vmap"`` maps
``jacrev`` of a one-sample forward over the samples of a batch (the per-sample
gradient recipe; each sample's valid rows differentiated together), and
``per_sample="rows"`` runs one batched forward and ``jacrev`` over its valid
rows (any model, including Hugging Face models, whose mask code does not run
under ``vmap``). Both give the same numbers. Accumulation is in float32 (float64
for float64 models); storage may be float16 / bfloat16 / float32 / float64 on any
device (arithmetic is upcast, the result stored back).

Accumulation modes of :class:`DiagonalFisherCollector` (per task key):

- ``"oneshot"``: ``F = (sum of c_r over every row seen) / R``: the exact mean;
- ``"ema"``: each :meth:`~DiagonalFisherCollector.update` call ``t`` gives a
  token-normalised batch Fisher ``F_t = (1/R_t) sum_{r in t} c_r`` and
  ``m_t = decay m_{t-1} + (1 - decay) F_t`` (``m_0 = 0``); the reported Fisher
  is bias-corrected, ``m_t / (1 - decay^t)`` (Kingma & Ba 2015, Sec. 3), i.e. a
  weighted mean of the ``F_t`` with weights ``(1 - decay) decay^(t-k)`` normalised;
- ``"welford"``: running mean of the ``c_r`` over rows with Chan et al.'s
  pairwise update (Chan, Golub & LeVeque 1979; Welford 1962), which also keeps
  ``M2 = sum_r (c_r - mean)^2``: the per-row variance ``M2 / (R - 1)`` and the
  standard error ``sqrt(var / R)`` of each ``F_ii`` (e.g. the sampling error of
  the MC Fisher). Same mean as ``"oneshot"``, numerically more stable.

The model is evaluated in eval mode (dropout off) at its current parameters,
as for the curvature operators. Units: ``F_ii`` in loss per squared parameter
unit; ``delta^T F delta`` in loss units.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jacrev, vmap

from ._validation import check_choice, check_int, check_positive_float, check_seed
from .operators import (
    CurvatureOperator,
    EmptyBatchError,
    PreparedBatch,
    batch_list,
    evaluation_mode,
    make_operator,
    resolve_parameters,
)
from .representation import FisherRepresentation

__all__ = [
    "DiagonalFisher",
    "DiagonalFisherCollector",
    "FISHER_TYPES",
    "MODES",
    "PER_SAMPLE",
    "RowGradients",
    "per_row_gradients",
]

FISHER_TYPES = ("empirical", "mc", "ggn")
MODES = ("oneshot", "ema", "welford")
PER_SAMPLE = ("auto", "vmap", "rows")
STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CURVATURE = {"empirical": "empirical_fisher", "mc": "fisher_mc", "ggn": "ggn"}


# --------------------------------------------------------------------------- per-row gradients


@dataclass
class RowGradients:
    """Per-row Jacobians of one batch.

    Attributes:
        jacobians: ``{parameter name: (R_b, K, *shape)}``: for each valid row
            the gradients of its ``K`` outputs (``K = 1`` loss for the empirical
            Fisher, ``S`` sampled losses for MC, ``C`` outputs of ``h_r`` for the GGN).
        sample: ``(R_b,)`` int64: the sample (index in the batch) of each row.
        num_samples: samples in the batch (rows of samples without a valid row
            included).
        scale: divide ``sum_K J^2`` by this (``S`` for MC, else 1).
    """

    jacobians: dict[str, Tensor]
    sample: Tensor
    num_samples: int
    scale: int

    @property
    def num_rows(self) -> int:
        return int(self.sample.numel())


def _row_outputs(fisher: str, loss, rows: Tensor, targets: Tensor, sampled: Tensor | None):
    """``(R, K)`` per-row quantities whose gradients square into ``c_r`` (module docstring)."""
    if fisher == "empirical":
        return loss.row_losses(rows, targets)[:, None]
    if fisher == "mc":
        repeated = rows.repeat(sampled.shape[0], *([1] * (rows.dim() - 1)))
        losses = loss.row_losses(repeated, sampled.reshape(-1, *sampled.shape[2:]))
        return losses.reshape(sampled.shape[0], -1).T
    # h_r = B_r^T f_r with B_r at the current outputs (detached): its Jacobian is B_r^T J_r.
    return loss.sqrt_hessian_times(rows.detach(), rows[:, :, None])[:, :, 0]


def _layout(op: CurvatureOperator, batch: PreparedBatch) -> tuple[int, int]:
    """``(N, P)``: samples in the batch and row positions per sample (after the label shift)."""
    with torch.no_grad(), evaluation_mode(op.model):
        out = batch.outputs(op.call, op.params)
    if not batch.class_layout:
        return out.shape[0], 1
    return out.shape[0], math.prod(out.shape[1:-1])


def _vmappable(batch: PreparedBatch) -> bool:
    return bool(batch.args) and not batch.kwargs


def _jacobians_rows(op, batch, fisher, chunk_size) -> dict[str, Tensor]:
    def outputs(params: dict) -> Tensor:
        rows = batch.rows(op.call, params)
        return _row_outputs(fisher, op.loss, rows, batch.targets, batch.sampled)

    # torch.func differentiates inside no_grad; the outer no_grad keeps autograd from also
    # recording the Jacobians' dependence on the parameters left out of op.params.
    with torch.no_grad(), evaluation_mode(op.model):
        return jacrev(outputs, chunk_size=chunk_size)(op.params)


def _jacobians_vmap(op, batch, fisher, chunk_size, num_samples, positions) -> dict[str, Tensor]:
    """Per-sample ``jacrev`` of a one-sample forward, mapped over the samples with ``vmap``."""
    flags = tuple(
        isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == num_samples for a in batch.args
    )
    total = num_samples * positions
    device = batch.targets.device
    if batch.class_layout:
        valid = torch.zeros(total, dtype=torch.bool, device=device)
        valid[batch.row_index] = True
        targets = torch.zeros(total, dtype=batch.targets.dtype, device=device)
        targets[batch.row_index] = batch.targets
        targets = targets.reshape(num_samples, positions)
    else:
        valid = torch.ones(total, dtype=torch.bool, device=device)
        targets = batch.targets.reshape(num_samples, 1, -1)
    valid = valid.reshape(num_samples, positions)
    sampled = None
    if batch.sampled is not None:
        sampled = batch.sampled.new_zeros((batch.sampled.shape[0], total, *batch.sampled.shape[2:]))
        index = batch.row_index if batch.class_layout else torch.arange(total, device=device)
        sampled[:, index] = batch.sampled
        sampled = sampled.reshape(sampled.shape[0], num_samples, positions, *sampled.shape[2:])

    def one(params: dict, args: tuple, y: Tensor, mask: Tensor, s: Tensor | None) -> Tensor:
        batched = tuple(a.unsqueeze(0) if f else a for a, f in zip(args, flags, strict=True))
        out = batch.outputs(op.call, params, batched)  # vmappable: no keyword inputs
        rows = out.reshape(-1, out.shape[-1]) if batch.class_layout else out.reshape(1, -1)
        return _row_outputs(fisher, op.loss, rows, y, s) * mask[:, None].to(rows.dtype)

    in_dims = (None, tuple(0 if f else None for f in flags), 0, 0, None if sampled is None else 1)
    mapped = vmap(jacrev(one), in_dims=in_dims, chunk_size=chunk_size)
    with torch.no_grad(), evaluation_mode(op.model):
        jac = mapped(op.params, batch.args, targets, valid, sampled)
    keep = valid.reshape(-1)
    return {name: j.flatten(0, 1)[keep] for name, j in jac.items()}


def _batch_gradients(op, batch, fisher, per_sample, chunk_size) -> RowGradients:
    num_samples, positions = _layout(op, batch)
    route = per_sample
    if route == "auto":
        route = "vmap" if _vmappable(batch) else "rows"
    if route == "vmap":
        if not _vmappable(batch):
            raise ValueError(
                "per_sample='vmap' needs tensor (or tuple of tensor) inputs whose first "
                "dimension is the sample; dict batches (Hugging Face models) use per_sample='rows'"
            )
        jac = _jacobians_vmap(op, batch, fisher, chunk_size, num_samples, positions)
    else:
        jac = _jacobians_rows(op, batch, fisher, chunk_size)
    if batch.class_layout:
        sample = torch.div(batch.row_index, positions, rounding_mode="floor")
    else:
        sample = torch.arange(batch.num_rows, device=batch.targets.device)
    scale = getattr(op, "mc_samples", 1) if fisher == "mc" else 1
    return RowGradients(jac, sample, num_samples, scale)


def _build_operator(model, data, fisher, names, loss_fn, shift_labels, mc_samples, seed):
    """The curvature operator holding the prepared batches, or ``None`` when no row is valid."""
    try:
        return make_operator(
            model,
            data,
            _CURVATURE[fisher],
            params=names,
            loss_fn=loss_fn,
            shift_labels=shift_labels,
            mc_samples=mc_samples,
            seed=seed,
        )
    except EmptyBatchError:
        return None


def per_row_gradients(
    model: nn.Module,
    data: object,
    *,
    fisher: str = "empirical",
    params=None,
    loss_fn=None,
    shift_labels: bool | None = None,
    mc_samples: int = 1,
    seed: int = 0,
    per_sample: str = "auto",
    chunk_size: int | None = None,
) -> list[RowGradients]:
    """Per-row gradients of every batch of ``data`` (see the module docstring).

    Args:
        model, data, params, loss_fn, shift_labels: as for
            :class:`~fisher_metrics.operators.CurvatureOperator`.
        fisher: one of :data:`FISHER_TYPES`: which per-row quantities are
            differentiated (the loss with data labels, with sampled labels, or ``h_r``).
        mc_samples, seed: label sampling for ``"mc"``.
        per_sample: one of :data:`PER_SAMPLE`.
        chunk_size: vectorise at most this many samples (``"vmap"``) or row
            outputs (``"rows"``) at once (``None``: all); bounds peak memory.

    Cost: one forward per batch to read the row layout, then the vectorised
    per-row backward passes; memory ``R_b x K x n`` per batch (``chunk_size``
    bounds the vectorised working set, not the result).

    Returns:
        One :class:`RowGradients` per batch (empty list when no row is valid).

    Raises:
        TypeError / ValueError: bad arguments (naming them); ``fisher="mc"`` or
            ``"ggn"`` with a callable loss; ``per_sample="vmap"`` on dict batches.
    """
    fisher = check_choice("fisher", fisher, FISHER_TYPES)
    per_sample = check_choice("per_sample", per_sample, PER_SAMPLE)
    if chunk_size is not None:
        chunk_size = check_int("chunk_size", chunk_size)
    if fisher != "empirical" and callable(loss_fn):
        raise ValueError(
            f"fisher={fisher!r} needs the output Hessian or a likelihood to sample from: use "
            "loss_fn in ('cross_entropy', 'mse'); a callable loss supports fisher='empirical'"
        )
    op = _build_operator(
        model,
        data,
        fisher,
        params,
        loss_fn,
        shift_labels,
        check_int("mc_samples", mc_samples),
        check_seed("seed", seed),
    )
    if op is None:
        return []
    return [_batch_gradients(op, b, fisher, per_sample, chunk_size) for b in op.batches]


# --------------------------------------------------------------------------- representation


def _module_layers(names: list[str]) -> dict[str, list[str]]:
    layers: dict[str, list[str]] = {}
    for name in names:
        layers.setdefault(name.rpartition(".")[0], []).append(name)
    return layers


class DiagonalFisher(FisherRepresentation):
    """A diagonal Fisher ``diag(F_ii)``: one value per parameter entry, blocks per module.

    Build it with :meth:`collect` (one pass over data), from a
    :class:`DiagonalFisherCollector` (EMA / Welford / one Fisher per task), or
    directly from parameter-shaped values.

    Args:
        values: ``{parameter name: F_ii tensor shaped like the parameter}``.
        model: the model the values belong to (for tied-parameter aliases and
            ``named_parameters()`` order); optional.
        num_rows: ``R``, rows the values average over.
        fisher_type, task, mode: provenance (see the module docstring).
        variance: per-row variance of the contributions (Welford mode), same layout.
        steps: updates accumulated (EMA steps).
        num_samples: samples seen.

    Attributes:
        values: the stored ``F_ii`` (storage dtype and device).
        variance: ``None`` or the stored per-row variance.
        layers: module names (parameters grouped by the module that owns them).
        dtype: arithmetic dtype of products (float64 for float64 storage, else float32).
        device: storage device.

    Raises:
        TypeError / ValueError: values that are not floating-point tensors, or
            names / shapes that do not match ``model``'s parameters.
    """

    def __init__(
        self,
        values: Mapping[str, Tensor],
        *,
        model: nn.Module | None = None,
        num_rows: int = 0,
        fisher_type: str = "empirical",
        task: str = "default",
        mode: str = "oneshot",
        variance: Mapping[str, Tensor] | None = None,
        steps: int = 1,
        num_samples: int = 0,
    ) -> None:
        if not isinstance(values, Mapping) or not values:
            raise TypeError("values must be a non-empty dict {parameter name: tensor}")
        for name, value in values.items():
            if not isinstance(value, Tensor) or not value.is_floating_point():
                raise TypeError(f"values[{name!r}] must be a floating-point tensor")
        if model is not None:
            if not isinstance(model, nn.Module):
                raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
            named = list(model.named_parameters())
            canonical = {id(p): n for n, p in named}
            alias = {n: canonical[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
            lookup = dict(named)
            resolved = {}
            for name, value in values.items():
                if name not in alias:
                    raise ValueError(f"values has {name!r}, which is not a parameter of model")
                if lookup[alias[name]].shape != value.shape:
                    raise ValueError(
                        f"values[{name!r}] has shape {tuple(value.shape)}; the parameter has "
                        f"{tuple(lookup[alias[name]].shape)}"
                    )
                resolved[alias[name]] = value
            order = [n for n, _ in named if n in resolved]
            self.aliases = {a: n for a, n in alias.items() if n in resolved}
        else:
            resolved, order = dict(values), list(values)
            self.aliases = {name: name for name in order}
        self.values = {name: resolved[name] for name in order}
        self.variance = None if variance is None else {n: variance[n] for n in order}
        self.param_names = order
        self.param_shapes = {name: v.shape for name, v in self.values.items()}
        self.layer_params = _module_layers(order)
        self.layers = list(self.layer_params)
        first = next(iter(self.values.values()))
        self.storage_dtype = first.dtype
        self.dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        self.device = first.device
        self.num_rows = int(num_rows)
        self.num_samples = int(num_samples)
        self.fisher_type = fisher_type
        self.task = task
        self.mode = mode
        self.steps = int(steps)

    # ------------------------------------------------------------ constructors

    @classmethod
    def collect(
        cls,
        model: nn.Module,
        data: object,
        fisher: str = "empirical",
        *,
        task: str = "default",
        **options: Any,
    ) -> DiagonalFisher:
        """Diagonal Fisher of the mean loss over ``data`` (one pass).

        With ``mode="ema"`` every batch of ``data`` is one EMA step.

        Args:
            model, fisher: see :class:`DiagonalFisherCollector`.
            data: as for :class:`~fisher_metrics.operators.CurvatureOperator`.
            task: the task key recorded on the result.
            **options: the other keyword arguments of :class:`DiagonalFisherCollector`
                (``mode``, ``decay``, ``params``, ``loss_fn``, ``shift_labels``,
                ``mc_samples``, ``seed``, ``per_sample``, ``chunk_size``,
                ``storage_dtype``, ``storage_device``), with its defaults.

        Returns:
            The :class:`DiagonalFisher` (zeros, with a warning, when ``data``
            has no valid row).

        Raises:
            TypeError / ValueError: bad arguments, naming them.
        """
        collector = DiagonalFisherCollector(model, fisher=fisher, **options)
        if collector.mode == "ema":
            for batch in batch_list(data):
                collector.update(batch, task=task)
        else:
            collector.update(data, task=task)
        return collector.fisher(task)

    # ------------------------------------------------------------ access

    def diagonal(self) -> dict[str, Tensor]:
        """``{parameter name: F_ii}`` in the arithmetic :attr:`dtype` (storage device)."""
        return {name: v.to(self.dtype) for name, v in self.values.items()}

    def stderr(self) -> dict[str, Tensor]:
        """Standard error ``sqrt(var / R)`` of each ``F_ii`` (Welford mode only).

        Raises:
            ValueError: the Fisher was not accumulated with ``mode="welford"``.
        """
        if self.variance is None:
            raise ValueError("stderr needs a Fisher accumulated with mode='welford'")
        rows = max(self.num_rows, 1)
        return {n: (v.to(self.dtype) / rows).sqrt() for n, v in self.variance.items()}

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> DiagonalFisher:
        """A copy with values (and variance) moved to ``device`` / cast to ``dtype``."""
        if dtype is not None and dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {STORAGE_DTYPES}; got {dtype}")

        def move(tensors):
            return None if tensors is None else {n: t.to(device, dtype) for n, t in tensors.items()}

        out = DiagonalFisher(
            move(self.values),
            num_rows=self.num_rows,
            fisher_type=self.fisher_type,
            task=self.task,
            mode=self.mode,
            variance=move(self.variance),
            steps=self.steps,
            num_samples=self.num_samples,
        )
        out.aliases = dict(self.aliases)
        return out

    def groups(self, model: nn.Module, *, attention: bool = True, num_heads: int | None = None):
        """Channel / head reduction: :meth:`fisher_metrics.GroupFisher.from_diagonal`."""
        from .groups import GroupFisher

        return GroupFisher.from_diagonal(self, model, attention=attention, num_heads=num_heads)

    # ------------------------------------------------------------ representation

    def eigenvalues(self, layer: str, k: int | None = None) -> Tensor:
        """The ``F_ii`` of ``layer``'s parameters, descending (float64 CPU)."""
        names = self.layer_params[self._check_layer(layer)]
        values = torch.cat([self.values[n].reshape(-1).to("cpu", torch.float64) for n in names])
        values = torch.sort(values, descending=True).values
        return values if k is None else values[: check_int("k", k)]

    def _layer_mvp(self, layer: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        return {n: self.values[n].to(self.dtype) * tensors[n] for n in self.layer_params[layer]}

    def trace(self, layer: str | None = None) -> float:
        """``sum_i F_ii`` of one layer or of the whole model."""
        names = [n for lay in self._selected(layer) for n in self.layer_params[lay]]
        return float(sum(float(self.values[n].double().sum()) for n in names))

    def __repr__(self) -> str:
        return (
            f"DiagonalFisher(task={self.task!r}, fisher={self.fisher_type!r}, mode={self.mode!r}, "
            f"params={len(self.param_names)}, n={self.num_params}, rows={self.num_rows}, "
            f"storage={self.storage_dtype}, device={self.device})"
        )


# --------------------------------------------------------------------------- collector


@dataclass
class _TaskState:
    """Running statistics of one task (tensors in the storage dtype / device)."""

    acc: dict[str, Tensor]
    m2: dict[str, Tensor] | None = None
    rows: int = 0
    samples: int = 0
    steps: int = 0
    contributions: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    contribution_rows: dict[str, int] = field(default_factory=dict)


class DiagonalFisherCollector:
    """Accumulates diagonal Fishers over batches, one per task key.

    Args:
        model: the model (its current parameters are used at each update).
        fisher: one of :data:`FISHER_TYPES` (``"empirical"``, ``"mc"``, ``"ggn"``).
        mode: one of :data:`MODES` (``"oneshot"``, ``"ema"``, ``"welford"``).
        decay: EMA decay in ``[0, 1)`` (``"ema"`` only).
        params: parameter selection (see :func:`~fisher_metrics.resolve_parameters`).
        loss_fn, shift_labels: as for :class:`~fisher_metrics.operators.CurvatureOperator`.
        mc_samples: label samples per row for ``"mc"`` (``S >= 1``).
        seed: seed of the label sampler; update ``t`` (0-based, counted over all
            tasks) draws with ``seed + t``.
        per_sample: one of :data:`PER_SAMPLE` (``"auto"``: ``"vmap"`` for tensor
            inputs, ``"rows"`` for dict batches).
        chunk_size: see :func:`per_row_gradients`.
        storage_dtype: dtype of the stored statistics (float16 / bfloat16 to save
            memory on large models; arithmetic stays in float32). Default:
            float32, or float64 for float64 models. float16 flushes values below
            about ``6e-8`` to zero: prefer bfloat16 for Fishers spanning many decades.
        storage_device: where statistics live (e.g. ``"cpu"``); default: the
            device of the first selected parameter.
        keep_contributions: keep each sample's contribution
            ``C_i = sum over its valid rows of c_r`` (parameter-shaped) in
            :attr:`contributions` ``[task][f"{task}_{i}"][parameter name]``
            (``i`` counts the task's samples over updates; a sample without a valid
            row stores zeros). Costs one parameter-sized tensor per sample.

    Attributes:
        tasks: task keys seen, in order.
        contributions: ``{task: {sample key: {parameter name: C_i}}}``.
        contribution_rows: ``{task: {sample key: valid rows of the sample}}``.

    Raises:
        TypeError / ValueError: bad arguments, naming them.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        fisher: str = "empirical",
        mode: str = "oneshot",
        decay: float = 0.99,
        params=None,
        loss_fn: str | Callable[[Tensor, Tensor], Tensor] | None = None,
        shift_labels: bool | None = None,
        mc_samples: int = 1,
        seed: int = 0,
        per_sample: str = "auto",
        chunk_size: int | None = None,
        storage_dtype: torch.dtype | None = None,
        storage_device: torch.device | str | None = None,
        keep_contributions: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        self.model = model
        self.fisher_type = check_choice("fisher", fisher, FISHER_TYPES)
        self.mode = check_choice("mode", mode, MODES)
        decay = check_positive_float("decay", decay, allow_zero=True)
        if decay >= 1.0:
            raise ValueError(f"decay must lie in [0, 1); got {decay}")
        self.decay = decay
        self.param_names = resolve_parameters(model, params)
        if self.fisher_type != "empirical" and callable(loss_fn):
            raise ValueError(
                f"fisher={fisher!r} needs loss_fn in ('cross_entropy', 'mse'); a callable loss "
                "supports fisher='empirical' only"
            )
        self.loss_fn, self.shift_labels = loss_fn, shift_labels
        self.mc_samples = check_int("mc_samples", mc_samples)
        self.seed = check_seed("seed", seed)
        self.per_sample = check_choice("per_sample", per_sample, PER_SAMPLE)
        self.chunk_size = None if chunk_size is None else check_int("chunk_size", chunk_size)
        lookup = dict(model.named_parameters())
        first = lookup[self.param_names[0]]
        self._shapes = {name: lookup[name].shape for name in self.param_names}
        self.acc_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        if storage_dtype is not None and storage_dtype not in STORAGE_DTYPES:
            raise ValueError(
                f"storage_dtype must be None or one of {STORAGE_DTYPES}; got {storage_dtype}"
            )
        self.storage_dtype = storage_dtype or self.acc_dtype
        self.storage_device = torch.device(storage_device) if storage_device else first.device
        if not isinstance(keep_contributions, bool):
            raise TypeError(f"keep_contributions must be True or False; got {keep_contributions!r}")
        self.keep_contributions = keep_contributions
        self._tasks: dict[str, _TaskState] = {}
        self._updates = 0

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    @property
    def contributions(self) -> dict[str, dict[str, dict[str, Tensor]]]:
        return {task: state.contributions for task, state in self._tasks.items()}

    @property
    def contribution_rows(self) -> dict[str, dict[str, int]]:
        return {task: state.contribution_rows for task, state in self._tasks.items()}

    # ------------------------------------------------------------ accumulation

    def _zeros(self) -> dict[str, Tensor]:
        return {
            n: torch.zeros(s, dtype=self.storage_dtype, device=self.storage_device)
            for n, s in self._shapes.items()
        }

    def _accumulators(self) -> dict[str, Tensor]:
        return {
            n: torch.zeros(s, dtype=self.acc_dtype, device=self.storage_device)
            for n, s in self._shapes.items()
        }

    def _store(self, t: Tensor) -> Tensor:
        return t.to(self.storage_device, self.storage_dtype)

    def _load(self, t: Tensor) -> Tensor:
        return t.to(self.acc_dtype)

    def update(self, data: object, task: str = "default") -> int:
        """Add the rows of ``data`` (a batch or an iterable of batches) to ``task``'s Fisher.

        In ``"ema"`` mode the whole call is one EMA step. A call whose data has
        no valid row changes nothing (and warns).

        Args:
            data: as for :class:`~fisher_metrics.operators.CurvatureOperator`.
            task: the task key (any string).

        Returns:
            The number of valid rows added.

        Raises:
            TypeError / ValueError: bad ``data`` or ``task``.
        """
        if not isinstance(task, str):
            raise TypeError(f"task must be a string key; got {type(task).__name__}")
        state = self._tasks.setdefault(task, _TaskState(self._zeros()))
        if self.mode == "welford" and state.m2 is None:
            state.m2 = self._zeros()
        seed = self.seed + self._updates
        self._updates += 1
        batches = per_row_gradients(
            self.model,
            data,
            fisher=self.fisher_type,
            params=self.param_names,
            loss_fn=self.loss_fn,
            shift_labels=self.shift_labels,
            mc_samples=self.mc_samples,
            seed=seed,
            per_sample=self.per_sample,
            chunk_size=self.chunk_size,
        )
        rows = sum(b.num_rows for b in batches)
        if rows == 0:
            warnings.warn(
                f"update for task {task!r}: the data has no valid row (every label -100 or "
                "masked); nothing was added",
                RuntimeWarning,
                stacklevel=2,
            )
            return 0
        totals = self._accumulators()
        for b in batches:
            squares = {
                n: j.to(self.acc_dtype).square().sum(dim=1).div_(b.scale)
                for n, j in b.jacobians.items()
            }
            if self.mode == "welford":
                self._welford(state, squares, b.num_rows)
            for n, c in squares.items():
                totals[n] += c.sum(dim=0).to(self.storage_device)
            if self.keep_contributions:
                self._keep(task, state, squares, b)
            state.samples += b.num_samples
            state.rows += b.num_rows
        if self.mode == "oneshot":
            for n, total in totals.items():
                state.acc[n] = self._store(self._load(state.acc[n]) + total)
        elif self.mode == "ema":
            for n, total in totals.items():
                running = self.decay * self._load(state.acc[n]) + (1 - self.decay) * total / rows
                state.acc[n] = self._store(running)
        state.steps += 1
        return rows

    def _welford(self, state: _TaskState, squares: dict[str, Tensor], count: int) -> None:
        """Chan et al. (1979) pairwise update of the running mean and M2 with one batch's rows."""
        before = state.rows
        total = before + count
        for n, c in squares.items():
            mean_b = c.mean(dim=0).to(self.storage_device)
            m2_b = (c - c.mean(dim=0)).square().sum(dim=0).to(self.storage_device)
            mean = self._load(state.acc[n])
            delta = mean_b - mean
            state.acc[n] = self._store(mean + delta * (count / total))
            m2 = self._load(state.m2[n]) + m2_b + delta.square() * (before * count / total)
            state.m2[n] = self._store(m2)

    def _keep(
        self, task: str, state: _TaskState, squares: dict[str, Tensor], b: RowGradients
    ) -> None:
        per_sample = {
            n: c.new_zeros((b.num_samples, *c.shape[1:])).index_add_(0, b.sample, c)
            for n, c in squares.items()
        }
        counts = torch.bincount(b.sample, minlength=b.num_samples).tolist()
        start = len(state.contributions)
        for i in range(b.num_samples):
            key = f"{task}_{start + i}"
            state.contributions[key] = {n: self._store(v[i]) for n, v in per_sample.items()}
            state.contribution_rows[key] = counts[i]

    # ------------------------------------------------------------ results

    def _state(self, task: str) -> _TaskState:
        if not isinstance(task, str):
            raise TypeError(f"task must be a string key; got {type(task).__name__}")
        if task not in self._tasks:
            raise ValueError(
                f"task must be one of the tasks updated so far {self.tasks}; got {task!r}"
            )
        return self._tasks[task]

    def _result(self, task: str, values, state: _TaskState, variance=None) -> DiagonalFisher:
        return DiagonalFisher(
            values,
            model=self.model,
            num_rows=state.rows,
            fisher_type=self.fisher_type,
            task=task,
            mode=self.mode,
            variance=variance,
            steps=state.steps,
            num_samples=state.samples,
        )

    def fisher(self, task: str = "default") -> DiagonalFisher:
        """The diagonal Fisher of ``task`` (bias-corrected in ``"ema"`` mode).

        Returns:
            A :class:`DiagonalFisher` in the storage dtype / device; zeros with a
            ``RuntimeWarning`` when the task has no valid row yet (never a mean
            over nothing). Welford mode also fills ``variance`` (per-row, ``R - 1``
            denominator; zeros while ``R < 2``).

        Raises:
            TypeError / ValueError: ``task`` is not a task updated so far.
        """
        state = self._state(task)
        if state.rows == 0:
            warnings.warn(
                f"task {task!r} has no valid row: its Fisher is zeros", RuntimeWarning, stacklevel=2
            )
            return self._result(task, self._zeros(), state)
        variance = None
        if self.mode == "oneshot":
            values = {n: self._store(self._load(v) / state.rows) for n, v in state.acc.items()}
        elif self.mode == "ema":
            correction = 1.0 - self.decay**state.steps
            values = {n: self._store(self._load(v) / correction) for n, v in state.acc.items()}
        else:
            values = dict(state.acc)
            denominator = state.rows - 1 if state.rows > 1 else math.inf
            variance = {n: self._store(self._load(v) / denominator) for n, v in state.m2.items()}
        return self._result(task, values, state, variance)

    def fisher_from_contributions(self, task: str = "default") -> DiagonalFisher:
        """``sum_i C_i / sum_i R_i`` over the kept per-sample contributions of ``task``.

        Equals the one-shot Fisher of everything ``task`` saw. Reduced in float32
        (float64 for float64 models) on the storage device.

        Returns:
            A :class:`DiagonalFisher`; zeros with a ``RuntimeWarning`` when the
            task has no contribution or no valid row (never a mean over nothing).

        Raises:
            ValueError: the collector was built with ``keep_contributions=False``.
        """
        if not self.keep_contributions:
            raise ValueError("fisher_from_contributions needs keep_contributions=True")
        state = self._tasks.get(task) if isinstance(task, str) else None
        contributions = {} if state is None else state.contributions
        rows = 0 if state is None else sum(state.contribution_rows.values())
        if not contributions or rows == 0:
            warnings.warn(
                f"task {task!r} has no stored contribution with a valid row (tasks with "
                f"contributions: {[t for t, s in self._tasks.items() if s.contributions]}): "
                "its Fisher is zeros",
                RuntimeWarning,
                stacklevel=2,
            )
            empty = state or _TaskState(self._zeros())
            return self._result(task, self._zeros(), empty)
        totals = self._accumulators()
        for sample in contributions.values():
            for n, c in sample.items():
                totals[n] += self._load(c)
        values = {n: self._store(t / rows) for n, t in totals.items()}
        return self._result(task, values, state)
