"""The saved-state schema of ``KFACPreconditioner.state_dict()``, its readers, and the
conversion of earlier releases' states.

Layout, version ``STATE_VERSION`` = 1 (tensors and plain values only, the same keys on every
rank)::

    {"version": 1,
     "steps": int,                      # preconditioner steps taken
     "layers": {name: {                 # module name in the (unwrapped) model
         "A": {"ema": Tensor | None,    # (d, d), or (d,) the diagonal (nn.Embedding);
               "weight": float,         #   bias-correction weight (1 - decay^updates)
               "updates": int},         #   factor updates folded into the EMA
         "G": {"ema": Tensor | None,    # dense G (o, o), when G_low_rank is False
               "weight": float, "updates": int}
           or {"cols": Tensor | None,   # low-rank G = U U^T / weight, U = cols (o, k)
               "rows": None | [start, stop],  # rows start:stop of U only (this rank's,
                                        #   woodbury_reduction="row_sharded"); None: all o
               "weight": float, "updates": int},
         "G_low_rank": bool,            # which of the two G layouts
         "inv": None | {"kind": str, ...},  # the last good inverse, tagged with its kind in
                                        #   kfac_optim.policies.INVERSES (Inverse.state_dict:
                                        #   "s_a", "q_a", "clipped_A", "clipped_G", "rank",
                                        #   "out_features" and the kind's own tensors; EKFAC
                                        #   moments belong to an "eig" inverse's basis)
         "nonfinite_skips": int,        # factor updates skipped for a NaN/Inf
         "positional": bool}},          # an Embedding looked up with ids shared by the
                                        #   batch (a positional table): base update only
     "owners": None | {"rank": int, "layers": {name: owner rank}}}

``d`` counts the bias column, ``o`` and ``d`` in the weight-matrix convention of
``kfac_optim.layers``. Bias-corrected factors are ``A = A.ema / A.weight`` and
``G = G.ema / G.weight``, or ``G = U U^T`` with ``U = cols / sqrt(weight)``. ``ema`` /
``cols`` are None before a layer's first factor update, and, in owner mode
(``owners`` set), for the layers this rank does not own. A ``KFAC`` optimizer's
``state_dict()`` holds this state under its ``"kfac"`` entry (``preconditioner_state``).

Release 0.1.0 wrote no ``version``, an untyped ``inv`` dict (its keys told the formula) and
the EKFAC moments beside it (``ekfac``, ``basis``, ``ekfac_basis``); ``upgrade_state``
turns such a state into version 1, so old checkpoints load.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["STATE_VERSION", "LayerFactors", "g_rows", "preconditioner_state", "read_factors",
           "upgrade_state"]

STATE_VERSION = 1


@dataclass(frozen=True, eq=False)
class LayerFactors:
    """One layer's bias-corrected Kronecker factors, read from the saved state.

    Attributes:
        a: ``A`` (d, d), or its diagonal (d,) for an ``nn.Embedding``.
        g: dense ``G`` (o, o), or None when G is low-rank.
        u: ``U`` (o, k) with ``G = U U^T`` (``cols / sqrt(weight)``), or None when dense;
            only rows ``rows`` of U when ``rows`` is set.
        rows: None, or ``(start, stop)``: the rows of U held (one rank's state under
            ``woodbury_reduction="row_sharded"``).
        updates: factor updates folded into A's running average.
    """

    a: Tensor
    g: Tensor | None
    u: Tensor | None
    rows: tuple[int, int] | None
    updates: int

    @property
    def low_rank(self) -> bool:
        return self.u is not None


def preconditioner_state(state: object) -> Mapping:
    """The ``KFACPreconditioner.state_dict()`` in ``state``: itself, or the ``"kfac"`` entry
    of a ``KFAC`` optimizer's ``state_dict()``.

    Raises:
        TypeError: ``state`` is neither (it has no ``"layers"`` dict).
    """
    if not isinstance(state, Mapping):
        raise TypeError(
            "state must be a KFACPreconditioner.state_dict() (a dict with 'layers'); "
            f"got {type(state).__name__}"
        )
    if "layers" not in state and isinstance(state.get("kfac"), Mapping):
        state = state["kfac"]  # a KFAC optimizer's state_dict()
    if not isinstance(state.get("layers"), Mapping):
        raise TypeError(
            "state must be a KFACPreconditioner.state_dict(): a dict with a 'layers' dict "
            f"(keys found: {sorted(map(str, state))})"
        )
    return state


def _check_entry(entry: object, layer: str) -> Mapping:
    if not isinstance(entry, Mapping) or "A" not in entry or "G" not in entry:
        raise TypeError(f"K-FAC state layer {layer!r} must be a dict with 'A' and 'G' entries")
    return entry


def _low_rank(entry: Mapping) -> bool:
    g = entry["G"]
    return bool(entry.get("G_low_rank", isinstance(g, Mapping) and "cols" in g))


def g_rows(entry: object, layer: str) -> tuple[int, int] | None:
    """The rows ``(start, stop)`` of U that a layer's low-rank G holds (one rank's state under
    ``woodbury_reduction="row_sharded"``), or None (all rows, or a dense G).

    Raises:
        TypeError: ``entry`` is not a layer entry (a dict with ``A`` and ``G``).
    """
    entry = _check_entry(entry, layer)
    rows = entry["G"].get("rows") if isinstance(entry["G"], Mapping) else None
    return None if rows is None or not _low_rank(entry) else (int(rows[0]), int(rows[1]))


def _factor_value(entry: object, key: str, layer: str) -> tuple[Tensor, float] | None:
    """``(stored tensor, bias-correction weight)``, or None before the first factor update."""
    if not isinstance(entry, Mapping):
        raise TypeError(f"K-FAC state layer {layer!r}: a factor must be a dict with {key!r}")
    ema, weight = entry.get(key), entry.get("weight", 0.0)
    if ema is None:
        return None
    if not isinstance(ema, Tensor) or not ema.is_floating_point():
        raise TypeError(f"K-FAC state layer {layer!r}: factor {key!r} must be a float tensor")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
        raise ValueError(f"K-FAC state layer {layer!r}: factor weight must be > 0; got {weight!r}")
    return ema, float(weight)


def read_factors(entry: object, layer: str, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> LayerFactors | None:
    """The bias-corrected factors of one ``state["layers"][layer]`` entry.

    Args:
        entry: the layer's entry of ``KFACPreconditioner.state_dict()["layers"]``.
        layer: its name (for messages).
        dtype: dtype of the factors returned; None keeps float64 and gives float32 for
            every other stored dtype. The stored tensors are cast before the division.
        device: where the factors go; None: A's device (a low-rank G may be stored in host
            memory, ``woodbury_store_device``).

    Returns:
        ``LayerFactors`` (detached tensors), or None when A or G has had no factor update
        (or is not held by this rank in owner mode).

    Raises:
        TypeError: ``entry`` is not a dict with ``A`` and ``G``, a factor is not a dict, or its
            ``ema`` / ``cols`` is not a float tensor (naming the layer).
        ValueError: a factor's bias-correction weight is not > 0 (naming the layer).
    """
    entry = _check_entry(entry, layer)
    low_rank = _low_rank(entry)
    a_value = _factor_value(entry["A"], "ema", layer)
    g_value = _factor_value(entry["G"], "cols" if low_rank else "ema", layer)
    if a_value is None or g_value is None:
        return None
    (a, a_weight), (g, g_weight) = a_value, g_value

    def cast(t: Tensor) -> Tensor:
        return t.detach().to(dtype or (t.dtype if t.dtype == torch.float64 else torch.float32))

    a = cast(a)
    if device is not None:
        a = a.to(device)
    a = a / a_weight
    g = cast(g).to(a.device)
    u = None
    if low_rank:
        g, u = None, g / math.sqrt(g_weight)
    else:
        g = g / g_weight
    return LayerFactors(a=a, g=g, u=u, rows=g_rows(entry, layer),
                        updates=int(entry["A"].get("updates", 0)))


def _upgrade_inverse(entry: Mapping[str, Any], out_features: int | None) -> dict | None:
    """A 0.1.0 layer entry's ``inv`` as a tagged version-1 inverse state."""
    inv = entry.get("inv")
    if inv is None:
        return None
    common = {"s_a": inv["s_a"], "q_a": inv["q_a"], "clipped_A": 0, "clipped_G": 0}
    if "u_rows" in inv:  # a row-sharded U: the whole o is not in the state
        if out_features is None:
            raise ValueError("a 0.1.0 row-sharded K-FAC state needs the layers' out_features "
                             "to be converted (load it with KFACPreconditioner.load_state_dict)")
        rows = list(inv["u_rows"])
        if "gram_w" in inv:
            return {**common, "kind": "woodbury_rows", "u": inv["u"], "gram_s": inv["gram_s"],
                    "gram_w": inv["gram_w"], "s_g": inv["s_g"],
                    "s_g_rest": float(inv["s_g_rest"]), "u_rows": rows,
                    "rank": inv["gram_s"].shape[0], "out_features": out_features}
        return {**common, "kind": "woodbury", "u": inv["u"], "gram": inv["gram"], "u_rows": rows,
                "rank": inv["gram"].shape[0], "out_features": out_features}
    if "u" in inv:
        return {**common, "kind": "woodbury", "u": inv["u"], "gram": inv["gram"], "u_rows": None,
                "rank": inv["gram"].shape[0], "out_features": inv["u"].shape[0]}
    ekfac = entry.get("ekfac")
    moments: dict[str, Any] = {"ekfac_ema": None, "ekfac_weight": None, "ekfac_updates": None}
    if ekfac is not None:  # EKFAC layer: moments of this basis, or a fresh start
        current = entry.get("ekfac_basis") == entry.get("basis") and ekfac["ema"] is not None
        moments = {"ekfac_ema": ekfac["ema"] if current else None,
                   "ekfac_weight": float(ekfac["weight"]) if current else 0.0,
                   "ekfac_updates": int(ekfac["updates"]) if current else 0}
    low_rank = entry.get("G_low_rank") and entry["G"].get("cols") is not None
    return {**common, "kind": "eig", "s_g": inv["s_g"], "q_g": inv["q_g"],
            "s_g_rest": float(inv["s_g_rest"]),
            "rank": entry["G"]["cols"].shape[1] if low_rank else inv["q_g"].shape[0],
            "out_features": inv["q_g"].shape[0], **moments}


