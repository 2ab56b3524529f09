"""Post-hoc curvature report of a K-FAC-trained model: table, JSON, Markdown and HTML.

One call, :func:`report`, reads the stored K-FAC factors (no pass over data for
those; :class:`~fisher_metrics.kfac.KFACFisher`) and adds a few exact
matrix-free checks on a small data set:

- per layer: K-FAC trace ``tr(A) tr(G)``, top eigenvalue, effective rank and
  condition number of ``A (x) G`` (:mod:`fisher_metrics.capacity`), the exact top
  eigenvalue of the GGN restricted to that layer's parameters (Lanczos with a
  small step budget; a lower bound when not converged) and the ratio
  ``K-FAC top / exact top``, with warnings;
- whole model: K-FAC capacity metrics and top eigenvalues; the stochastic
  Lanczos quadrature (SLQ, Ubaru, Chen & Saad 2017) spectral density of the GGN
  over every trainable parameter; the top eigenvalues of the Hessian and of the
  GGN over the K-FAC layers' parameters and their ratios
  (:func:`~fisher_metrics.compare.compare_hessian_fisher`).

Files written to ``out``: ``report.json`` (everything; non-finite numbers as
``null``), the matplotlib plots as PNG files (``spectra.png``: per-layer K-FAC
spectra down to ``SPECTRUM_FLOOR = 1e-6`` x the model's largest eigenvalue;
``slq.png``: the SLQ density, reflected at 0 because the GGN is PSD, down to
``DENSITY_FLOOR = 1e-6`` x its peak; ``bars.png``: per-layer trace on a linear axis
from 0, top eigenvalue and condition number as dots on log axes), ``report.md``
(headings, tables, warnings, the PNG files linked) and ``report.html`` (the same
content as HTML headings and tables, self-contained: the PNGs embedded as ``data:``
URIs). A layer is flagged "ill-conditioned" relative to the model's own layers
(condition number above ``cond_warn_relative`` x their median). Modules with
trainable parameters outside the K-FAC layers are listed, "skipped by design" where
``kfac_optim``'s layer registry leaves them to the base update (position tables,
LayerNorm, ...).

Units: eigenvalues and traces are those of the Fisher / GGN of the mean loss per
row (token or sample), loss per squared parameter unit.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from kfac_optim._extras import require
from kfac_optim.layers import is_supported, strip_wrapper_names

from ._validation import check_choice, check_int, check_positive_float, check_seed
from .compare import FISHER_CURVATURES, compare_hessian_fisher
from .data import BYTE_VOCAB_SIZE, corpus_tokens, lm_batches, tokenizer_corpus_tokens
from .eigenvalues import top_eigenvalues
from .kfac import BY_DESIGN, KFACFisher
from .lanczos import gaussian_density, slq
from .operators import ObservedOperator, make_operator

__all__ = [
    "PLOT_FILES",
    "REPORT_FILES",
    "SPECTRUM_FLOOR",
    "TABLE_COLUMNS",
    "build_report",
    "default_data",
    "report",
    "write_report",
]

REPORT_FILES = ("report.json", "report.md", "report.html")
TABLE_COLUMNS = (
    "layer",
    "type",
    "shape",
    "num_params",
    "trace",
    "top_eigenvalue",
    "effective_rank",
    "condition_number",
    "cond_A",
    "cond_G",
    "exact_top_eigenvalue",
    "kfac_exact_ratio",
    "warnings",
)
KFAC_NOTE = (
    "K-FAC factors are running averages over training, built from the training-loss gradients "
    "(a Kronecker-factored empirical Fisher unless labels were sampled); the exact values are "
    "the GGN (= Fisher for cross-entropy / squared error) at the final parameters on the report "
    "data. Far from a minimum the two differ (for a C-class softmax near uniform, by up to ~C), "
    "so K-FAC / exact ratios far from 1 early in training are expected."
)
FIT_NOTE = (
    "K-FAC factors fitted from the data at the current parameters (fisher_metrics.fit_factors): "
    "with the Monte-Carlo Fisher, G is an unbiased estimate of the type-2 (true Fisher) G, "
    "with the empirical Fisher it is built from the data labels' gradients. The K-FAC / exact "
    "ratios then measure the Kronecker approximation (and the MC sampling noise)."
)
MAX_PLOTTED = 400  # eigenvalues drawn per layer in the spectra plot
SPECTRUM_FLOOR = 1e-6  # spectra plot: eigenvalues below this x the model's largest are not drawn
DENSITY_FLOOR = 1e-6  # SLQ plot: density below this x its peak is not drawn
TOP_LISTED = 5  # eigenvalues per layer in the spectra table
# Numerical rank of a factor: eigenvalues above dim * eps * max count (NumPy's matrix_rank
# tolerance), with eps of float32, the factors' default storage dtype in kfac_optim.
FACTOR_EPS = torch.finfo(torch.float32).eps
PLOT_FILES = {"spectra": "spectra.png", "slq": "slq.png", "bars": "bars.png"}


# --------------------------------------------------------------------------- inputs


def default_data(
    model: nn.Module, *, seq_len: int | None = None, num_sequences: int = 8, batch_size: int = 4
) -> list[dict[str, Tensor]]:
    """The default report data: windows of ``pydoc_data.topics`` (the demo corpus).

    Byte-level ids, or, for a model loaded from a directory that holds a ``tokenizer.json``
    (``config._name_or_path``; ``python -m kfac_optim.demo --vocab bpe`` saves one), the
    same text in that vocabulary.

    Args:
        model: a Hugging Face causal LM whose ``config.vocab_size >= 257``, or one saved
            with its ``tokenizer.json``.
        seq_len: tokens per window; default ``min(64, config.n_positions)``.
        num_sequences, batch_size: see :func:`fisher_metrics.data.lm_batches`.

    Returns:
        A list of dict batches (``input_ids``, ``attention_mask``, ``labels``).

    Raises:
        ValueError: the model has no ``config.vocab_size`` of at least 257, or its
            tokenizer's ids exceed it (pass your own ``data`` then).
    """
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    saved = Path(str(getattr(config, "_name_or_path", "") or "")) / "tokenizer.json"
    if saved.is_file():
        tokens = tokenizer_corpus_tokens(saved)
        if not isinstance(vocab, int) or int(tokens.max()) >= vocab:
            raise ValueError(f"{saved} gives ids up to {int(tokens.max())}, beyond the model's "
                             f"vocab_size={vocab!r}: pass data=... for this model")
    elif not isinstance(vocab, int) or vocab < BYTE_VOCAB_SIZE:
        raise ValueError(
            "data=None uses the byte-level pydoc corpus (ids 0..256), which needs a Hugging Face "
            f"model with config.vocab_size >= {BYTE_VOCAB_SIZE}; got vocab_size={vocab!r}. "
            "Pass data=(inputs, targets), a dict batch with 'labels', or a list of them"
        )
    else:
        tokens = corpus_tokens("pydoc")
    positions = getattr(config, "n_positions", None) or getattr(
        config, "max_position_embeddings", 64
    )
    seq_len = min(64, int(positions)) if seq_len is None else check_int("seq_len", seq_len, 2)
    return lm_batches(tokens, seq_len=seq_len, num_sequences=num_sequences, batch_size=batch_size)


def _as_kfac(kfac: object, model: nn.Module) -> KFACFisher:
    """``kfac`` as a KFACFisher of ``model``.

    Raises:
        TypeError: ``kfac`` is none of the accepted kinds.
        ValueError: ``kfac`` is another model's: a preconditioner whose ``model`` is not
            ``model`` (DDP unwrapped), or factors of parameters ``model`` lacks or shapes it
            does not have.
    """
    while isinstance(model, DistributedDataParallel):
        model = model.module
    if isinstance(kfac, Mapping):
        return KFACFisher.from_state_dict(kfac, model)
    if not isinstance(kfac, KFACFisher):
        if not callable(getattr(kfac, "state_dict", None)):
            raise TypeError(
                "kfac must be a KFACFisher, a kfac_optim.KFACPreconditioner (or KFAC optimizer), "
                f"or its state_dict(); got {type(kfac).__name__}"
            )
        pre = getattr(kfac, "preconditioner", kfac)
        if getattr(pre, "model", None) is not model:
            raise ValueError(
                "kfac is the preconditioner of another model (its .model is not the model "
                "given): pass the preconditioner built on this model, or its state_dict()"
            )
        kfac = KFACFisher.from_preconditioner(kfac)
    params = dict(model.named_parameters())
    for name in kfac.param_names:
        if name not in params or params[name].shape != kfac.param_shapes[name]:
            found = "missing" if name not in params else f"shape {tuple(params[name].shape)}"
            raise ValueError(
                f"the K-FAC factors do not fit the model: parameter {name!r} (shape "
                f"{tuple(kfac.param_shapes[name])} in K-FAC) is {found} in the model (factors "
                "of another model?)"
            )
    return kfac


def _tqdm():
    return require("tqdm.auto", "report", "fisher_metrics.report (progress=True)").tqdm


def _figure():
    return require("matplotlib.figure", "report", "fisher_metrics.report (HTML plots)").Figure


class _NoBar:
    """What ``tqdm(disable=True)`` does, without tqdm (``progress=False`` needs no extra)."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(progress: bool, total: int, desc: str):
    if not progress:
        return _NoBar()
    return _tqdm()(total=total, desc=desc, leave=False)


