"""Fisher importance tools: pruning masks, Fisher-scaled updates, task conflicts, QKOV interference.

All tools read a diagonal-type Fisher (:class:`~fisher_metrics.DiagonalFisher`
or :class:`~fisher_metrics.GroupFisher`, through ``.diagonal()``: ``F_ii`` per
parameter entry, loss per squared parameter unit) and the channel / head
layout of :mod:`fisher_metrics.groups`.

- :func:`pruning_masks`: keep-masks at a target sparsity, by entry, output
  channel or attention head, with one threshold for the whole model or one per layer.
- :func:`scale_by_fisher`: ``u / (F + damping)^power`` (diagonal natural-gradient scaling).
- :func:`task_gradient` and :func:`detect_conflicts`: where two tasks' mean
  gradients point against each other, per parameter group, with a z statistic.
- :func:`qkov_interference`: Fisher-normalised gradient interference of two
  tasks per attention head and Q / K / V / O block, with numerical health diagnostics.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import grad

from kfac_optim.layers import layer_kind

from ._validation import check_choice, check_positive_float
from .diagonal import per_row_gradients
from .groups import BLOCKS, Grouping, diagonal_of, head_scores, param_groupings
from .operators import EmptyBatchError, evaluation_mode, make_operator, resolve_parameters
from .representation import FisherRepresentation

__all__ = [
    "AGGREGATES",
    "CONFLICT_STRUCTURES",
    "CRITERIA",
    "FISHER_POOLS",
    "PRUNING_STRUCTURES",
    "SCOPES",
    "VARIANTS",
    "detect_conflicts",
    "pruning_masks",
    "qkov_interference",
    "scale_by_fisher",
    "task_gradient",
]

PRUNING_STRUCTURES = ("unstructured", "channel", "head")
SCOPES = ("global", "layer")
CRITERIA = ("fisher", "saliency")
CONFLICT_STRUCTURES = ("param", "channel", "head")
AGGREGATES = ("mean", "sum")
VARIANTS = ("signed", "unsigned", "symmetric")
FISHER_POOLS = ("A", "B", "pooled")


def _check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    return model


# --------------------------------------------------------------------------- pruning


def _prune_units(
    scores: list[Tensor], owners: list[int], sparsity: float, scope: str
) -> list[Tensor]:
    """Keep-masks over units: the ``floor(sparsity * count)`` lowest scores pruned (ties: order)."""
    flat = torch.cat([s.reshape(-1).double().cpu() for s in scores])
    owner = torch.cat([torch.full((s.numel(),), o) for s, o in zip(scores, owners, strict=True)])
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    groups = (
        [torch.arange(flat.numel())]
        if scope == "global"
        else [torch.nonzero(owner == o).reshape(-1) for o in sorted(set(owners))]
    )
    for index in groups:
        count = math.floor(sparsity * index.numel())
        if count:
            order = torch.argsort(flat[index], stable=True)
            keep[index[order[:count]]] = False
    out, offset = [], 0
    for s in scores:
        out.append(keep[offset : offset + s.numel()].reshape(s.shape))
        offset += s.numel()
    return out


def pruning_masks(
    fisher: FisherRepresentation,
    sparsity: float,
    *,
    structure: str = "unstructured",
    scope: str = "global",
    criterion: str = "fisher",
    model: nn.Module | None = None,
    num_heads: int | None = None,
) -> dict[str, Tensor]:
    """Keep-masks (``True`` = keep) pruning a fraction ``sparsity`` of units by Fisher importance.

    Scores per entry: ``criterion="fisher"`` uses ``F_ii``; ``"saliency"`` uses
    ``F_ii theta_i^2 / 2``, the second-order loss increase of zeroing the entry
    with the Fisher as curvature (Optimal Brain Damage, LeCun et al. 1990; Fisher
    pruning, Theis et al. 2018). A unit's score is the sum over its entries:

    - ``"unstructured"``: units are entries; ``scope="layer"`` prunes each
      parameter tensor on its own;
    - ``"channel"``: units are output channels of Linear / Conv2d / Conv1D
      modules (weight row, or Conv1D column, plus the bias entry);
      ``scope="layer"`` prunes each module on its own; other parameters are kept;
    - ``"head"``: units are query heads of the attention layers of
      :func:`~fisher_metrics.groups.attention_layers`. Head ``h`` owns its Q and O
      slices and a ``1 / (H / H_kv)`` share of the K / V slices of its key/value
      head ``floor(h / (H / H_kv))``; a K / V head is pruned only when every query
      head that reads it is. ``scope="layer"`` prunes each attention layer on its
      own; other parameters are kept.

    ``floor(sparsity * units)`` units with the lowest scores are pruned (ties: model order).

    Args:
        fisher: a DiagonalFisher or GroupFisher.
        sparsity: fraction in ``[0, 1)`` of units to prune.
        structure: one of :data:`PRUNING_STRUCTURES`.
        scope: ``"global"`` (one ranking) or ``"layer"`` (see above).
        criterion: one of :data:`CRITERIA`.
        model: the model; required for ``"channel"``, ``"head"`` and ``"saliency"``.
        num_heads: see :func:`~fisher_metrics.groups.param_groupings`.

    Returns:
        ``{parameter name: bool tensor shaped like the parameter}`` for every
        parameter of ``fisher`` (on the Fisher's device).

    Raises:
        TypeError / ValueError: bad arguments, naming them; ``model`` missing
            when needed; no attention layer for ``"head"``.
    """
    diagonal = diagonal_of(fisher)
    sparsity = check_positive_float("sparsity", sparsity, allow_zero=True)
    if sparsity >= 1.0:
        raise ValueError(f"sparsity must lie in [0, 1); got {sparsity}")
    structure = check_choice("structure", structure, PRUNING_STRUCTURES)
    scope = check_choice("scope", scope, SCOPES)
    criterion = check_choice("criterion", criterion, CRITERIA)
    if model is None and (structure != "unstructured" or criterion == "saliency"):
        raise ValueError(
            f"model is required for structure={structure!r} / criterion={criterion!r} "
            "(module layout and parameter values)"
        )
    scores = dict(diagonal)
    if criterion == "saliency":
        _check_model(model)
        lookup = dict(model.named_parameters())
        scores = {n: 0.5 * s * lookup[n].detach().to(s).square() for n, s in scores.items()}
    masks = {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
    if structure == "unstructured":
        names = list(scores)
        kept = _prune_units([scores[n] for n in names], list(range(len(names))), sparsity, scope)
        return {n: k.to(scores[n].device) for n, k in zip(names, kept, strict=True)}
    if structure == "channel":
        groupings, _ = param_groupings(_check_model(model), attention=False)
        units, owners, members = [], [], []
        for index, (_, module) in enumerate(model.named_modules()):
            if layer_kind(module) not in ("linear", "conv2d", "conv1d"):
                continue
            names = [fisher.aliases.get(n) for n in _own_parameters(model, module)]
            names = [n for n in names if n in scores and groupings[n].kind == "channel"]
            if names:
                units.append(sum(groupings[n].reduce(scores[n].double().cpu()) for n in names))
                owners.append(index)
                members.append(names)
        kept = _prune_units(units, owners, sparsity, scope)
        for keep, names in zip(kept, members, strict=True):
            for n in names:
                masks[n] = groupings[n].expand(keep, scores[n].shape).to(scores[n].device)
        return masks
    groupings, specs = param_groupings(_check_model(model), num_heads=num_heads)
    specs = [s for s in specs if all(p in scores for b in s.blocks.values() for p, _ in b)]
    if not specs:
        raise ValueError("structure='head' found no attention layer covered by the Fisher")
    units = [_head_units(spec, groupings, scores) for spec in specs]
    kept = _prune_units(units, list(range(len(specs))), sparsity, scope)
    group_keep: dict[str, Tensor] = {}
    for keep, spec in zip(kept, specs, strict=True):
        share = spec.num_heads // spec.num_kv_heads
        kv_keep = keep.reshape(spec.num_kv_heads, share).any(dim=1)
        for block, params in spec.blocks.items():
            values = kv_keep if block in ("K", "V") else keep
            for name, offset in params:
                flat = group_keep.setdefault(
                    name, torch.ones(groupings[name].num_groups, dtype=torch.bool)
                )
                flat[offset : offset + values.numel()] = values
    for name, flat in group_keep.items():
        masks[name] = groupings[name].expand(flat, scores[name].shape).to(scores[name].device)
    return masks


def _head_units(spec, groupings: dict[str, Grouping], scores: dict[str, Tensor]) -> Tensor:
    """``(H,)`` head-unit scores of one attention layer (:func:`.groups.head_scores`)."""
    names = {name for params in spec.blocks.values() for name, _ in params}
    flat = {n: groupings[n].reduce(scores[n].double().cpu()).reshape(-1) for n in names}
    return head_scores(spec, flat)


def _own_parameters(model: nn.Module, module: nn.Module) -> list[str]:
    """Names (in ``model``) of ``module``'s own parameters."""
    ids = {id(p) for p in module.parameters(recurse=False)}
    return [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in ids]


# --------------------------------------------------------------------------- scaling


def scale_by_fisher(
    updates: nn.Module | Mapping[str, Tensor],
    fisher: FisherRepresentation,
    *,
    damping: float = 1e-8,
    power: float = 1.0,
) -> dict[str, Tensor]:
    """Fisher-scaled updates ``u_i / (F_ii + damping)^power``.

    ``power = 1`` is the diagonal natural-gradient step (Amari 1998; Martens
    2020, Sec. 6) with Tikhonov damping; ``power = 1/2`` the square-root scaling of
    Adam-like methods. Entries with small Fisher (unimportant for the task the
    Fisher came from) move more; used with the Fisher of an *old* task and a
    negative power (e.g. ``-1``) it damps updates of important entries instead.

    Args:
        updates: ``{parameter name: tensor}`` or a model (its ``.grad``; every
            covered parameter must have one).
        fisher: a DiagonalFisher or GroupFisher.
        damping: ``>= 0`` (loss per squared parameter unit); ``> 0`` when ``power > 0``
            and the Fisher may be zero.
        power: any real number.

    Returns:
        ``{parameter name: scaled tensor}`` for the covered parameters present in
        ``updates`` (dtype and device of each update).

    Raises:
        TypeError / ValueError: bad ``fisher``, ``damping``, ``power``; a covered
            parameter of a model without ``.grad``.
    """
    diagonal = diagonal_of(fisher)
    damping = check_positive_float("damping", damping, allow_zero=True)
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not math.isfinite(power):
        raise TypeError(f"power must be a finite real number; got {power!r}")
    if isinstance(updates, nn.Module):
        items = {}
        for name, p in updates.named_parameters(remove_duplicate=False):
            canonical = fisher.aliases.get(name)
            if canonical is None or canonical in items:
                continue
            if p.grad is None:
                raise ValueError(f"updates: parameter {name!r} has no .grad (run backward first)")
            items[canonical] = p.grad
    elif isinstance(updates, Mapping):
        items = {fisher.aliases[k]: v for k, v in updates.items() if k in fisher.aliases}
    else:
        raise TypeError(
            f"updates must be a dict {{name: tensor}} or a model; got {type(updates).__name__}"
        )
    out = {}
    for name, u in items.items():
        f = diagonal[name].to(u.device, torch.promote_types(u.dtype, torch.float32))
        out[name] = (u / (f + damping).pow(power)).to(u.dtype)
    return out


# --------------------------------------------------------------------------- task gradients


def task_gradient(
    model: nn.Module,
    data: object,
    *,
    params=None,
    loss_fn=None,
    shift_labels: bool | None = None,
) -> tuple[dict[str, Tensor], int]:
    """Gradient of task ``data``'s mean loss over its valid rows (operators' conventions).

    Returns:
        ``({parameter name: gradient}, R)``; zeros and ``R = 0`` with a
        ``RuntimeWarning`` when ``data`` has no valid row.

    Raises:
        TypeError / ValueError: as for :class:`~fisher_metrics.operators.CurvatureOperator`.
    """
    try:
        op = make_operator(
            _check_model(model),
            data,
            "empirical_fisher",
            params=params,
            loss_fn=loss_fn,
            shift_labels=shift_labels,
        )
    except EmptyBatchError:
        warnings.warn(
            "task_gradient: data has no valid row; returning zeros", RuntimeWarning, stacklevel=2
        )
        lookup = dict(model.named_parameters())
        return {n: torch.zeros_like(lookup[n]) for n in resolve_parameters(model, params)}, 0

    def total(p: dict) -> Tensor:
        return sum(op.loss.row_losses(b.rows(op.call, p), b.targets).sum() for b in op.batches)

    with torch.no_grad(), evaluation_mode(op.model):
        g = grad(total)(op.params)
    return {n: v / op.num_rows for n, v in g.items()}, op.num_rows


def _sample_gradients(model, data, names, loss_fn, shift_labels, per_sample, chunk_size):
    """Per-sample gradients scaled so their mean is the task gradient: ``a_i = G_i N / R``."""
    batches = per_row_gradients(
        model,
        data,
        fisher="empirical",
        params=names,
        loss_fn=loss_fn,
        shift_labels=shift_labels,
        per_sample=per_sample,
        chunk_size=chunk_size,
    )
    rows = sum(b.num_rows for b in batches)
    samples = sum(b.num_samples for b in batches)
    out: dict[str, list[Tensor]] = {n: [] for n in names}
    for b in batches:
        for n, j in b.jacobians.items():
            g = j[:, 0]
            out[n].append(g.new_zeros((b.num_samples, *g.shape[1:])).index_add_(0, b.sample, g))
    if rows == 0:
        return None, 0, 0
    return {n: torch.cat(v) * (samples / rows) for n, v in out.items()}, rows, samples


def detect_conflicts(
    model: nn.Module,
    data_a: object,
    data_b: object,
    *,
    structure: str = "param",
    z_threshold: float = 2.0,
    params=None,
    loss_fn=None,
    shift_labels: bool | None = None,
    per_sample: str = "auto",
    chunk_size: int | None = None,
    num_heads: int | None = None,
) -> dict[str, object]:
    """Parameter groups where the mean gradients of tasks A and B point against each other.

    Statistic, per group ``k`` (a whole parameter, an output channel, or an
    attention head: ``structure``): the inner product of the two tasks' mean
    gradients restricted to the group, ``s_k = <g_A, g_B>_k``, its cosine
    ``s_k / (||g_A||_k ||g_B||_k)``, and the z score ``z_k = s_k / se_k`` with the
    delta-method standard error of a product of two independent sample means,

        se_k^2 = Var_i(<a_i, g_B>_k) / N_A + Var_j(<b_j, g_A>_k) / N_B,

    over per-sample gradients ``a_i`` (``N_A`` samples of A, scaled so that their
    mean is ``g_A``; token-sum gradients for sequences) and ``b_j`` (B). A group is
    in conflict when ``z_k < -z_threshold``: an SGD step on B,
    ``-eta g_B``, raises A's loss by ``eta s_k`` to first order in that group, and
    the sign is significant given the per-sample spread (samples, not tokens,
    are taken as independent).

    Args:
        model: the model.
        data_a, data_b: the two tasks' data (as for the curvature operators).
        structure: one of :data:`CONFLICT_STRUCTURES` (``"head"``: attention
            projections by head, other parameters by channel).
        z_threshold: ``>= 0``.
        params, loss_fn, shift_labels, per_sample, chunk_size: as for
            :func:`~fisher_metrics.diagonal.per_row_gradients`.
        num_heads: see :func:`~fisher_metrics.groups.param_groupings`.

    Returns:
        ``{"groups": {key: {"inner", "cosine", "z": tensors shaped like the key's
        groups, "conflict": bool tensor}}, "conflicts": [(key, index, z, cosine)]
        sorted by z, "num_samples": (N_A, N_B), "num_rows": (R_A, R_B),
        "statistic": str}``. Keys are ``"<parameter>|<kind>"``
        (:mod:`fisher_metrics.groups`). When a task has no valid row every value
        is zero, nothing is in conflict, and a ``RuntimeWarning`` says so. ``z``
        is ``nan`` when a task has fewer than two samples.

    Raises:
        TypeError / ValueError: bad arguments, naming them.
    """
    _check_model(model)
    structure = check_choice("structure", structure, CONFLICT_STRUCTURES)
    z_threshold = check_positive_float("z_threshold", z_threshold, allow_zero=True)
    names = resolve_parameters(model, params)
    if structure == "param":
        lookup = dict(model.named_parameters())
        groupings = {n: Grouping("param", (1, lookup[n].numel()), (0,)) for n in names}
    else:
        groupings, _ = param_groupings(model, attention=structure == "head", num_heads=num_heads)
    a, rows_a, n_a = _sample_gradients(
        model, data_a, names, loss_fn, shift_labels, per_sample, chunk_size
    )
    b, rows_b, n_b = _sample_gradients(
        model, data_b, names, loss_fn, shift_labels, per_sample, chunk_size
    )
    empty = a is None or b is None
    if empty:
        warnings.warn(
            f"detect_conflicts: task {'A' if a is None else 'B'} has no valid row; every "
            "statistic is zero and nothing is in conflict",
            RuntimeWarning,
            stacklevel=2,
        )
    groups, ranked = {}, []
    for n in names:
        g = groupings[n]
        key = f"{n}|{g.kind}"
        if empty:
            zeros = torch.zeros(g.shape, dtype=torch.float64)
            groups[key] = {"inner": zeros, "cosine": zeros, "z": zeros, "conflict": zeros.bool()}
            continue
        ga, gb = a[n].double().mean(dim=0), b[n].double().mean(dim=0)
        inner = g.reduce(ga * gb)
        norms = (g.reduce(ga.square()) * g.reduce(gb.square())).sqrt()
        cosine = torch.where(norms > 0, inner / norms, torch.zeros_like(inner))
        u = g.reduce_batched(a[n].double() * gb)
        w = g.reduce_batched(b[n].double() * ga)
        if n_a > 1 and n_b > 1:
            se = (u.var(dim=0) / n_a + w.var(dim=0) / n_b).sqrt()
            z = torch.where(se > 0, inner / se, inner.sign() * math.inf)
            z = torch.nan_to_num(z, nan=0.0, posinf=math.inf, neginf=-math.inf)
        else:
            z = torch.full_like(inner, math.nan)
        conflict = z < -z_threshold
        groups[key] = {
            "inner": inner.cpu(),
            "cosine": cosine.cpu(),
            "z": z.cpu(),
            "conflict": conflict.cpu(),
        }
        for index in torch.nonzero(conflict).tolist():
            ranked.append((key, tuple(index), float(z[tuple(index)]), float(cosine[tuple(index)])))
    ranked.sort(key=lambda r: r[2])
    return {
        "groups": groups,
        "conflicts": ranked,
        "num_samples": (n_a, n_b),
        "num_rows": (rows_a, rows_b),
        "statistic": "z = <g_A, g_B>_k / sqrt(Var_i<a_i, g_B>_k / N_A + Var_j<b_j, g_A>_k / N_B)",
    }


# --------------------------------------------------------------------------- QKOV interference


def qkov_interference(
    model: nn.Module,
    grad_a: Mapping[str, Tensor],
    grad_b: Mapping[str, Tensor],
    fisher_a: FisherRepresentation,
    fisher_b: FisherRepresentation | None = None,
    *,
    aggregate: str = "mean",
    variant: str = "signed",
    fisher_pool: str = "A",
    ridge: float = 1e-8,
    rel_ridge: float = 1e-6,
    eps: float = 1e-12,
    num_heads: int | None = None,
) -> dict[str, object]:
    """Fisher-normalised interference between two tasks per attention head and Q / K / V / O block.

    For attention layer ``l``, query head ``h`` and block ``b``, the slice ``S``
    holds the entries of block ``b``'s projection(s) that belong to head ``h``
    (Q, O) or to its key/value head ``floor(h / (H / H_kv))`` (K, V). With mean
    gradients ``g_A``, ``g_B`` (:func:`task_gradient`), a pooled diagonal Fisher
    ``F`` (``fisher_pool``: ``F_A``, ``F_B`` or ``(F_A + F_B) / 2``) and the ridge
    ``lambda_S = max(ridge, rel_ridge * max_S F)``:

        signed:    I = sum_{k in S} g_A,k g_B,k / (F_k + lambda_S)
        unsigned:  I = sum_{k in S} |g_A,k g_B,k| / (F_k + lambda_S)
        symmetric: I = sum_{k in S} g_A,k g_B,k (1/(F_A,k + lambda_S) + 1/(F_B,k + lambda_S)) / 2

    (symmetric ignores ``fisher_pool``; its ``lambda_S`` and diagnostics use the
    pooled Fisher). ``aggregate="mean"`` divides by ``|S|`` so heads and blocks of
    different sizes compare; ``"sum"`` keeps the total. Meaning of ``signed``: a
    diagonal natural-gradient step on B restricted to ``S``,
    ``-eta (F + lambda)^-1 g_B``, changes A's loss by ``-eta I`` to first order;
    ``I < 0`` is interference (A gets worse), ``I > 0`` transfer. Units: loss.

    Numerical health per slice (of the Fisher used): ``fisher_min``,
    ``fisher_median``, ``fisher_max``, ``frac_below_eps`` (share of entries with
    ``F_k < eps``) and ``ridge`` (the ``lambda_S`` applied).

    Args:
        model: the model (attention layout, :mod:`fisher_metrics.groups`).
        grad_a, grad_b: ``{parameter name: mean gradient}``; an empty dict is a
            task with no data (every score zero, with a warning).
        fisher_a, fisher_b: diagonal-type Fishers; ``fisher_b`` is needed for
            ``fisher_pool`` ``"B"`` / ``"pooled"`` and ``variant="symmetric"``.
        aggregate, variant, fisher_pool: see above (:data:`AGGREGATES`,
            :data:`VARIANTS`, :data:`FISHER_POOLS`).
        ridge, rel_ridge, eps: ``>= 0``.
        num_heads: see :func:`~fisher_metrics.groups.param_groupings`.

    Returns:
        ``{"layers": {attention layer: {"scores", "fisher_min", "fisher_median",
        "fisher_max", "frac_below_eps", "ridge": (4, H) float64 tensors (rows Q,
        K, V, O), "slice_size": (4,) int64}}, "blocks": ("Q", "K", "V", "O"),
        "aggregate", "variant", "fisher_pool"}``.

    Raises:
        TypeError / ValueError: bad arguments, naming them; ``fisher_b`` missing
            when needed; gradients or Fishers lacking an attention parameter;
            no attention layer recognised.
    """
    _check_model(model)
    aggregate = check_choice("aggregate", aggregate, AGGREGATES)
    variant = check_choice("variant", variant, VARIANTS)
    fisher_pool = check_choice("fisher_pool", fisher_pool, FISHER_POOLS)
    ridge = check_positive_float("ridge", ridge, allow_zero=True)
    rel_ridge = check_positive_float("rel_ridge", rel_ridge, allow_zero=True)
    eps = check_positive_float("eps", eps, allow_zero=True)
    diag_a = diagonal_of(fisher_a, "fisher_a")
    needs_b = fisher_pool != "A" or variant == "symmetric"
    if fisher_b is None and needs_b:
        raise ValueError(
            f"fisher_b is required for fisher_pool={fisher_pool!r} / variant={variant!r}"
        )
    diag_b = diagonal_of(fisher_b, "fisher_b") if fisher_b is not None else None
    for argname, g in (("grad_a", grad_a), ("grad_b", grad_b)):
        if not isinstance(g, Mapping):
            raise TypeError(f"{argname} must be a dict {{parameter name: gradient}}")
    groupings, specs = param_groupings(model, num_heads=num_heads)
    if not specs:
        raise ValueError("qkov_interference found no attention layer in model")
    empty = [n for n, g in (("A", grad_a), ("B", grad_b)) if not g]
    if empty:
        warnings.warn(
            f"qkov_interference: no gradient for task {' and '.join(empty)}; every score is zero",
            RuntimeWarning,
            stacklevel=2,
        )
    if variant == "symmetric" or fisher_pool == "pooled":
        pooled = {
            n: (diag_a[n].double() + diag_b[n].double().to(diag_a[n].device)) / 2 for n in diag_a
        }
    else:
        pooled = diag_a if fisher_pool == "A" else diag_b

    def rows(source: Mapping[str, Tensor] | None, name: str, argname: str) -> Tensor:
        if source is None or not source:
            shape = groupings[name]
            return torch.zeros(shape.num_groups, shape.size, dtype=torch.float64)
        if name not in source:
            raise ValueError(f"{argname} lacks attention parameter {name!r}")
        return groupings[name].rows(source[name].detach().double().cpu())

    layers = {}
    for spec in specs:
        out = {
            k: torch.zeros(4, spec.num_heads, dtype=torch.float64)
            for k in (
                "scores",
                "fisher_min",
                "fisher_median",
                "fisher_max",
                "frac_below_eps",
                "ridge",
            )
        }
        sizes = torch.zeros(4, dtype=torch.int64)
        for row, block in enumerate(BLOCKS):
            heads = torch.tensor([spec.block_head(block, h) for h in range(spec.num_heads)])
            parts = {"F": [], "FA": [], "FB": [], "A": [], "B": []}
            for name, offset in spec.blocks[block]:
                index = offset + heads
                parts["F"].append(rows(pooled, name, "fisher")[index])
                parts["A"].append(rows(grad_a, name, "grad_a")[index])
                parts["B"].append(rows(grad_b, name, "grad_b")[index])
                if variant == "symmetric":
                    parts["FA"].append(rows(diag_a, name, "fisher_a")[index])
                    parts["FB"].append(rows(diag_b, name, "fisher_b")[index])
            f = torch.cat(parts["F"], dim=1)  # (H, |S|)
            ga, gb = torch.cat(parts["A"], dim=1), torch.cat(parts["B"], dim=1)
            lam = torch.clamp(rel_ridge * f.amax(dim=1), min=ridge)[:, None]
            if variant == "signed":
                score = (ga * gb / (f + lam)).sum(dim=1)
            elif variant == "unsigned":
                score = ((ga * gb).abs() / (f + lam)).sum(dim=1)
            else:
                fa, fb = torch.cat(parts["FA"], dim=1), torch.cat(parts["FB"], dim=1)
                score = (ga * gb * (1 / (fa + lam) + 1 / (fb + lam)) / 2).sum(dim=1)
            if aggregate == "mean":
                score = score / f.shape[1]
            out["scores"][row] = score
            out["fisher_min"][row] = f.amin(dim=1)
            out["fisher_median"][row] = f.median(dim=1).values
            out["fisher_max"][row] = f.amax(dim=1)
            out["frac_below_eps"][row] = (f < eps).double().mean(dim=1)
            out["ridge"][row] = lam[:, 0]
            sizes[row] = f.shape[1]
        out["slice_size"] = sizes
        layers[spec.name] = out
    return {
        "layers": layers,
        "blocks": BLOCKS,
        "aggregate": aggregate,
        "variant": variant,
        "fisher_pool": fisher_pool,
    }
