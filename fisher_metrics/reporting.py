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
``null``), ``report.md`` (tables and warnings) and ``report.html`` (the same
with matplotlib plots embedded as base64 PNGs: per-layer K-FAC spectra, the SLQ
density, per-layer bars).

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

from ._validation import check_choice, check_int, check_positive_float, check_seed
from .compare import FISHER_CURVATURES, compare_hessian_fisher
from .data import BYTE_VOCAB_SIZE, corpus_tokens, lm_batches, tokenizer_corpus_tokens
from .eigenvalues import top_eigenvalues
from .kfac import KFACFisher
from .lanczos import slq
from .operators import CallableOperator, make_operator

__all__ = [
    "REPORT_FILES",
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


def _counting(op, bar) -> CallableOperator:
    """``op`` whose every product advances the progress bar ``bar``."""

    def matvec(v: Tensor) -> Tensor:
        bar.update(1)
        return op.matvec(v)

    return CallableOperator(matvec, op.shape[0], dtype=op.dtype, device=op.device)


# --------------------------------------------------------------------------- build


def _layer_warnings(row: dict[str, Any], cond_warn: float, ratio_warn: float) -> list[str]:
    out = []
    cond = row["condition_number"]
    if math.isnan(cond):
        out.append("zero K-FAC block (no positive eigenvalue)")
    elif cond > cond_warn:
        out.append(
            f"ill-conditioned: condition number {cond:.3g} > {cond_warn:.0e} (damping sets the "
            "step in the flattest directions)"
        )
    if row["low_rank_g"] and row["g_rank"] < row["shape"][0]:
        out.append(
            f"low-rank G: rank {row['g_rank']} < o = {row['shape'][0]}, so A (x) G has "
            f"{(row['shape'][0] - row['g_rank']) * row['shape'][1]} zero eigenvalues"
        )
    ratio = row["kfac_exact_ratio"]
    if ratio is not None and not (1.0 / ratio_warn <= ratio <= ratio_warn):
        out.append(f"K-FAC top eigenvalue is {ratio:.3g} x the exact GGN one")
    if row["exact_converged"] is False:
        out.append("exact Lanczos did not converge: the exact value is a lower bound")
    if row["tied_with"]:
        out.append(
            f"weight shared with {row['tied_with']}: the exact block counts every use, K-FAC "
            "only this layer's"
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
    cond_warn: float = 1e8,
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
        row["warnings"] = _layer_warnings(row, cond_warn, ratio_warn)
        table.append(row)
        bar.update(1)
    bar.close()

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
        density = slq(_counting(op, bar), num_probes=slq_probes, lanczos_steps=steps, seed=seed)
        bar.close()
        grid, phi = density.density(num_points=400)
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


def _markdown(result: dict[str, Any]) -> str:
    lines = ["# Curvature report", ""]
    meta = result["meta"]
    lines.append(
        f"Model `{meta['model']}`: {meta['num_params_model']} trainable parameters, "
        f"{meta['num_params_kfac']} in {result['model']['num_layers']} K-FAC layers "
        f"(K-FAC state after {meta['kfac_steps']} steps). Units: {meta['units']}."
    )
    lines += ["", meta["note"]]
    lines += ["", _provenance(meta.get("factors") or {"source": "state"})]
    if meta["skipped_layers"]:
        skipped = ", ".join(f"`{name}` ({why})" for name, why in meta["skipped_layers"].items())
        lines += ["", f"K-FAC layers without factors (not covered): {skipped}."]
    lines += ["", "## Layers", ""]
    lines.append("| " + " | ".join(TABLE_COLUMNS) + " |")
    lines.append("|" + "---|" * len(TABLE_COLUMNS))
    for row in result["table"]:
        cells = [_fmt(row[c]).replace("|", "/") for c in TABLE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    m = result["model"]
    lines += ["", "## Whole model (K-FAC, block-diagonal)", ""]
    for key in ("trace", "max_eigenvalue", "effective_rank", "condition_number", "logdet_unit"):
        lines.append(f"- {key}: {_fmt(m[key])}")
    lines.append(f"- top eigenvalues: {', '.join(_fmt(v) for v in m['top_eigenvalues'])}")
    if result["slq"]:
        s = result["slq"]
        lines += [
            "",
            "## GGN spectral density (SLQ, all trainable parameters)",
            "",
            f"- {s['num_probes']} probes x {s['lanczos_steps']} Lanczos steps over "
            f"{s['num_rows']} rows; trace estimate {_fmt(s['trace_estimate'])}, largest node "
            f"{_fmt(s['max_node'])}",
        ]
    if result["comparison"]:
        c = result["comparison"]
        lines += ["", "## Hessian vs GGN vs K-FAC (K-FAC layers' parameters)", ""]
        lines.append("| i | Hessian | GGN | K-FAC | Hessian / GGN | K-FAC / GGN |")
        lines.append("|---|---|---|---|---|---|")
        for i, h in enumerate(c["hessian_top"]):
            g = c["ggn_top"][i] if i < len(c["ggn_top"]) else None
            q = c["kfac_top"][i] if i < len(c["kfac_top"]) else None
            r1 = c["hessian_ggn_ratios"][i] if i < len(c["hessian_ggn_ratios"]) else None
            r2 = c["kfac_ggn_ratios"][i] if i < len(c["kfac_ggn_ratios"]) else None
            lines.append(f"| {i + 1} | " + " | ".join(_fmt(v) for v in (h, g, q, r1, r2)) + " |")
    warned = [(row["layer"], w) for row in result["table"] for w in row["warnings"]]
    lines += ["", "## Warnings", ""]
    lines += [f"- `{layer}`: {w}" for layer, w in warned] or ["- none"]
    return "\n".join(lines) + "\n"


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _plots(result: dict[str, Any], rep: KFACFisher) -> dict[str, str]:
    """Base64 PNGs (matplotlib ``Figure``, no pyplot state) keyed by plot name."""
    Figure = _figure()

    plots = {}
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for row in result["table"]:
        values = rep.eigenvalues(row["layer"])
        values = values[values > 1e-14 * float(values[0])]  # below: round-off of the factors
        if values.numel() == 0:
            continue
        index = torch.unique(torch.logspace(0, math.log10(values.numel()), MAX_PLOTTED).long()) - 1
        (line,) = ax.loglog((index + 1).tolist(), values[index].tolist(), label=row["layer"])
        if row["exact_top_eigenvalue"]:
            ax.plot([1], [row["exact_top_eigenvalue"]], "x", color=line.get_color(), ms=9)
    ax.set_xlabel("eigenvalue index (descending)")
    ax.set_ylabel("eigenvalue of A (x) G")
    ax.set_title("Per-layer K-FAC spectra (x: exact GGN top eigenvalue)")
    ax.legend(fontsize=7, ncol=2)
    plots["spectra"] = _png(fig)

    if result["slq"]:
        s = result["slq"]
        fig = Figure(figsize=(7, 3.6))
        ax = fig.subplots()
        density = torch.tensor(s["density"])
        density = density.clamp_min(1e-8 * float(density.max()))
        ax.semilogy(s["grid"], density.tolist())
        ax.axvline(result["model"]["max_eigenvalue"], ls="--", color="gray", label="K-FAC top")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        ax.set_title(f"GGN spectral density (SLQ, {s['num_params']} parameters)")
        ax.legend(fontsize=8)
        plots["slq"] = _png(fig)

    rows = result["table"]
    fig = Figure(figsize=(10, 0.35 * len(rows) + 1.8))
    axes = fig.subplots(1, 3, sharey=True)
    names = [row["layer"] for row in rows]
    ypos = list(range(len(rows)))
    axes[0].barh(ypos, [row["trace"] for row in rows])
    axes[0].set_xscale("log")
    axes[0].set_title("K-FAC trace")
    axes[0].set_yticks(ypos, names, fontsize=7)
    axes[1].barh(
        [y - 0.2 for y in ypos], [row["top_eigenvalue"] for row in rows], 0.4, label="K-FAC"
    )
    exact_vals = [row["exact_top_eigenvalue"] or 0.0 for row in rows]
    if any(exact_vals):
        axes[1].barh([y + 0.2 for y in ypos], exact_vals, 0.4, label="exact GGN")
    axes[1].set_xscale("log")
    axes[1].set_title("top eigenvalue")
    axes[1].legend(fontsize=7)
    conds = [row["condition_number"] for row in rows]
    axes[2].barh(ypos, [c if math.isfinite(c) else 0.0 for c in conds])
    axes[2].set_xscale("log")
    axes[2].set_title("condition number")
    axes[0].invert_yaxis()
    plots["bars"] = _png(fig)
    return plots


def _html(result: dict[str, Any], plots: dict[str, str], markdown: str) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in TABLE_COLUMNS)
    body = []
    for row in result["table"]:
        cells = "".join(f"<td>{esc(_fmt(row[c]))}</td>" for c in TABLE_COLUMNS)
        style = ' class="warn"' if row["warnings"] else ""
        body.append(f"<tr{style}>{cells}</tr>")
    images = "".join(
        f'<h2>{esc(title)}</h2><img alt="{esc(key)}" src="data:image/png;base64,{plots[key]}">'
        for key, title in (
            ("spectra", "Per-layer K-FAC spectra"),
            ("slq", "GGN spectral density (SLQ)"),
            ("bars", "Per-layer summary"),
        )
        if key in plots
    )
    summary = esc(markdown.split("## Whole model", 1)[-1])
    paragraphs = markdown.split("## Layers", 1)[0].split("\n\n")[1:]
    intro = "".join(f"<p>{esc(p.strip())}</p>" for p in paragraphs if p.strip())
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Curvature report</title>"
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}"
        "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;"
        "padding:3px 6px;text-align:right}tr.warn{background:#fff4e0}"
        "pre{background:#f6f6f6;padding:1em;white-space:pre-wrap}img{max-width:100%}</style>"
        "</head><body><h1>Curvature report</h1>"
        f"{intro}"
        f"<h2>Layers</h2><table><tr>{head}</tr>{''.join(body)}</table>"
        f"<h2>Whole model</h2><pre>## Whole model{summary}</pre>{images}</body></html>\n"
    )


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
        out: directory for ``report.json``, ``report.md``, ``report.html``
            (created); ``None`` writes nothing.
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
            - ``cond_warn`` (1e8): warn above this condition number.
            - ``ratio_warn`` (2.0): warn when ``K-FAC top / exact top`` is outside
              ``[1/r, r]`` (``r >= 1``).

    Returns:
        The per-layer table: a list of dicts (a ``pandas.DataFrame`` when pandas
        is importable) with :data:`TABLE_COLUMNS` and ``exact_converged``,
        ``exact_iterations``, ``low_rank_g``, ``g_rank``, ``factor_updates``,
        ``tied_with``. ``shape`` is ``[o, d]`` of ``A (x) G``.

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
    """Write ``report.json``, ``report.md`` and ``report.html`` of a :func:`build_report` result.

    Args:
        result: the dict :func:`build_report` returned.
        out: directory (created if missing).
        rep: the K-FAC representation the result was built from (for the spectra plot).

    Returns:
        The three paths written.

    Raises:
        TypeError: ``out`` is not a path.
        NotADirectoryError: ``out`` is an existing file.
        ImportError: matplotlib (the ``report`` extra) is missing; nothing is written.
    """
    _check_out(out)
    plots = _plots(result, rep)  # first: without matplotlib nothing is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    markdown = _markdown(result)
    paths = [out / name for name in REPORT_FILES]
    paths[0].write_text(json.dumps(_jsonable(result), indent=1, allow_nan=False))
    paths[1].write_text(markdown)
    paths[2].write_text(_html(result, plots, markdown))
    return paths