# --------------------------------------------------------------------------- build


def _factor_condition(values: Tensor) -> tuple[float | None, int]:
    """``(condition number or None when singular, numerical rank)`` of a PSD factor.

    ``values``: its ``(dim,)`` eigenvalues, descending; rank: eigenvalues above
    ``dim * FACTOR_EPS * max``.
    """
    top = float(values[0]) if values.numel() else 0.0
    rank = int((values > values.numel() * FACTOR_EPS * top).sum()) if top > 0 else 0
    if rank < values.numel():
        return None, rank
    return top / float(values[-1]), rank


def _cond_cell(row: dict[str, Any], side: str) -> str:
    """``cond_A`` / ``cond_G`` as shown: the number, or ``singular (rank r of dim)``."""
    if row[f"cond_{side}"] is not None:
        return _fmt(row[f"cond_{side}"])
    return f"singular (rank {row[f'rank_{side}']} of {row[f'dim_{side}']})"


def _layer_warnings(
    row: dict[str, Any], median_cond: float, cond_warn_relative: float,
    cond_warn: float | None, ratio_warn: float,
) -> list[tuple[str, str]]:
    """``[(short flag, explanation)]`` for one table row."""
    out = []
    cond = row["condition_number"]
    if math.isnan(cond):
        out.append(("zero block", "no positive K-FAC eigenvalue"))
    elif cond > cond_warn_relative * median_cond:
        out.append(("ill-conditioned", (
            f"condition number {cond:.3g} > {cond_warn_relative:g} x the median over this "
            f"model's K-FAC layers ({median_cond:.3g}); damping sets the step in the flattest "
            "directions"
        )))
    elif cond_warn is not None and cond > cond_warn:
        out.append(("ill-conditioned",
                    f"condition number {cond:.3g} > cond_warn = {cond_warn:.3g}"))
    if row["low_rank_g"] and row["g_rank"] < row["shape"][0]:
        out.append(("low-rank G", (
            f"rank {row['g_rank']} < o = {row['shape'][0]}, so A (x) G has "
            f"{(row['shape'][0] - row['g_rank']) * row['shape'][1]} zero eigenvalues"
        )))
    ratio = row["kfac_exact_ratio"]
    if ratio is not None and not (1.0 / ratio_warn <= ratio <= ratio_warn):
        out.append((f"K-FAC / exact = {ratio:.3g}",
                    f"the K-FAC top eigenvalue is {ratio:.3g} x the exact GGN one"))
    if row["exact_converged"] is False:
        out.append(("exact: lower bound", "exact Lanczos did not converge"))
    if row["tied_with"]:
        out.append(("tied weight", (
            f"shared with {', '.join(row['tied_with'])}: the exact block counts every use, "
            "K-FAC only this layer's"
        )))
    return out


