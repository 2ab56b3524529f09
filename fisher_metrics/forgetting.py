"""Fisher-weighted forgetting damage, Fisher overlap, EWC / online EWC / K-FAC Laplace penalties.

Let ``F`` be the Fisher of the *mean* loss of task A over its valid rows (any
:class:`~fisher_metrics.representation.FisherRepresentation`: a
:class:`~fisher_metrics.DiagonalFisher`, a :class:`~fisher_metrics.GroupFisher`
or a :class:`~fisher_metrics.KFACFisher`) at the parameters ``theta_A`` after
task A, and ``Delta = theta - theta_A``. The *damage* of the move is

    D = Delta^T F Delta = sum_layers Delta_l^T F_l Delta_l        (loss units),

block by block: ``sum_i F_ii Delta_i^2`` for a diagonal; for K-FAC, with
``Delta_l`` as the ``(o, d [+ bias column])`` matrix ``dW`` of
:meth:`KFACFisher.to_matrix`, ``vec(dW)^T (A (x) G) vec(dW) = tr(G dW A dW^T)``.
Near a minimum of task A (zero gradient) a second-order expansion with the
Fisher as the curvature gives ``L_A(theta) - L_A(theta_A) ~= D / 2``.

``normalized`` (dimensionless) compares the damage with that of a direction
drawn uniformly at random with the same length:

    normalized = (Delta^T F Delta / ||Delta||^2) / (tr(F) / n),

the Rayleigh quotient of ``Delta`` over the mean eigenvalue (``n`` covered
entries): ``1`` for a move as damaging as a random one, ``> 1`` for a move
aligned with task A's high-curvature directions, ``< 1`` for a move into its
flat ones; ``0`` when ``Delta = 0`` or ``F = 0``.

Penalties (differentiable in the model's parameters, returned in the dtype of
the first covered parameter):

- EWC (Kirkpatrick et al. 2017, PNAS, Eq. 3): ``(lambda / 2) Delta^T F Delta``
  for any representation (diagonal, group, K-FAC);
- online EWC (Schwarz et al. 2018, "Progress & Compress", Sec. 4):
  ``F* <- gamma F* + F_t`` and the anchor moved to the latest task's optimum;
- K-FAC Laplace (Ritter, Botev & Barber 2018, "Online Structured Laplace
  Approximations for Overcoming Catastrophic Forgetting", NeurIPS, Eq. 7 with the
  damped factors of Ritter et al. 2018, ICLR, Sec. 3.1):
  ``(lambda / 2) sum_l tr(G'_l dW_l A'_l dW_l^T)`` with
  ``A' = sqrt(N) A + sqrt(tau) I`` and ``G' = sqrt(N) G + sqrt(tau) I``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ._validation import check_positive_float
from .diagonal import DiagonalFisher
from .kfac import KFACFisher
from .representation import FisherRepresentation

__all__ = [
    "OnlineEWC",
    "ewc_penalty",
    "fisher_overlap",
    "forgetting_damage",
    "kfac_laplace_penalty",
    "symmetric_damage",
]


def _check_fisher(fisher: object, argname: str = "fisher") -> FisherRepresentation:
    if not isinstance(fisher, FisherRepresentation):
        raise TypeError(
            f"{argname} must be a FisherRepresentation (DiagonalFisher, GroupFisher, KFACFisher); "
            f"got {type(fisher).__name__}"
        )
    return fisher


def named_tensors(
    obj: object, argname: str, fisher: FisherRepresentation, *, detach: bool
) -> dict[str, Tensor]:
    """The covered parameters of a model or state dict, by canonical name.

    Args:
        obj: an ``nn.Module`` (its parameters; a DDP wrapper is unwrapped) or a
            dict ``{name: tensor}`` (a ``state_dict()``; names as in the model,
            tied parameters under any of their names; other entries ignored).
        argname: the caller's argument name, for errors.
        fisher: the representation whose :attr:`param_names` are needed.
        detach: detach the tensors (anchors) or keep them in the graph.

    Raises:
        TypeError: ``obj`` is neither; an entry is not a floating-point tensor.
        ValueError: a covered parameter is missing or has another shape.
    """
    while isinstance(obj, DistributedDataParallel):
        obj = obj.module
    if isinstance(obj, nn.Module):
        items = obj.named_parameters(remove_duplicate=False)
    elif isinstance(obj, Mapping):
        items = obj.items()
    else:
        raise TypeError(
            f"{argname} must be a torch.nn.Module or a state dict {{name: tensor}}; "
            f"got {type(obj).__name__}"
        )
    tensors = fisher.covered_tensors(items, argname)
    return {name: value.detach() if detach else value for name, value in tensors.items()}


def _delta(fisher, before, after, *, differentiable: bool) -> dict[str, Tensor]:
    start = named_tensors(before, "before" if not differentiable else "anchor", fisher, detach=True)
    end = named_tensors(
        after, "after" if not differentiable else "model", fisher, detach=not differentiable
    )
    return {name: end[name] - start[name].to(end[name].device, end[name].dtype) for name in end}


def _layer_quadratics(fisher: FisherRepresentation, delta: dict[str, Tensor]) -> dict[str, Tensor]:
    """``{layer: Delta_l^T F_l Delta_l}`` as 0-d tensors in the representation's dtype."""
    cast = {n: d.to(fisher.device, fisher.dtype) for n, d in delta.items()}
    product = fisher.mvp(cast)
    return {
        layer: sum((product[n] * cast[n]).sum() for n in fisher.layer_params[layer])
        for layer in fisher.layers
    }