def upgrade_state(state: Mapping[str, Any],
                  out_features: Mapping[str, int] | None = None) -> dict:
    """``state`` in the current schema (a version-1 state is returned as it is).

    Args:
        state: a ``KFACPreconditioner.state_dict()`` of this or an earlier release (or a
            ``KFAC`` optimizer's, whose ``"kfac"`` entry is taken).
        out_features: ``{layer: o}``, needed only for row-sharded 0.1.0 states.

    Raises:
        ValueError: an unknown ``version`` (naming the accepted ones), or a 0.1.0
            row-sharded state without ``out_features``.
        TypeError: ``state`` is not a K-FAC state (as ``preconditioner_state``).
    """
    state = preconditioner_state(state)
    version = state.get("version")
    if version == STATE_VERSION:
        return dict(state)
    if version is not None:
        raise ValueError(f"K-FAC state version {version!r}; accepted: None (release 0.1.0) "
                         f"or {STATE_VERSION}")
    layers = {}
    for name, entry in state["layers"].items():
        o = None if out_features is None else out_features.get(name)
        layers[name] = {"A": entry["A"], "G": entry["G"], "G_low_rank": entry["G_low_rank"],
                        "inv": _upgrade_inverse(entry, o),
                        "nonfinite_skips": int(entry.get("nonfinite_skips", 0)),
                        "positional": bool(entry.get("positional", False))}
    return {"version": STATE_VERSION, "steps": int(state["steps"]), "layers": layers,
            "owners": state.get("owners")}