def _psd_density(
    nodes: Tensor, weights: Tensor, num_points: int = 400
) -> tuple[Tensor, Tensor, float]:
    """Gaussian-smoothed SLQ density of a PSD matrix: ``(grid, phi, sigma)`` on ``[0, hi]``.

    ``phi(t) = sum_i w_i [N(t; theta_i, sigma^2) + N(-t; theta_i, sigma^2)]`` for
    ``t >= 0``: the kernel mass below 0 is reflected back (a PSD spectrum has none
    there), so ``phi >= 0`` and it still integrates to 1. Nodes below 0 (round-off)
    count as 0. ``sigma``: 1% of the largest node (0.01 if all are 0); ``hi = max
    node + 6 sigma``.
    """
    nodes = nodes.detach().to("cpu", torch.float64).clamp_min(0.0)
    top = float(nodes.max())
    sigma = 0.01 * top if top > 0 else 0.01
    grid = torch.linspace(0.0, top + 6 * sigma, num_points, dtype=torch.float64)
    _, phi = gaussian_density(nodes, weights, grid=grid, sigma=sigma)
    _, mirrored = gaussian_density(nodes, weights, grid=-grid, sigma=sigma)
    return grid, phi + mirrored, sigma


def _uncovered_modules(model: nn.Module, rep: KFACFisher) -> dict[str, str]:
    """``{module: reason}`` for modules holding trainable parameters outside every K-FAC
    layer (and not in ``rep.skipped_layers``), as the registry ``kfac_optim.layers`` decides."""
    while isinstance(model, DistributedDataParallel):
        model = model.module
    covered = set(rep.aliases) | set(rep.param_names)
    out = {}
    for wrapped, module in model.named_modules():
        name = strip_wrapper_names(wrapped)
        if name in rep.skipped_layers or name in rep.layers:
            continue
        left = [p for p, t in module.named_parameters(recurse=False)
                if t.requires_grad and (f"{name}.{p}" if name else p) not in covered]
        if not left:
            continue
        kind = type(module).__name__
        out[name or "<root>"] = (
            f"skipped by design ({kind} is not a layer kind K-FAC preconditions: "
            f"{', '.join(left)} take the base update)" if not is_supported(module) else
            f"not covered ({kind} {', '.join(left)}: not in the K-FAC state, e.g. skip_layers)"
        )
    return out