def _normalized(quadratic: float, norm2: float, trace: float, size: int) -> float:
    if norm2 == 0.0 or trace == 0.0:
        return 0.0
    return quadratic / (norm2 * trace / size)


def forgetting_damage(
    fisher: FisherRepresentation,
    before: nn.Module | Mapping[str, Tensor],
    after: nn.Module | Mapping[str, Tensor],
) -> dict[str, object]:
    """Fisher-weighted damage ``Delta^T F Delta`` of moving from ``before`` to ``after``.

    Args:
        fisher: task A's Fisher (of the mean loss), any representation.
        before: parameters after task A (``theta_A``): a model or a state dict.
        after: the parameters now: a model or a state dict.

    Returns:
        ``{"total": D, "per_layer": {layer: D_l}, "normalized": float,
        "per_layer_normalized": {layer: float}, "expected_loss_increase": D / 2,
        "delta_norm": ||Delta||}``; floats (loss units except the normalised
        ratios, see the module docstring for the formula of ``normalized``).

    Raises:
        TypeError / ValueError: ``fisher`` is not a representation; ``before`` /
            ``after`` lack a covered parameter or have other shapes.
    """
    fisher = _check_fisher(fisher)
    with torch.no_grad():
        delta = _delta(fisher, before, after, differentiable=False)
        quadratics = {layer: float(q) for layer, q in _layer_quadratics(fisher, delta).items()}
        norms = {
            layer: float(sum(delta[n].double().square().sum() for n in fisher.layer_params[layer]))
            for layer in fisher.layers
        }
    total = sum(quadratics.values())
    per_layer_normalized = {
        layer: _normalized(q, norms[layer], fisher.trace(layer), fisher.layer_size(layer))
        for layer, q in quadratics.items()
    }
    norm2 = sum(norms.values())
    return {
        "total": total,
        "per_layer": quadratics,
        "normalized": _normalized(total, norm2, fisher.trace(), fisher.num_params),
        "per_layer_normalized": per_layer_normalized,
        "expected_loss_increase": total / 2,
        "delta_norm": norm2**0.5,
    }


