"""The saved-state schema of ``KFACPreconditioner.state_dict()`` and its version conversion.

Schema, version 1 (``STATE_VERSION``)::

    {"version": 1, "steps": int,
     "layers": {name: {"A": {"ema", "weight", "updates"},
                       "G": {"ema", "weight", "updates"}            (dense G)
                            | {"cols", "rows", "weight", "updates"}, (low-rank G = U U^T)
                       "G_low_rank": bool,
                       "inv": None | {"kind", ...}   (``Inverse.state_dict``, tagged with the
                                                     kind of ``kfac_optim.policies.INVERSES``)
                       "nonfinite_skips": int, "positional": bool}},
     "owners": None | {"rank", "layers": {name: rank}}}

Release 0.1.0 wrote no ``version``, an untyped ``inv`` dict (its layout told the formula) and
the EKFAC moments beside it (``ekfac``, ``basis``, ``ekfac_basis``); ``upgrade_state`` turns
such a state into version 1, so old checkpoints load.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["STATE_VERSION", "upgrade_state"]

STATE_VERSION = 1


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
        state: a ``KFACPreconditioner.state_dict()`` of this or an earlier release.
        out_features: ``{layer: o}``, needed only for row-sharded 0.1.0 states.

    Raises:
        ValueError: an unknown ``version`` (naming the accepted ones), or a 0.1.0
            row-sharded state without ``out_features``.
        TypeError: ``state`` is not a K-FAC state (no ``layers``).
    """
    if not isinstance(state, Mapping) or not isinstance(state.get("layers"), Mapping):
        raise TypeError("not a K-FAC preconditioner state: expected a dict with 'layers' "
                        f"(KFACPreconditioner.state_dict()), got {type(state).__name__}")
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
