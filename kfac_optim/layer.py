"""One preconditioned layer: its capture view, running factors A and G, and its inverse.

``KFACLayer`` is the per-layer state the pipeline stages share (hooks add statistics, the
placement reduces them, the policy turns factors into an ``Inverse``); ``LayerView`` is the
read-only public view of it (``KFACPreconditioner.layers``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .factors import LowRankFactor, RunningFactor
from .inverse import eigh_psd_many
from .layers import LayerCapture, layer_kind
from .policies import Chooser, Inverse, eigen_a, inverse_from_state
from .policies.base import nbytes

__all__ = ["KFACLayer", "LayerView", "compute_inverses"]

_HALF = (torch.float16, torch.bfloat16)


def _to_device(state: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in state.items()}


class KFACLayer:
    """Per-layer state: capture view, running factors, last good inverse, diagnostics.

    Args:
        capture: the module's capture view (``kfac_optim.layers``).
        policy: the inverse-policy chooser.
        rows: this rank's ``(start, stop)`` rows of a row-sharded low-rank G, else None.

    Attributes:
        a, g: running factors; ``g`` is a ``LowRankFactor`` while G is low-rank.
        inverse: the last good ``Inverse`` (None before the first inverse update).
        ekfac_rows: None, or the ``(a, g)`` rows of the current factor update (EKFAC),
            ``(rows, ·)`` or per sample ``(B, R, ·)`` (``StatisticsCapture._ekfac_terms``).
        positional: looked up with ids shared across the batch: left to the base update.
        hooked: the module's forward hook has run at least once (``KFACPreconditioner.step``
            refuses a layer whose weight has a gradient while some layers' hooks ran and
            its own never did: the model used the weight outside the module's forward).
        diag: factor-side diagnostics (``T``, ``dropped_G``).
    """

    def __init__(self, capture: LayerCapture, policy: Chooser,
                 rows: tuple[int, int] | None = None) -> None:
        opts = policy.options
        self.capture = capture
        self.policy = policy
        self.rows = rows
        self.a = RunningFactor(opts.factor_dtype if opts.factor_dtype in _HALF else None)
        self.g: RunningFactor | LowRankFactor = policy.new_factor(
            capture.out_features, self.a.storage_dtype, rows)
        self.inverse: Inverse | None = None
        ekfac = opts.eigenvalue_correction and not self.low_rank
        self.ekfac_rows: list | None = [] if ekfac else None
        self.nonfinite_skips = 0
        self.warned = False
        self.positional = False
        self.hooked = False
        self.diag: dict[str, Any] = {}
        self._written: tuple[weakref.ref, int] | None = None

    @property
    def name(self) -> str:
        return self.capture.name

    @property
    def low_rank(self) -> bool:
        return isinstance(self.g, LowRankFactor)

    @property
    def row_sharded(self) -> bool:
        """Whether G is a low-rank factor of which this rank holds a row slice."""
        return self.low_rank and self.g.rows is not None

    def _grad_tensor(self) -> Tensor | None:
        """The weight gradient's storage tensor (a sharded DTensor's local shard)."""
        grad = self.capture.params[0].grad  # the weight's parameter (a block: the packed one)
        return None if grad is None else getattr(grad, "_local_tensor", grad)

    def mark_written(self) -> None:
        """Remember the gradient just written back (to refuse preconditioning it twice)."""
        grad = self._grad_tensor()
        self._written = None if grad is None else (weakref.ref(grad), grad._version)

    def has_grad_written(self) -> bool:
        """Whether the weight gradient is still the one this layer last wrote back: no
        backward (nor any in-place change) since."""
        grad, written = self._grad_tensor(), self._written
        return (grad is not None and written is not None and written[0]() is grad
                and grad._version == written[1])

    def has_new_grad(self) -> bool:
        """Whether there is a weight gradient to precondition (not already preconditioned)."""
        return self.capture.has_grad() and not self.has_grad_written()

    @property
    def has_factors(self) -> bool:
        """Whether this rank holds running factors A and G (at least one update each)."""
        return self.a.ema is not None and self.g.updates > 0

    def densify(self) -> None:
        """Turn a low-rank G dense (past its column limit, or to follow the owner's G in
        owner mode, where this rank's G is empty); a row slice must be gathered first."""
        if self.low_rank:
            self.g = (self.g.to_dense() if self.g.cols is not None
                      else RunningFactor(self.a.storage_dtype))

    def dense_factors(self) -> dict[str, Tensor]:
        """The bias-corrected factors its inverse eigendecomposes with ``eigh``: ``"A"``
        (d, d) unless A is diagonal, ``"G"`` (o, o) unless G is low-rank."""
        out = {}
        if not self.capture.diagonal_a:
            out["A"] = self.a.value()
        if not self.low_rank:
            out["G"] = self.g.value()
        return out

    def compute_inverse(self, reduce_gram: Callable[[Tensor], Tensor] | None = None,
                        eigs: dict[str, tuple[Tensor, Tensor] | None] | None = None
                        ) -> Inverse | None:
        """The inverse of the current factors (None when an eigensolver fails in float64).

        Args:
            reduce_gram: for a row-sharded G, sums the float64 Gram of the rows over ranks.
            eigs: ``eigh_psd`` results (None: failed) of ``dense_factors()``, by key, when
                already computed (``compute_inverses`` batches them); missing keys are
                computed here.
        """
        opts, cap = self.policy.options, self.capture
        eigs = {} if eigs is None else eigs

        def a_side():
            return eigen_a(self.a.value(), diagonal=cap.diagonal_a,
                           kappa=opts.max_condition_number, dtype=opts.inv_dtype,
                           device=opts.inv_device, eig=eigs.get("A", False))

        if self.low_rank:
            return self.policy.woodbury.inverse(a_side, self.g, cap.out_features, reduce_gram)
        a = a_side()
        if a is None:
            return None
        return self.policy.eig.inverse(a, self.g.value(), ekfac=self.ekfac_rows is not None,
                                       eig=eigs.get("G", False))

    def nbytes(self) -> dict[str, int]:
        """``factors`` (dense A and G), ``low_rank`` (a low-rank G's U), ``inverses``."""
        dense = nbytes(self.a.ema) + (0 if self.low_rank else nbytes(self.g.ema))
        low = nbytes(self.g.cols) if self.low_rank else 0
        inv = 0 if self.inverse is None else self.inverse.nbytes()
        return {"factors": dense, "inverses": inv, "low_rank": low, "total": dense + inv + low}

    # State ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """``{"A", "G", "G_low_rank", "inv", "nonfinite_skips", "positional"}``; ``inv`` is
        the inverse's tagged state (``Inverse.state_dict``) or None."""
        return {"A": self.a.state_dict(), "G": self.g.state_dict(), "G_low_rank": self.low_rank,
                "inv": None if self.inverse is None else self.inverse.state_dict(),
                "nonfinite_skips": self.nonfinite_skips, "positional": self.positional}

    def check_state(self, s: dict) -> None:
        """Raises:
            RuntimeError: the state's factor shapes (or rows of U) do not fit this layer.
            ValueError: a factor holds NaN or Inf.
        """
        cap = self.capture
        d, o = cap.in_features, cap.out_features
        expected_a = (d,) if cap.diagonal_a else (d, d)
        g = s["G"].get("ema", s["G"].get("cols"))
        if s["G_low_rank"]:
            try:
                self.policy.new_low_rank(self.rows).check_rows(s["G"])
            except RuntimeError as err:
                raise RuntimeError(f"K-FAC state for layer '{cap.name}': {err}") from None
            if self.rows is not None:  # a row-sharded U: this rank's rows only
                o = self.rows[1] - self.rows[0]
        for key, value, expected in (("A", s["A"]["ema"], expected_a), ("G", g, (o, o))):
            if value is not None and not bool(torch.isfinite(value).all()):
                raise ValueError(f"K-FAC state for layer '{cap.name}': factor {key} holds NaN or "
                                 "Inf (a corrupted checkpoint); load an earlier state, or drop "
                                 "this layer's entry's factors to start them afresh")
            shape = None if value is None else tuple(value.shape)
            if key == "G" and s["G_low_rank"] and shape is not None:
                shape = (shape[0], shape[0])
            if shape is not None and shape != expected:
                bias = " (a bias in one and not the other?)" if key == "A" else ""
                raise RuntimeError(
                    f"K-FAC state for layer '{cap.name}': factor {key} has shape "
                    f"{shape}, the module needs {expected}{bias}; checkpoint mismatch?")

    def load_state_dict(self, s: dict, *, owned: bool) -> None:
        """Restore from ``state_dict()`` (checked with ``check_state`` first); tensors move
        to the weight's device. ``owned``: this rank keeps the factors and inverse."""
        dev = self.capture.weight.device
        if s["G_low_rank"] != self.low_rank:
            self.g = (self.policy.new_low_rank(self.rows) if s["G_low_rank"]
                      else RunningFactor(self.a.storage_dtype))
        if owned:
            self.a.load_state_dict(_to_device(s["A"], dev))
            self.g.load_state_dict(_to_device(s["G"], dev))
            self.inverse = (None if s["inv"] is None else inverse_from_state(
                _to_device(s["inv"], dev), self.policy.options.damping_mode))
        self.nonfinite_skips = int(s.get("nonfinite_skips", 0))
        self.positional = bool(s.get("positional", False))


def compute_inverses(layers: list[KFACLayer],
                     gram_reducer: Callable[[KFACLayer], Callable[[Tensor], Tensor] | None]
                     ) -> dict[str, Inverse | None]:
    """``{name: layer.compute_inverse(...)}`` for ``layers``, the dense factors (A's and G's
    across layers) of equal shape, dtype and device eigendecomposed in one batched ``eigh``
    call per group (``kfac_optim.inverse.eigh_psd_many``: a non-finite factor is solved
    alone and fails alone, its layer keeping its last good inverse).

    Args:
        layers: the layers to invert (each with factors).
        gram_reducer: ``layer -> reduce_gram`` for ``KFACLayer.compute_inverse``.
    """
    if not layers:
        return {}
    opts = layers[0].policy.options
    keys, matrices = [], []
    for layer in layers:
        for key, matrix in layer.dense_factors().items():
            keys.append((layer.name, key))
            matrices.append(matrix)
    eigs: dict[str, dict] = {layer.name: {} for layer in layers}
    solved = eigh_psd_many(matrices, dtype=opts.inv_dtype, device=opts.inv_device)
    for (name, key), eig in zip(keys, solved, strict=True):
        eigs[name][key] = eig
    return {layer.name: layer.compute_inverse(gram_reducer(layer), eigs[layer.name])
            for layer in layers}


class LayerView:
    """Read-only view of one preconditioned layer (``KFACPreconditioner.layers[name]``).

    Attributes:
        name: the module's qualified name; kind: ``kfac_optim.layers.layer_kind``;
        module: the module; shape: ``(o, d)`` of its weight matrix (bias column included).
    """

    __slots__ = ("_layer", "_describe")

    def __init__(self, layer: KFACLayer, describe: Callable[[KFACLayer], dict]) -> None:
        self._layer = layer
        self._describe = describe

    def __repr__(self) -> str:
        return (f"LayerView({self.name!r}, kind={self.kind!r}, shape={self.shape}, "
                f"low_rank={self.low_rank})")

    @property
    def name(self) -> str:
        return self._layer.capture.name

    @property
    def kind(self) -> str | None:
        return layer_kind(self._layer.capture.module)

    @property
    def module(self) -> torch.nn.Module:
        return self._layer.capture.module

    @property
    def shape(self) -> tuple[int, int]:
        cap = self._layer.capture
        return cap.out_features, cap.in_features

    @property
    def A(self) -> Tensor | None:  # noqa: N802 (the field's name for the factor)
        """Bias-corrected A (d, d), or its diagonal (d,) for an Embedding; None before the
        first factor update."""
        return self._layer.a.value()

    @property
    def G(self) -> Tensor | None:  # noqa: N802
        """Bias-corrected dense G (o, o) (formed from U for a low-rank G); None before the
        first factor update.

        Raises:
            RuntimeError: a row-sharded G (this rank holds some rows of U: use ``G_factor``).
        """
        return self._layer.g.value()

    @property
    def G_factor(self) -> Tensor | None:  # noqa: N802
        """U (o, k) with ``G = U U^T`` (this rank's rows when row-sharded); None for a dense
        G or before the first factor update."""
        return self._layer.g.factor() if self._layer.low_rank else None

    @property
    def low_rank(self) -> bool:
        return self._layer.low_rank

    @property
    def rank(self) -> int:
        """Columns of a low-rank G, else o."""
        layer = self._layer
        return layer.g.rank if layer.low_rank else layer.capture.out_features

    @property
    def rows(self) -> tuple[int, int] | None:
        """This rank's rows of a row-sharded U, else None."""
        return self._layer.g.rows if self._layer.row_sharded else None

    @property
    def storage_dtypes(self) -> dict[str, torch.dtype | None]:
        """``{"A": ..., "G": ...}``: the dtypes the running factors are stored in (None
        before the first factor update)."""
        layer = self._layer
        a, g = layer.a.ema, layer.g.cols if layer.low_rank else layer.g.ema
        return {"A": None if a is None else a.dtype, "G": None if g is None else g.dtype}

    @property
    def factor_updates(self) -> int:
        return self._layer.a.updates

    @property
    def pending(self) -> bool:
        """Whether statistics await the next factor update."""
        return self._layer.a.pending

    @property
    def positional(self) -> bool:
        """Looked up with ids shared across the batch (a positional table): left to the
        base update."""
        return self._layer.positional

    @property
    def nonfinite_skips(self) -> int:
        return self._layer.nonfinite_skips

    @property
    def inverse(self) -> Inverse | None:
        """The last good inverse (``kind``, ``apply``, ``diagnostics()``, ``state_dict()``)."""
        return self._layer.inverse

    @property
    def diagnostics(self) -> dict[str, Any]:
        """This layer's ``KFACPreconditioner.describe()`` row."""
        return self._describe(self._layer)