def symmetric_damage(
    fisher_a: FisherRepresentation,
    fisher_b: FisherRepresentation,
    before: nn.Module | Mapping[str, Tensor],
    after: nn.Module | Mapping[str, Tensor],
) -> dict[str, object]:
    """Damage under both tasks' Fishers: ``D_sym = (Delta^T F_A Delta + Delta^T F_B Delta) / 2``.

    Symmetric in A and B: the damage under the Fisher of an equal-weight mixture
    of both tasks' rows. ``normalized`` is ``D_sym / (||Delta||^2 (tr(F_A) / n_A +
    tr(F_B) / n_B) / 2)`` (1 for a random direction, as in :func:`forgetting_damage`).
    Both Fishers must cover the same parameters.

    Returns:
        ``{"total": D_sym, "task_a": D_A, "task_b": D_B, "per_layer": {layer:
        (D_A,l + D_B,l) / 2}, "normalized": float, "delta_norm": ||Delta||}``.

    Raises:
        TypeError / ValueError: as for :func:`forgetting_damage`; the two Fishers
            cover different parameters.
    """
    fisher_a = _check_fisher(fisher_a, "fisher_a")
    fisher_b = _check_fisher(fisher_b, "fisher_b")
    if set(fisher_a.param_names) != set(fisher_b.param_names):
        raise ValueError(
            "fisher_a and fisher_b must cover the same parameters; only in one: "
            f"{sorted(set(fisher_a.param_names) ^ set(fisher_b.param_names))[:5]}"
        )
    a = forgetting_damage(fisher_a, before, after)
    b = forgetting_damage(fisher_b, before, after)
    per_layer = {
        layer: (a["per_layer"].get(layer, 0.0) + b["per_layer"].get(layer, 0.0)) / 2
        for layer in dict.fromkeys([*a["per_layer"], *b["per_layer"]])
    }
    total = (a["total"] + b["total"]) / 2
    mean_eig = (fisher_a.trace() / fisher_a.num_params + fisher_b.trace() / fisher_b.num_params) / 2
    norm2 = a["delta_norm"] ** 2
    return {
        "total": total,
        "task_a": a["total"],
        "task_b": b["total"],
        "per_layer": per_layer,
        "normalized": 0.0 if norm2 == 0 or mean_eig == 0 else total / (norm2 * mean_eig),
        "delta_norm": a["delta_norm"],
    }


# --------------------------------------------------------------------------- overlap


def _g_inner(x: dict, y: dict) -> float:
    """``tr(G_x G_y)`` for dense ``G`` or low-rank ``G = U U^T`` factors."""
    if x["U"] is None and y["U"] is None:
        return float((x["G"] * y["G"]).sum())  # symmetric: tr(P Q) = sum(P * Q)
    if x["U"] is not None and y["U"] is not None:
        return float((x["U"].T @ y["U"]).square().sum())  # tr(U U^T V V^T) = ||U^T V||_F^2
    dense, u = (y["G"], x["U"]) if x["U"] is not None else (x["G"], y["U"])
    return float((u * (dense @ u)).sum())  # tr(G U U^T) = sum(U * G U)


def _kfac_inner(fa: KFACFisher, fb: KFACFisher | None, layer: str) -> float:
    """``<A_a (x) G_a, A_b (x) G_b>_F = tr(A_a A_b) tr(G_a G_b)`` (``fb=None``: squared norm).

    A diagonal ``A`` (Embedding) is a vector: ``sum(a_a * a_b)`` is the same trace.
    """
    x = fa.factors(layer)
    y = x if fb is None else fb.factors(layer)
    return float((x["A"] * y["A"]).sum()) * _g_inner(x, y)