def build_report(
    model: nn.Module,
    data: Any = None,
    *,
    kfac: object,
    k: int = 10,
    exact: bool = True,
    exact_curvature: str = "ggn",
    exact_max_iter: int = 20,
    slq_probes: int = 4,
    slq_steps: int = 20,
    hessian_k: int = 3,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    loss_fn: str | Callable[[Tensor, Tensor], Tensor] | None = None,
    progress: bool = True,
    cond_warn_relative: float = 10.0,
    cond_warn: float | None = None,
    ratio_warn: float = 2.0,
) -> dict[str, Any]:
    """Compute everything :func:`report` writes, without writing; see :func:`report` for arguments.

    Returns:
        ``{"table": [row per layer], "model": {...}, "slq": {...} or None,
        "comparison": {...} or None, "meta": {...}}`` with plain Python values
        (lists, floats, strings) only.

    Raises:
        TypeError / ValueError: as for :func:`report`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    k = check_int("k", k)
    if not isinstance(exact, bool):
        raise TypeError(f"exact must be True or False; got {exact!r}")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False; got {progress!r}")
    check_choice("exact_curvature", exact_curvature, FISHER_CURVATURES)
    exact_max_iter = check_int("exact_max_iter", exact_max_iter)
    slq_probes = check_int("slq_probes", slq_probes, minimum=0)
    slq_steps = check_int("slq_steps", slq_steps)
    hessian_k = check_int("hessian_k", hessian_k, minimum=0)
    seed = check_seed("seed", seed)
    cond_warn_relative = check_positive_float("cond_warn_relative", cond_warn_relative)
    if cond_warn is not None:
        cond_warn = check_positive_float("cond_warn", cond_warn)
    ratio_warn = check_positive_float("ratio_warn", ratio_warn)
    if ratio_warn < 1:
        raise ValueError(f"ratio_warn must be >= 1; got {ratio_warn}")
    rep = _as_kfac(kfac, model)
    if data is None:
        data = default_data(model)
    started = time.perf_counter()
    lanczos_kwargs = dict(seed=seed, dtype=dtype, loss_fn=loss_fn)

    names_by_param: dict[str, list[str]] = {}
    for alias, name in rep.aliases.items():
        names_by_param.setdefault(name, []).append(alias)
    table = []
    bar = _progress(progress, len(rep.layers), "fisher_metrics: layers")
    for layer in rep.layers:
        factors = rep.factors(layer)
        metrics = rep.capacity(layer)
        weight = rep.layer_params[layer][0]
        owner = f"{layer}.weight"
        tied = sorted(a for a in names_by_param.get(weight, []) if a not in (owner, weight))
        if owner != weight:
            tied = sorted(set(tied) | {weight})
        row = {
            "layer": layer,
            "type": type(model.get_submodule(layer)).__name__,
            "shape": list(factors["shape"]),
            "num_params": rep.layer_size(layer),
            "trace": rep.trace(layer),
            "top_eigenvalue": metrics["max_eigenvalue"],
            "effective_rank": metrics["effective_rank"],
            "condition_number": metrics["condition_number"],
            "exact_top_eigenvalue": None,
            "kfac_exact_ratio": None,
            "exact_converged": None,
            "exact_iterations": None,
            "low_rank_g": factors["low_rank"],
            "g_rank": factors["U"].shape[1] if factors["low_rank"] else factors["shape"][0],
            "factor_updates": factors["updates"],
            "tied_with": tied,
        }
        for side, values in zip("AG", rep.factor_eigenvalues(layer), strict=True):
            row[f"cond_{side}"], row[f"rank_{side}"] = _factor_condition(values)
            row[f"dim_{side}"] = values.numel()
        if exact:
            res = top_eigenvalues(
                model,
                data,
                curvature=exact_curvature,
                k=1,
                params=rep.layer_params[layer],
                max_iter=min(exact_max_iter, rep.layer_size(layer)),
                **lanczos_kwargs,
            )
            row["exact_top_eigenvalue"] = res["max_eigenvalue"]
            row["exact_converged"] = bool(res["converged"][0])
            row["exact_iterations"] = res["lanczos_iterations"]
            if res["max_eigenvalue"] > 0:
                row["kfac_exact_ratio"] = row["top_eigenvalue"] / res["max_eigenvalue"]
        table.append(row)
        bar.update(1)
    bar.close()
    conds = [row["condition_number"] for row in table if math.isfinite(row["condition_number"])]
    median_cond = float(torch.tensor(conds).median()) if conds else math.inf
    for row in table:
        found = _layer_warnings(row, median_cond, cond_warn_relative, cond_warn, ratio_warn)
        row["flags"] = [flag for flag, _ in found]
        row["warnings"] = [f"{flag}: {why}" for flag, why in found]

    top = rep.top_k(min(k, rep.num_params))
    model_metrics = rep.capacity()
    model_metrics.update(
        top_eigenvalues=top.values.tolist(),
        top_eigenvalue_layers=top.layers,
        num_layers=len(rep.layers),
        steps=rep.steps,
    )

    slq_result = None
    if slq_probes:
        op = make_operator(model, data, "ggn", dtype=dtype, loss_fn=loss_fn)
        steps = min(slq_steps, op.shape[0])
        bar = _progress(progress, slq_probes * steps, "fisher_metrics: SLQ")
        density = slq(ObservedOperator(op, bar.update), num_probes=slq_probes,
                      lanczos_steps=steps, seed=seed)
        bar.close()
        grid, phi, sigma = _psd_density(density.nodes, density.weights)
        slq_result = {
            "curvature": "ggn",
            "params": "all trainable",
            "num_params": op.shape[0],
            "num_rows": op.num_rows,
            "num_probes": density.num_probes,
            "lanczos_steps": density.lanczos_steps,
            "trace_estimate": density.moment(1) * op.shape[0],
            "max_node": float(density.nodes.max()),
            "nodes": density.nodes.tolist(),
            "weights": density.weights.tolist(),
            "sigma": sigma,
            "grid": grid.tolist(),
            "density": phi.tolist(),
        }

    comparison = None
    if hessian_k:
        hk = min(hessian_k, rep.num_params)
        cmp = compare_hessian_fisher(
            model,
            data,
            k=hk,
            params=rep.param_names,
            max_iter=min(rep.num_params, max(2 * hk + 10, exact_max_iter)),
            **lanczos_kwargs,
        )
        kfac_top = rep.top_k(hk).values.tolist()
        fisher_top = cmp["fisher"]["top_eigenvalues"]
        comparison = {
            "params": "K-FAC layers",
            "hessian_top": cmp["hessian"]["top_eigenvalues"],
            "hessian_converged": cmp["hessian"]["converged"],
            "ggn_top": fisher_top,
            "ggn_converged": cmp["fisher"]["converged"],
            "hessian_ggn_ratios": cmp["ratios"],
            "kfac_top": kfac_top,
            "kfac_ggn_ratios": [
                a / b if b else math.nan for a, b in zip(kfac_top, fisher_top, strict=False)
            ],
        }

    provenance = dict(rep.provenance)  # how the factors were obtained
    meta = {
        "model": type(model).__name__,
        "num_params_model": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "num_params_kfac": rep.num_params,
        "kfac_steps": rep.steps,
        "exact_curvature": exact_curvature if exact else None,
        "exact_max_iter": exact_max_iter,
        "seed": seed,
        "seconds": time.perf_counter() - started,
        "torch": torch.__version__,
        "units": "loss per squared parameter unit (Fisher/GGN of the mean loss per row)",
        "note": FIT_NOTE if provenance.get("source") == "fitted" else KFAC_NOTE,
        "skipped_layers": dict(rep.skipped_layers),
        "uncovered_modules": _uncovered_modules(model, rep),
        "median_condition_number": median_cond,
        "cond_warn_relative": cond_warn_relative,
        "cond_warn": cond_warn,
        "factors": provenance,
    }
    return {
        "table": table,
        "model": model_metrics,
        "slq": slq_result,
        "comparison": comparison,
        "meta": meta,
    }


# --------------------------------------------------------------------------- writers


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return " x ".join(map(str, value))
    if isinstance(value, (list, tuple)):
        return "; ".join(map(str, value))
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): _jsonable(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _provenance(factors: Mapping[str, Any]) -> str:
    """One sentence: how the K-FAC factors were obtained (``meta["factors"]``)."""
    if factors.get("source") == "fitted":
        return (f"Factors: fitted from data in one pass ({factors['fisher']} Fisher, "
                f"{factors['num_batches']} batches, {factors['num_rows']} loss rows; "
                "fisher_metrics.fit_factors).")
    return f"Factors: loaded from a saved K-FAC state ({factors.get('steps', '?')} steps)."


def _cell(row: dict[str, Any], column: str) -> str:
    if column in ("cond_A", "cond_G"):
        return _cond_cell(row, column[-1])
    return _fmt(row[column])


def _document(result: dict[str, Any], plots: Mapping[str, str]) -> list[tuple]:
    """The report as blocks, rendered to Markdown and to HTML by the same content.

    Blocks: ``("h1" | "h2", text)``, ``("p", text)``, ``("ul", [text])``,
    ``("table", headers, [[cell]])``, ``("img", plot key, caption)``; text is plain
    (no markup), escaped by each renderer.
    """
    meta, m = result["meta"], result["model"]
    doc: list[tuple] = [("h1", "Curvature report")]
    doc.append(("p", (
        f"Model {meta['model']}: {meta['num_params_model']} trainable parameters, "
        f"{meta['num_params_kfac']} in {m['num_layers']} K-FAC layers. "
        f"{_provenance(meta.get('factors') or {'source': 'state', 'steps': meta['kfac_steps']})}"
        f" Units: {meta['units']}."
    )))
    doc.append(("p", meta["note"]))
    by_design = {k: v for k, v in meta["skipped_layers"].items() if v.startswith(BY_DESIGN)}
    missing = {k: v for k, v in meta["skipped_layers"].items() if k not in by_design}
    uncovered = [f"{name}: {why}" for name, why in by_design.items()]
    uncovered += [f"{name}: not covered, {why}" for name, why in missing.items()]
    uncovered += [f"{name}: {why}" for name, why in meta["uncovered_modules"].items()]
    if uncovered:
        doc += [("h2", "Parameters outside the K-FAC layers"), ("ul", uncovered)]

    doc.append(("h2", "Layers"))
    columns = [*TABLE_COLUMNS[:-1], "flags"]
    headers = [c if c.startswith("cond_") else c.replace("_", " ") for c in columns]
    doc.append(("table", headers, [[_cell(row, c) for c in columns] for row in result["table"]]))
    doc.append(("p", (
        "condition_number: of A (x) G over the eigenvalues above n eps (float64) times the "
        "largest; cond_A, cond_G: of each factor, 'singular (rank r of d)' when some "
        f"eigenvalue is at or below d eps (float32, {FACTOR_EPS:.2g}) times the largest. "
        f"Layers above {meta['cond_warn_relative']:g} x the model's median condition number "
        f"({_fmt(meta['median_condition_number'])}) are flagged ill-conditioned (their rows "
        "shaded in the HTML page)."
    )))
    warned = [f"{row['layer']}: {w}" for row in result["table"] for w in row["warnings"]]
    doc += [("h2", "Warnings"), ("ul", warned or ["none"])]

    doc.append(("h2", "Whole model (K-FAC, block-diagonal)"))
    doc.append(("table", ["metric", "value"], [
        ["trace", _fmt(m["trace"])],
        ["largest eigenvalue", _fmt(m["max_eigenvalue"])],
        ["effective rank", _fmt(m["effective_rank"])],
        ["condition number", _fmt(m["condition_number"])],
        ["log det (A (x) G + I)", _fmt(m["logdet_unit"])],
        [f"top {len(m['top_eigenvalues'])} eigenvalues",
         ", ".join(_fmt(v) for v in m["top_eigenvalues"])],
        ["their layers", ", ".join(m["top_eigenvalue_layers"])],
    ]))
    if result["comparison"]:
        c = result["comparison"]

        def at(values: list, i: int) -> str:
            return _fmt(values[i]) if i < len(values) else ""

        doc.append(("h2", "Hessian vs GGN vs K-FAC (K-FAC layers' parameters)"))
        doc.append(("table", ["i", "Hessian", "GGN", "K-FAC", "Hessian / GGN", "K-FAC / GGN"], [
            [str(i + 1), _fmt(h), at(c["ggn_top"], i), at(c["kfac_top"], i),
             at(c["hessian_ggn_ratios"], i), at(c["kfac_ggn_ratios"], i)]
            for i, h in enumerate(c["hessian_top"])
        ]))
    if result["slq"]:
        s = result["slq"]
        doc.append(("h2", "GGN spectral density (SLQ, all trainable parameters)"))
        doc.append(("p", (
            f"{s['num_probes']} probes x {s['lanczos_steps']} Lanczos steps over "
            f"{s['num_rows']} rows, {s['num_params']} parameters; trace estimate "
            f"{_fmt(s['trace_estimate'])}, largest node {_fmt(s['max_node'])}, Gaussian "
            f"width {_fmt(s['sigma'])}."
        )))
    doc.append(("h2", "Per-layer K-FAC spectra"))
    doc.append(("table", ["layer", f"top {TOP_LISTED} eigenvalues", "exact GGN top",
                          f"eigenvalues >= {SPECTRUM_FLOOR:g} x model top", "of"], [
        [row["layer"], ", ".join(_fmt(v) for v in row["top_eigenvalues"]),
         _fmt(row["exact_top_eigenvalue"]), str(row["above_floor"]), str(row["num_params"])]
        for row in result["spectra"]
    ]))
    captions = {
        "spectra": (f"Per-layer K-FAC spectra (eigenvalues of A (x) G, descending; below "
                    f"{SPECTRUM_FLOOR:g} x the model's largest not drawn)."),
        "slq": (f"GGN spectral density by SLQ (Gaussian-smoothed, Ubaru, Chen & Saad 2017), "
                f"reflected at 0 (the GGN is PSD), drawn down to {DENSITY_FLOOR:g} x its peak."),
        "bars": ("Per-layer summary: K-FAC trace (linear axis from 0); top eigenvalue and "
                 "condition number as dots on log axes (no bar baseline)."),
    }
    for key in PLOT_FILES:
        if key in plots:
            doc.append(("img", key, captions[key]))
    return doc


def _markdown(doc: list[tuple]) -> str:
    lines: list[str] = []
    for block in doc:
        kind = block[0]
        if kind in ("h1", "h2"):
            lines += ["#" * int(kind[1]) + " " + block[1], ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "ul":
            lines += [f"- {item}" for item in block[1]] + [""]
        elif kind == "table":
            _, head, rows = block
            lines.append("| " + " | ".join(head) + " |")
            lines.append("|" + "---|" * len(head))
            lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
            lines.append("")
        elif kind == "img":
            lines += [f"![{block[2]}]({PLOT_FILES[block[1]]})", ""]
    return "\n".join(lines)


HTML_STYLE = (
    "body{font-family:sans-serif;margin:1.5em;max-width:1400px;color:#222}"
    ".scroll{overflow-x:auto}table{border-collapse:collapse;font-size:12px;margin:0.5em 0}"
    "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f0f0f0}"
    "td.text,th.text{text-align:left}"
    "tr.warn{background:#fff4e0}"
    "figure{margin:1em 0}img{max-width:100%}figcaption{font-size:12px;color:#555}"
)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _html(doc: list[tuple], images: Mapping[str, bytes], warn_rows: set[int]) -> str:
    """``doc`` as one self-contained HTML page (images embedded as data: URIs)."""
    esc = html.escape
    parts = []
    tables = 0
    for block in doc:
        kind = block[0]
        if kind in ("h1", "h2"):
            parts.append(f"<{kind}>{esc(block[1])}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{esc(block[1])}</p>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in block[1]) + "</ul>")
        elif kind == "table":
            _, head, rows = block
            # a column of numbers is right-aligned, one holding any text left-aligned
            text = [any(c and not _is_number(c) for c in col) for col in zip(*rows, strict=True)]
            text = text or [True] * len(head)
            body = []
            for i, r in enumerate(rows):
                style = ' class="warn"' if tables == 0 and i in warn_rows else ""
                body.append(f"<tr{style}>" + "".join(
                    f"<td{' class=text' if t else ''}>{esc(c)}</td>"
                    for c, t in zip(r, text, strict=True)) + "</tr>")
            parts.append("<div class='scroll'><table><thead><tr>"
                         + "".join(f"<th{' class=text' if t else ''}>{esc(h)}</th>"
                                   for h, t in zip(head, text, strict=True))
                         + "</tr></thead><tbody>" + "".join(body) + "</tbody></table></div>")
            tables += 1
        elif kind == "img":
            data = base64.b64encode(images[block[1]]).decode("ascii")
            parts.append(f'<figure><img alt="{esc(block[2])}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{esc(block[2])}</figcaption></figure>")
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>Curvature report</title><style>{HTML_STYLE}</style></head><body>\n"
        + "\n".join(parts) + "\n</body></html>\n"
    )


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _spectra_rows(result: dict[str, Any], rep: KFACFisher) -> list[dict[str, Any]]:
    """Per layer: top eigenvalues, count above the plot floor, the values drawn."""
    floor = SPECTRUM_FLOOR * float(result["model"]["max_eigenvalue"])
    rows = []
    for row in result["table"]:
        values = rep.eigenvalues(row["layer"])
        count = int((values >= floor).sum()) if floor > 0 else int((values > 0).sum())
        index = torch.zeros(0, dtype=torch.long)
        if count:  # MAX_PLOTTED log-spaced indices keep the plot (and memory) small
            index = torch.unique(torch.logspace(0, math.log10(count), MAX_PLOTTED).long()) - 1
        rows.append({
            "layer": row["layer"],
            "top_eigenvalues": values[:TOP_LISTED].tolist(),
            "exact_top_eigenvalue": row["exact_top_eigenvalue"],
            "above_floor": count,
            "num_params": row["num_params"],
            "_drawn": ((index + 1).tolist(), values[index].tolist()),
        })
    return rows


def _plots(result: dict[str, Any]) -> dict[str, bytes]:
    """PNG bytes (matplotlib ``Figure``, Agg canvas, no pyplot state) keyed by plot name."""
    Figure = _figure()
    plots = {}
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    top = float(result["model"]["max_eigenvalue"])
    for row in result["spectra"]:
        if row["above_floor"]:
            ax.loglog(*row["_drawn"],
                      label=f"{row['layer']} ({row['above_floor']} of {row['num_params']})")
    if top > 0:
        ax.set_ylim(SPECTRUM_FLOOR * top, 2 * top)
    ax.set_xlabel("eigenvalue index (descending)")
    ax.set_ylabel("eigenvalue of A (x) G")
    ax.set_title(f"Per-layer K-FAC spectra, down to {SPECTRUM_FLOOR:g} x the largest")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, title="layer (eigenvalues drawn of total)", title_fontsize=7)
    plots["spectra"] = _png(fig)

    if result["slq"]:
        s = result["slq"]
        fig = Figure(figsize=(7, 3.6))
        ax = fig.subplots()
        density = torch.tensor(s["density"])
        floor = DENSITY_FLOOR * float(density.max())
        shown = torch.where(density >= floor, density, torch.full_like(density, math.nan))
        ax.semilogy(s["grid"], shown.tolist(), label="SLQ density")
        ax.set_ylim(floor, 2 * float(density.max()))
        ax.set_xlim(0, s["grid"][-1])
        ax.axvline(top, ls="--", color="gray", label=f"K-FAC top {top:.3g}")
        if result["comparison"] and result["comparison"]["ggn_top"]:
            exact = result["comparison"]["ggn_top"][0]
            ax.axvline(exact, ls=":", color="black",
                       label=f"GGN top, K-FAC layers (Lanczos) {exact:.3g}")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density (1 / eigenvalue unit)")
        ax.set_title(f"GGN spectral density (SLQ, {s['num_params']} parameters)")
        ax.legend(fontsize=8)
        plots["slq"] = _png(fig)

    rows = result["table"]
    fig = Figure(figsize=(11, 0.35 * len(rows) + 1.8))
    axes = fig.subplots(1, 3, sharey=True)
    names = [row["layer"] for row in rows]
    ypos = list(range(len(rows)))
    axes[0].barh(ypos, [row["trace"] for row in rows])
    axes[0].set_xlim(left=0)
    axes[0].set_title("K-FAC trace (linear, from 0)")
    axes[0].set_yticks(ypos, names, fontsize=7)
    axes[1].plot([row["top_eigenvalue"] for row in rows], ypos, "o", label="K-FAC")
    exact = [(row["exact_top_eigenvalue"], y) for row, y in zip(rows, ypos, strict=True)
             if row["exact_top_eigenvalue"]]
    if exact:
        axes[1].plot(*zip(*exact, strict=True), "s", mfc="none", label="exact GGN")
    axes[1].set_xscale("log")
    axes[1].set_title("top eigenvalue (log, dots)")
    axes[1].legend(fontsize=7)
    conds = [(row["condition_number"], y) for row, y in zip(rows, ypos, strict=True)
             if math.isfinite(row["condition_number"])]
    if conds:
        axes[2].plot(*zip(*conds, strict=True), "o")
    median = result["meta"]["median_condition_number"]
    if math.isfinite(median):
        axes[2].axvline(median, color="gray", ls="--", lw=1, label="median")
        axes[2].axvline(result["meta"]["cond_warn_relative"] * median, color="tab:red", ls=":",
                        lw=1, label=f"{result['meta']['cond_warn_relative']:g} x median (flag)")
        axes[2].legend(fontsize=7)
    axes[2].set_xscale("log")
    axes[2].set_title("condition number (log, dots)")
    for ax in axes:
        ax.grid(True, axis="x", which="major", alpha=0.3)
    axes[0].invert_yaxis()
    plots["bars"] = _png(fig)
    return plots


def report(
    model: nn.Module,
    data: Any = None,
    *,
    kfac: object,
    out: str | Path | None = None,
    **options: Any,
) -> Any:
    """Per-layer and whole-model curvature report from stored K-FAC factors plus exact checks.

    Args:
        model: the trained model (``nn.Module``; Hugging Face models included).
        data: data for the exact checks, as for
            :func:`fisher_metrics.top_eigenvalues`; ``None``: 8 byte-level
            windows of the ``pydoc_data.topics`` corpus (:func:`default_data`,
            Hugging Face causal LMs with ``vocab_size >= 257`` only).
        kfac: a :class:`~fisher_metrics.kfac.KFACFisher`, a
            ``kfac_optim.KFACPreconditioner`` / ``KFAC`` optimizer, or a
            ``state_dict()`` of one (for ``model``).
        out: directory for ``report.json``, ``report.md``, ``report.html`` and the
            plots as PNG files (created; see :func:`write_report`); ``None`` writes
            nothing.
        **options: keyword arguments of :func:`build_report` (defaults in brackets):

            - ``k`` (10): whole-model K-FAC top eigenvalues listed.
            - ``exact`` (True): run the per-layer exact Lanczos checks.
            - ``exact_curvature`` (``"ggn"``): or ``"fisher_mc"`` / ``"empirical_fisher"``.
            - ``exact_max_iter`` (20): Lanczos steps per layer (>= 1; small keeps it
              fast, the value is then a lower bound, flagged when not converged).
            - ``slq_probes`` (4): SLQ probes for the whole-model GGN density (``0``: skip).
            - ``slq_steps`` (20): Lanczos steps per SLQ probe.
            - ``hessian_k`` (3): top Hessian / GGN eigenvalues compared (``0``: skip).
            - ``dtype`` (None): dtype of the exact products (``None``: the model's).
            - ``seed`` (0): seed of every random start / probe.
            - ``loss_fn`` (None): see :func:`fisher_metrics.top_eigenvalues`.
            - ``progress`` (True): show tqdm progress bars (stderr; needs the
              ``report`` extra, ``False`` does not).
            - ``cond_warn_relative`` (10.0): flag a layer "ill-conditioned" when its
              condition number exceeds this multiple of the median over the model's
              K-FAC layers (relative: a flag every layer gets says nothing).
            - ``cond_warn`` (None): also flag above this absolute condition number.
            - ``ratio_warn`` (2.0): warn when ``K-FAC top / exact top`` is outside
              ``[1/r, r]`` (``r >= 1``).

    Returns:
        The per-layer table: a list of dicts (a ``pandas.DataFrame`` when pandas
        is importable) with :data:`TABLE_COLUMNS` and ``exact_converged``,
        ``exact_iterations``, ``low_rank_g``, ``g_rank``, ``factor_updates``,
        ``tied_with``, ``rank_A``, ``dim_A``, ``rank_G``, ``dim_G`` and ``flags`` (short
        forms of ``warnings``). ``shape`` is ``[o, d]`` of ``A (x) G``. ``cond_A`` /
        ``cond_G``: condition numbers of the factors, ``None`` when singular (numerical
        rank ``rank_A < dim_A``: eigenvalues at or below ``dim * eps(float32) * max``
        count as zero; the report shows "singular (rank r of d)").

    Raises:
        TypeError / ValueError: bad arguments (named), a K-FAC state or
            ``KFACFisher`` that does not fit ``model`` (layers or shapes), a
            preconditioner built on another model (ValueError), one owner-mode rank's
            state (ValueError), or ``data=None`` for a model without a byte-level
            vocabulary.
        ImportError: ``out`` given (HTML plots: matplotlib) or ``progress=True`` (tqdm)
            without the ``report`` extra; checked before any computation.
        NotADirectoryError: ``out`` is an existing file (checked before any computation).
    """
    if out is not None:
        _check_out(out)
        _figure()
    if options.get("progress", True) is True:
        _tqdm()
    rep = _as_kfac(kfac, model)
    result = build_report(model, data, kfac=rep, **options)
    if out is not None:
        write_report(result, out, rep)
    table = result["table"]
    try:
        import pandas
    except ImportError:
        return table
    return pandas.DataFrame(table)


def _check_out(out: Any) -> None:
    """Raises:
        TypeError: ``out`` is not a path.
        NotADirectoryError: ``out`` exists and is not a directory.
    """
    if not isinstance(out, (str, Path)):
        raise TypeError(f"out must be a directory path (str or Path); got {type(out).__name__}")
    if Path(out).exists() and not Path(out).is_dir():
        raise NotADirectoryError(f"out={str(out)!r} is an existing file; the report writes "
                                 "report.json, report.md and report.html into a directory: pass "
                                 "a directory path (created if missing)")


def write_report(result: dict[str, Any], out: str | Path, rep: KFACFisher) -> list[Path]:
    """Write the report files of a :func:`build_report` result into ``out``.

    Files: ``report.json`` (the result plus a per-layer ``spectra`` table; non-finite
    numbers as ``null``), the plots as PNG files (:data:`PLOT_FILES`: ``spectra.png``,
    ``slq.png`` when SLQ ran, ``bars.png``), ``report.md`` (headings, tables, warnings,
    the PNG files linked beside it) and ``report.html`` (the same content as HTML
    tables and headings, self-contained: the plots embedded as ``data:`` PNG URIs).

    Args:
        result: the dict :func:`build_report` returned.
        out: directory (created if missing).
        rep: the K-FAC representation the result was built from (for the spectra).

    Returns:
        The paths written: the three :data:`REPORT_FILES`, then the PNG files.

    Raises:
        TypeError: ``out`` is not a path.
        NotADirectoryError: ``out`` is an existing file.
        ImportError: matplotlib (the ``report`` extra) is missing; nothing is written.
    """
    _check_out(out)
    _figure()  # first: without matplotlib nothing is computed or written
    spectra = _spectra_rows(result, rep)
    full = {**result, "spectra": spectra}
    plots = _plots(full)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    doc = _document(full, plots)
    warn_rows = {i for i, row in enumerate(result["table"]) if "ill-conditioned" in row["flags"]}
    paths = [out / name for name in REPORT_FILES]
    saved = {**result, "spectra": [{k: v for k, v in row.items() if k != "_drawn"}
                                   for row in spectra]}
    paths[0].write_text(json.dumps(_jsonable(saved), indent=1, allow_nan=False))
    paths[1].write_text(_markdown(doc))
    paths[2].write_text(_html(doc, plots, warn_rows))
    for key, data in plots.items():
        paths.append(out / PLOT_FILES[key])
        paths[-1].write_bytes(data)
    return paths
