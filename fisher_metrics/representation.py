"""``FisherRepresentation``: one interface for structured (block-diagonal) Fisher approximations.

A representation approximates the Fisher information ``F`` (``n x n``, loss per
squared parameter unit, for the mean loss) of a set of parameters of a model by
a block-diagonal matrix with one block per *layer* (a group of parameters, e.g.
a weight and its bias). Each block is stored in a compact form (Kronecker
factors for K-FAC, a vector for a diagonal Fisher) from which eigenvalues,
traces, log-determinants and products come without forming ``F``.

Vectors over the parameters come in two layouts:

- a dict ``{parameter name: tensor shaped like the parameter}`` (names as in
  ``model.named_parameters()``; tied parameters may be given under any of their
  names);
- a flat ``(n,)`` vector: the parameters of :attr:`param_names` concatenated in
  that order (``model.named_parameters()`` order), each flattened row-major,
  which is the layout of :class:`~fisher_metrics.operators.CurvatureOperator`
  with ``params=representation.param_names``.

Subclasses implement :meth:`FisherRepresentation.eigenvalues` and
:meth:`FisherRepresentation._layer_mvp` and set the structural attributes; the
whole-model quantities (trace, log-determinant, top-k, quadratic forms,
capacity metrics, the :class:`~fisher_metrics.operators.LinearOperator` view)
follow from those here, and subclasses override them where a closed form is
cheaper.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from . import capacity
from ._validation import check_int, check_positive_float
from .operators import LinearOperator

__all__ = ["FisherRepresentation", "RepresentationOperator", "TopEigenvalues"]


class TopEigenvalues(NamedTuple):
    """The ``k`` largest eigenvalues of a block-diagonal representation.

    Attributes:
        values: ``(k,)`` float64 CPU tensor, descending (loss per squared parameter unit).
        layers: ``k`` layer names: the block each eigenvalue belongs to.
    """

    values: Tensor
    layers: list[str]


class FisherRepresentation(abc.ABC):
    """Abstract block-diagonal Fisher approximation over named layers.

    Attributes (set by subclasses):
        layers: layer names, one diagonal block each (model order).
        layer_params: ``{layer: [parameter names]}`` covered by each block.
        param_names: every covered parameter name (flat-vector order).
        param_shapes: ``{name: torch.Size}`` of those parameters.
        aliases: ``{any name of a covered parameter: its canonical name}``.
        dtype, device: of the stored blocks and of the products returned.

    Subclasses implement :meth:`eigenvalues` and :meth:`_layer_mvp`.
    """

    layers: list[str]
    layer_params: dict[str, list[str]]
    param_names: list[str]
    param_shapes: dict[str, torch.Size]
    aliases: dict[str, str]
    dtype: torch.dtype
    device: torch.device

    # ------------------------------------------------------------ to implement

    @abc.abstractmethod
    def eigenvalues(self, layer: str, k: int | None = None) -> Tensor:
        """Eigenvalues of one layer's block, descending.

        Args:
            layer: a name in :attr:`layers`.
            k: return only the ``k`` largest (``None``: all ``n_layer`` of them,
                zeros included).

        Returns:
            ``(n_layer,)`` or ``(min(k, n_layer),)`` float64 CPU tensor, loss per
            squared parameter unit.

        Raises:
            ValueError: unknown ``layer``; ``k < 1``.
        """

    @abc.abstractmethod
    def _layer_mvp(self, layer: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Block times the layer's parameter tensors (canonical names, rep dtype/device)."""

    # ------------------------------------------------------------ structure

    @property
    def num_params(self) -> int:
        """``n``: total number of covered parameter entries."""
        return sum(shape.numel() for shape in self.param_shapes.values())

    def layer_size(self, layer: str) -> int:
        """Number of parameter entries of ``layer`` (the size of its block)."""
        self._check_layer(layer)
        return sum(self.param_shapes[name].numel() for name in self.layer_params[layer])

    def _check_layer(self, layer: object) -> str:
        if not isinstance(layer, str):
            raise TypeError(f"layer must be a layer name (str); got {type(layer).__name__}")
        if layer not in self.layer_params:
            raise ValueError(f"layer must be one of {self.layers}; got {layer!r}")
        return layer

    def _selected(self, layer: str | None) -> list[str]:
        return list(self.layers) if layer is None else [self._check_layer(layer)]

    # ------------------------------------------------------------ vectors

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """Concatenate per-parameter tensors into an ``(n,)`` vector (:attr:`param_names` order)."""
        return torch.cat([tensors[name].reshape(-1) for name in self.param_names])

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        """Split an ``(n,)`` vector into ``{name: tensor shaped like the parameter}``."""
        out, offset = {}, 0
        for name in self.param_names:
            size = self.param_shapes[name].numel()
            out[name] = vector[offset : offset + size].reshape(self.param_shapes[name])
            offset += size
        return out

    def covered_tensors(
        self, entries: Iterable[tuple[str, object]], argname: str
    ) -> dict[str, Tensor]:
        """The covered parameters among ``(name, tensor)`` entries, by canonical name.

        Args:
            entries: ``(name, tensor)`` pairs (a dict's ``items()``, a model's
                ``named_parameters(remove_duplicate=False)``); tied parameters may
                come under any of their names (the first one counts), entries for
                parameters outside the representation are ignored.
            argname: the caller's argument name, for errors.

        Returns:
            ``{canonical name: tensor as given}``, in the order of ``entries``.

        Raises:
            TypeError: a covered entry is not a floating-point tensor.
            ValueError: a covered entry has another shape, or a covered parameter
                has no entry.
        """
        found: dict[str, Tensor] = {}
        for key, value in entries:
            name = self.aliases.get(key)
            if name is None or name in found:
                continue  # parameters outside the representation: its blocks are zero there
            if not isinstance(value, Tensor) or not value.is_floating_point():
                raise TypeError(f"{argname}[{key!r}] must be a floating-point tensor")
            if value.shape != self.param_shapes[name]:
                raise ValueError(
                    f"{argname}[{key!r}] has shape {tuple(value.shape)}; the Fisher covers shape "
                    f"{tuple(self.param_shapes[name])} (another model?)"
                )
            found[name] = value
        missing = [name for name in self.param_names if name not in found]
        if missing:
            raise ValueError(f"{argname} lacks entries for the Fisher's parameters {missing[:5]}")
        return found

    def _as_dict(self, v: object, argname: str) -> tuple[dict[str, Tensor], bool]:
        """``v`` (dict or flat) as canonical-name tensors in the rep dtype; and whether flat."""
        if isinstance(v, Tensor):
            if not v.is_floating_point() or v.shape != (self.num_params,):
                raise ValueError(
                    f"{argname} must be a floating-point (n,) = ({self.num_params},) vector or a "
                    f"dict of parameter-shaped tensors; got a tensor of shape {tuple(v.shape)}"
                )
            return self.unflatten(v.to(self.device, self.dtype)), True
        if not isinstance(v, Mapping):
            raise TypeError(
                f"{argname} must be a dict {{parameter name: tensor}} or a flat (n,) tensor; "
                f"got {type(v).__name__}"
            )
        tensors = self.covered_tensors(v.items(), argname)
        out = {name: value.to(self.device, self.dtype) for name, value in tensors.items()}
        return out, False

    def mvp(self, v: Mapping[str, Tensor] | Tensor) -> dict[str, Tensor] | Tensor:
        """Fisher-vector product ``F v`` (block by block).

        Args:
            v: a dict ``{parameter name: tensor shaped like it}`` with an entry
                for every covered parameter (entries for other parameters are
                ignored: ``F`` is zero there), or a flat ``(n,)`` vector in
                :attr:`param_names` order.

        Returns:
            The same layout as ``v`` (a dict keyed by :attr:`param_names`), in
            :attr:`dtype` on :attr:`device`; units of ``v`` times loss per
            squared parameter unit.

        Raises:
            TypeError: ``v`` is neither a dict nor a tensor, or holds non-float tensors.
            ValueError: wrong shapes or missing parameters.
        """
        tensors, flat = self._as_dict(v, "v")
        out: dict[str, Tensor] = {}
        for layer in self.layers:
            part = {name: tensors[name] for name in self.layer_params[layer]}
            out.update(self._layer_mvp(layer, part))
        out = {name: out[name] for name in self.param_names}
        return self.flatten(out) if flat else out

    def quadratic_form(self, delta: Mapping[str, Tensor] | Tensor) -> float:
        """``delta^T F delta`` (e.g. the local quadratic loss change ``2 (L(theta + delta) - L)``).

        Args:
            delta: parameter change, dict or flat, as for :meth:`mvp`.

        Returns:
            A float, loss units.

        Raises:
            TypeError / ValueError: as for :meth:`mvp`.
        """
        tensors, _ = self._as_dict(delta, "delta")
        product = self.mvp(tensors)
        return float(sum((product[name] * tensors[name]).sum() for name in self.param_names))

    # ------------------------------------------------------------ spectra

    def trace(self, layer: str | None = None) -> float:
        """``tr(F)`` of one layer's block, or of the whole model (``layer=None``).

        Raises:
            ValueError: unknown ``layer``.
        """
        return float(sum(float(self.eigenvalues(name).sum()) for name in self._selected(layer)))

    def logdet(self, damping: float, layer: str | None = None) -> float:
        """``log det(F + damping I) = sum_i log(lambda_i + damping)`` over every eigenvalue.

        Args:
            damping: ``>= 0`` (loss per squared parameter unit). With ``0`` a
                singular block gives ``-inf``.
            layer: one layer's block, or the whole model (``None``).

        Returns:
            A float (nats).

        Raises:
            TypeError / ValueError: ``damping`` not a finite number ``>= 0``; unknown ``layer``.
        """
        damping = check_positive_float("damping", damping, allow_zero=True)
        total = 0.0
        for name in self._selected(layer):
            total += float(torch.log(self.eigenvalues(name) + damping).sum())
        return total

    def top_k(self, k: int, layer: str | None = None) -> TopEigenvalues:
        """The ``k`` largest eigenvalues of the whole block-diagonal matrix (or of one block).

        The eigenvalues of a block-diagonal matrix are those of its blocks, so
        the top ``k`` are the top ``k`` of the union of every block's top ``k``.

        Args:
            k: ``1 <= k <= n`` (``n`` of the selection).
            layer: restrict to one layer, or ``None`` for the whole model.

        Returns:
            :class:`TopEigenvalues` (values descending, and the layer of each).

        Raises:
            TypeError / ValueError: ``k`` not an integer in ``[1, n]``; unknown ``layer``.
        """
        k = check_int("k", k)
        names = self._selected(layer)
        size = sum(self.layer_size(name) for name in names)
        if k > size:
            raise ValueError(f"k must be <= n = {size} (parameters in the selection); got {k}")
        values, owners = [], []
        for name in names:
            top = self.eigenvalues(name, k=k)
            values.append(top)
            owners += [name] * top.numel()
        merged = torch.cat(values)
        order = torch.argsort(merged, descending=True, stable=True)[:k]
        return TopEigenvalues(merged[order], [owners[i] for i in order.tolist()])

    def all_eigenvalues(self) -> Tensor:
        """Every eigenvalue of the whole model, descending: ``(n,)`` float64 (``n`` floats)."""
        values = torch.cat([self.eigenvalues(name) for name in self.layers])
        return torch.sort(values, descending=True).values

    def capacity(
        self,
        layer: str | None = None,
        *,
        sigma: float | None = None,
        num_samples: int = 1,
        rtol: float | None = None,
    ) -> dict[str, float]:
        """Capacity metrics (:func:`fisher_metrics.capacity.capacity_metrics`) of the full spectrum.

        Args:
            layer: one layer's block, or the whole model (``None``).
            sigma, num_samples: PAC-Bayes flatness term (see
                :func:`~fisher_metrics.capacity.pac_bayes_flatness`); omitted when
                ``sigma`` is ``None``.
            rtol: condition-number tolerance relative to the largest eigenvalue
                (default ``n * eps`` of float64).

        Returns:
            ``capacity_metrics`` keys (``trace``, ``effective_rank``,
            ``condition_number``, ``spectral_gap``, ``spectral_range``,
            ``max_eigenvalue``, ``min_eigenvalue`` [, ``pac_bayes_flatness``]) plus
            ``num_params`` and ``logdet_unit`` (``log det(F + I)``, 1 loss per
            squared parameter unit of damping).

        Raises:
            TypeError / ValueError: as for the capacity functions; unknown ``layer``.
        """
        values = self.all_eigenvalues() if layer is None else self.eigenvalues(layer)
        metrics = capacity.capacity_metrics(values, sigma=sigma, num_samples=num_samples, rtol=rtol)
        metrics["num_params"] = int(values.numel())
        metrics["logdet_unit"] = float(torch.log1p(values.clamp_min(0.0)).sum())
        return metrics

    def capacity_by_layer(
        self, *, sigma: float | None = None, num_samples: int = 1, rtol: float | None = None
    ) -> dict[str, dict[str, float]]:
        """:meth:`capacity` of every layer and of the whole model (key ``"model"`` last).

        Raises:
            TypeError / ValueError: as for :meth:`capacity`.
        """
        kwargs = dict(sigma=sigma, num_samples=num_samples, rtol=rtol)
        out = {name: self.capacity(name, **kwargs) for name in self.layers}
        out["model"] = self.capacity(None, **kwargs)
        return out

    # ------------------------------------------------------------ operator view

    def as_operator(self) -> RepresentationOperator:
        """This representation as an ``(n, n)`` :class:`~fisher_metrics.operators.LinearOperator`.

        Flat vectors follow :attr:`param_names`; :func:`~fisher_metrics.lanczos.lanczos`,
        :func:`~fisher_metrics.lanczos.slq` and the trace estimators accept it.
        """
        return RepresentationOperator(self)