def fisher_overlap(fisher_a: FisherRepresentation, fisher_b: FisherRepresentation) -> dict:
    """Normalised Frobenius similarity of two tasks' Fishers, per layer and whole-model.

        overlap = <F_A, F_B>_F / (||F_A||_F ||F_B||_F) = tr(F_A F_B) / sqrt(tr(F_A^2) tr(F_B^2)),

    the cosine between the two matrices. Both are PSD, so it lies in ``[0, 1]``:
    ``1`` when ``F_B`` is a multiple of ``F_A`` (the tasks load the same
    parameters, or directions, in the same proportions; the scale of each
    Fisher does not matter), ``0`` when their supports are orthogonal (e.g.
    disjoint parameters for diagonals). Diagonal / group Fishers:
    ``sum_i F_A,ii F_B,ii`` over entries. K-FAC: per layer ``tr(A_a A_b)
    tr(G_a G_b)`` (Kronecker mixed product), ``tr(G_a G_b) = ||U_a^T U_b||_F^2``
    for low-rank G. Whole-model: the sums of the per-layer inner products and
    squared norms (block-diagonal matrices); a layer covered by only one Fisher
    adds to its norm only.

    Args:
        fisher_a, fisher_b: two diagonal-type (DiagonalFisher / GroupFisher)
            Fishers, or two KFACFishers, of the same model.

    Returns:
        ``{"overlap": float, "per_layer": {layer: float}}`` (``0.0`` where a Fisher is zero).

    Raises:
        TypeError: not representations, or a diagonal-type Fisher paired with a K-FAC one.
    """
    fisher_a = _check_fisher(fisher_a, "fisher_a")
    fisher_b = _check_fisher(fisher_b, "fisher_b")
    kfac = isinstance(fisher_a, KFACFisher), isinstance(fisher_b, KFACFisher)
    diag = (
        callable(getattr(fisher_a, "diagonal", None)),
        callable(getattr(fisher_b, "diagonal", None)),
    )
    if all(kfac):
        layers = list(dict.fromkeys([*fisher_a.layers, *fisher_b.layers]))
        common = [layer for layer in fisher_a.layers if layer in fisher_b.layers]
        inner = {layer: _kfac_inner(fisher_a, fisher_b, layer) for layer in common}
        norm_a = {layer: _kfac_inner(fisher_a, None, layer) for layer in fisher_a.layers}
        norm_b = {layer: _kfac_inner(fisher_b, None, layer) for layer in fisher_b.layers}
    elif all(diag) and not any(kfac):
        da, db = fisher_a.diagonal(), fisher_b.diagonal()

        def layer_of(rep):
            return {n: layer for layer, names in rep.layer_params.items() for n in names}

        owner_a, owner_b = layer_of(fisher_a), layer_of(fisher_b)
        layers = list(dict.fromkeys([*fisher_a.layers, *fisher_b.layers]))
        inner, norm_a, norm_b = {}, {}, {}
        for n, v in da.items():
            norm_a[owner_a[n]] = norm_a.get(owner_a[n], 0.0) + float(v.double().square().sum())
            if n in db:
                value = float((v.double() * db[n].double().to(v.device)).sum())
                inner[owner_a[n]] = inner.get(owner_a[n], 0.0) + value
        for n, v in db.items():
            norm_b[owner_b[n]] = norm_b.get(owner_b[n], 0.0) + float(v.double().square().sum())
    else:
        raise TypeError(
            "fisher_overlap needs two diagonal-type Fishers (DiagonalFisher / GroupFisher) or two "
            f"KFACFishers; got {type(fisher_a).__name__} and {type(fisher_b).__name__}"
        )

    def cosine(i, a, b):
        return 0.0 if a <= 0 or b <= 0 else i / (a * b) ** 0.5

    per_layer = {
        layer: cosine(inner.get(layer, 0.0), norm_a.get(layer, 0.0), norm_b.get(layer, 0.0))
        for layer in layers
    }
    total = cosine(sum(inner.values()), sum(norm_a.values()), sum(norm_b.values()))
    return {"overlap": total, "per_layer": per_layer}


# --------------------------------------------------------------------------- penalties


def _check_strength(strength: object) -> float:
    return check_positive_float("strength", strength, allow_zero=True)


def _output_dtype(model_tensors: dict[str, Tensor]) -> torch.dtype:
    return next(iter(model_tensors.values())).dtype


def ewc_penalty(
    fisher: FisherRepresentation,
    anchor: nn.Module | Mapping[str, Tensor],
    model: nn.Module | Mapping[str, Tensor],
    strength: float = 1.0,
) -> Tensor:
    """EWC penalty ``(strength / 2) (theta - theta*)^T F (theta - theta*)`` (Kirkpatrick 2017).

    Differentiable in ``model``'s parameters; any representation (a diagonal
    Fisher gives the classic ``(strength / 2) sum_i F_ii (theta_i - theta*_i)^2``;
    a K-FAC Fisher ``(strength / 2) sum_l tr(G dW A dW^T)``). With ``F`` the
    Fisher of the mean loss over ``N`` rows, ``strength = N`` is the Laplace
    posterior of task A (the sum-of-losses scale).

    Args:
        fisher: task A's Fisher.
        anchor: ``theta*`` (a model or a state dict; detached).
        model: the model being trained (or a dict of tensors in the graph).
        strength: ``lambda >= 0``.

    Returns:
        A 0-d tensor (loss units), in the dtype of the model's parameters.

    Raises:
        TypeError / ValueError: bad ``fisher`` / ``strength``; missing parameters.
    """
    fisher = _check_fisher(fisher)
    strength = _check_strength(strength)
    current = named_tensors(model, "model", fisher, detach=False)
    delta = _delta(fisher, anchor, current, differentiable=True)
    total = sum(_layer_quadratics(fisher, delta).values())
    return (0.5 * strength * total).to(_output_dtype(current))


def kfac_laplace_penalty(
    fisher: KFACFisher,
    anchor: nn.Module | Mapping[str, Tensor],
    model: nn.Module | Mapping[str, Tensor],
    strength: float = 1.0,
    *,
    num_data: float = 1.0,
    prior_precision: float = 0.0,
) -> Tensor:
    """K-FAC Laplace penalty ``(strength / 2) sum_l tr(G'_l dW_l A'_l dW_l^T)`` (Ritter 2018).

    ``A' = sqrt(N) A + sqrt(tau) I``, ``G' = sqrt(N) G + sqrt(tau) I`` with
    ``N = num_data`` and ``tau = prior_precision``: the Kronecker-factored
    posterior precision ``A' (x) G' = N A (x) G + sqrt(N tau) (A (x) I + I (x) G)
    + tau I`` of a Laplace approximation of task A (Ritter, Botev & Barber 2018,
    ICLR Sec. 3.1 for the damped factors; NeurIPS Eq. 7 for the continual
    penalty). ``dW = W - W*`` in the ``(o, d [+ bias column])`` layout of
    :meth:`KFACFisher.to_matrix`. With ``N = 1`` and ``tau = 0`` this is
    :func:`ewc_penalty` with the K-FAC Fisher. Differentiable in ``model``.

    Args:
        fisher: a :class:`~fisher_metrics.KFACFisher` of task A.
        anchor: ``theta*`` (model or state dict).
        model: the model being trained.
        strength: ``lambda >= 0``.
        num_data: ``N > 0``, the data-size multiplier of the factors.
        prior_precision: ``tau >= 0``.

    Returns:
        A 0-d tensor in the dtype of the model's parameters.

    Raises:
        TypeError / ValueError: ``fisher`` not a KFACFisher; bad numbers; missing parameters.
    """
    if not isinstance(fisher, KFACFisher):
        raise TypeError(f"fisher must be a KFACFisher; got {type(fisher).__name__}")
    strength = _check_strength(strength)
    root_n = check_positive_float("num_data", num_data) ** 0.5
    root_tau = check_positive_float("prior_precision", prior_precision, allow_zero=True) ** 0.5
    current = named_tensors(model, "model", fisher, detach=False)
    delta = _delta(fisher, anchor, current, differentiable=True)
    delta = {n: d.to(fisher.device, fisher.dtype) for n, d in delta.items()}
    total = 0.0
    for layer in fisher.layers:
        f = fisher.factors(layer)
        dw = fisher.to_matrix(layer, delta)
        if f["U"] is not None:
            g_dw = root_n * (f["U"] @ (f["U"].T @ dw)) + root_tau * dw
        else:
            g_dw = root_n * (f["G"] @ dw) + root_tau * dw
        if f["A"].dim() == 1:
            dw_a = dw * (root_n * f["A"] + root_tau)
        else:
            dw_a = root_n * (dw @ f["A"]) + root_tau * dw
        total = total + (g_dw * dw_a).sum()
    return (0.5 * strength * total).to(_output_dtype(current))