class RepresentationOperator(LinearOperator):
    """A :class:`FisherRepresentation` seen as a symmetric PSD ``(n, n)`` linear operator.

    Attributes:
        representation: the wrapped representation.
        param_names, param_shapes: flat-vector layout (as for ``CurvatureOperator``).
        is_psd: ``True``.
    """

    is_psd = True

    def __init__(self, representation: FisherRepresentation) -> None:
        if not isinstance(representation, FisherRepresentation):
            raise TypeError(
                "representation must be a FisherRepresentation; "
                f"got {type(representation).__name__}"
            )
        super().__init__(representation.num_params, representation.dtype, representation.device)
        self.representation = representation
        self.param_names = list(representation.param_names)
        self.param_shapes = dict(representation.param_shapes)

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """See :meth:`FisherRepresentation.flatten`."""
        return self.representation.flatten(tensors)

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        """See :meth:`FisherRepresentation.unflatten`."""
        return self.representation.unflatten(vector)

    def _matvec(self, v: Tensor) -> Tensor:
        return self.representation.mvp(v)


def log_sum(values: Tensor, damping: float, zeros: int = 0) -> float:
    """``sum_i log(values_i + damping) + zeros * log(damping)`` (``-inf`` for a zero argument)."""
    total = float(torch.log(values + damping).sum())
    if zeros:
        total += zeros * (math.log(damping) if damping > 0 else -math.inf)
    return total