class OnlineEWC:
    """Online EWC (Schwarz et al. 2018, Sec. 4): one running diagonal Fisher and one anchor.

    After each task ``t``, :meth:`consolidate` sets ``F* <- gamma F* + F_t`` and
    the anchor ``theta* <- theta_t``; the penalty while training the next task
    is ``(strength / 2) sum_i F*_ii (theta_i - theta*_i)^2``.

    Args:
        gamma: decay of the old Fisher in ``[0, 1]`` (``1``: plain sum).
        strength: ``lambda >= 0``.

    Attributes:
        fisher: the running :class:`~fisher_metrics.DiagonalFisher` (``None``
            before the first :meth:`consolidate`).
        anchor: ``{parameter name: tensor}`` (detached clones).
        tasks: how many tasks were consolidated.

    Raises:
        TypeError / ValueError: bad ``gamma`` / ``strength``.
    """

    def __init__(self, *, gamma: float = 1.0, strength: float = 1.0) -> None:
        gamma = check_positive_float("gamma", gamma, allow_zero=True)
        if gamma > 1.0:
            raise ValueError(f"gamma must lie in [0, 1]; got {gamma}")
        self.gamma = gamma
        self.strength = _check_strength(strength)
        self.fisher: DiagonalFisher | None = None
        self.anchor: dict[str, Tensor] = {}
        self.tasks = 0

    def consolidate(
        self, fisher: FisherRepresentation, anchor: nn.Module | Mapping[str, Tensor]
    ) -> None:
        """Fold a finished task's diagonal Fisher in and move the anchor to its parameters.

        Args:
            fisher: the task's DiagonalFisher or GroupFisher (group means per entry).
            anchor: the parameters after the task (model or state dict).

        Raises:
            TypeError: ``fisher`` has no diagonal (e.g. a KFACFisher: use
                :func:`kfac_laplace_penalty` per task instead).
            ValueError: the Fisher covers other parameters than the running one.
        """
        fisher = _check_fisher(fisher)
        if not callable(getattr(fisher, "diagonal", None)):
            raise TypeError(
                "OnlineEWC needs a diagonal Fisher (DiagonalFisher or GroupFisher); got "
                f"{type(fisher).__name__}"
            )
        diagonal = {n: v.detach().double().cpu() for n, v in fisher.diagonal().items()}
        if self.fisher is not None:
            if set(diagonal) != set(self.fisher.values):
                raise ValueError("fisher must cover the same parameters as the tasks before")
            diagonal = {n: self.gamma * self.fisher.values[n] + v for n, v in diagonal.items()}
        running = DiagonalFisher(diagonal, fisher_type="online_ewc", task=f"tasks<={self.tasks}")
        running.aliases = dict(fisher.aliases)
        self.fisher = running
        self.anchor = {
            n: t.clone() for n, t in named_tensors(anchor, "anchor", fisher, detach=True).items()
        }
        self.tasks += 1

    def penalty(self, model: nn.Module | Mapping[str, Tensor]) -> Tensor:
        """``(strength / 2) sum_i F*_ii (theta_i - theta*_i)^2`` (0-d, differentiable).

        Raises:
            ValueError: nothing consolidated yet.
        """
        if self.fisher is None:
            raise ValueError("OnlineEWC.penalty needs a consolidated task: call consolidate first")
        return ewc_penalty(self.fisher, self.anchor, model, self.strength)
