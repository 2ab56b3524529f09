"""Trace estimators and SLQ at equal products: fisher_metrics vs curvlinops, one thread.

Command::

    OMP_NUM_THREADS=1 python benchmarks/estimators.py [--repeats 3] \
        [--out benchmarks/results/estimators.json]

Problems (float64, the models of ``benchmarks/spectra.py``): ``digits-mlp`` (2410
parameters, 300 samples) and ``gpt2-lm`` (about 35k parameters, 124 valid tokens);
curvatures GGN and Hessian of the mean cross-entropy (the Hessian on digits only, to
keep the run short).

Methods at the same number of operator products ``m``:

- Hutchinson (``m`` Rademacher probes), Hutch++ (``m``; ``m/3`` sketch, ``m/3``
  basis products, ``m/3`` residual probes), XTrace (``m``; ``m/2`` test vectors,
  Epperly, Tropp & Webber 2024): ``fm.hutchinson`` / ``fm.hutch_plus_plus`` /
  ``fm.xtrace`` against ``curvlinops.hutchinson_trace`` / ``hutchpp_trace`` / ``xtrace``;
- SLQ: ``p`` probes of ``s`` Lanczos steps without reorthogonalization
  (``fm.slq(reorth="none")``, probes in one block) against ``p`` runs of
  curvlinops' ``fast_lanczos`` (the Lanczos loop of its Papyan-2020 spectrum,
  no reorthogonalization; its boundary estimate by ARPACK is left out).

On digits also the top 5 eigenvalues (tol 1e-10 relative): ``fm.lanczos`` (one product
per step) and ``fm.block_lanczos`` (block of 5, one block product per step) against
curvlinops' operator through ``scipy.sparse.linalg.eigsh(k=5, which="LA")`` (as in
``spectra.py``); ``err`` there is the largest relative difference to ``fm.lanczos``.

Each method runs ``--repeats`` times, fisher_metrics and curvlinops interleaved in this
process; the table gives medians and ``fm / cl`` (below 1: fisher_metrics is faster).
``fm loop`` is fisher_metrics with ``chunk_size=1`` (one product per vector, the code
before block products), run once. ``err`` columns: relative error of one estimate
against the exact trace (digits only: the dense matrix from 2410 block products).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from spectra import _LMLogits, _version, digits_problem, environment, gpt2_problem
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import fisher_metrics as fm

DTYPE = torch.float64
CURVLINOPS = {"ggn": "GGNLinearOperator", "hessian": "HessianLinearOperator"}


def curvlinops_operator(model, data, curvature: str, lm: bool):
    import curvlinops

    if lm:
        net = _LMLogits(model)
        batches = [(b["input_ids"], b["input_ids"][:, 1:].reshape(-1)) for b in data]
    else:
        net, batches = model, [data]
    params = [p for p in net.parameters() if p.requires_grad]
    cls = getattr(curvlinops, CURVLINOPS[curvature])
    return cls(net, nn.CrossEntropyLoss(), params, batches, check_deterministic=False)


def methods(m: int, probes: int, steps: int):
    """``{name: (fm(op, seed) -> float, cl(op) -> float)}``, each using about ``m`` products."""
    from curvlinops.papyan2020traces.spectrum import fast_lanczos
    from curvlinops.trace.epperly2024xtrace import xtrace
    from curvlinops.trace.hutchinson import hutchinson_trace
    from curvlinops.trace.meyer2020hutch import hutchpp_trace

    def cl_slq(op):
        total = 0.0
        for _ in range(probes):
            nodes, vectors = fast_lanczos(op, steps)
            total += float((vectors[0] ** 2 * nodes).sum())
        return total / probes * op.shape[0]

    def fm_slq(op, seed):
        return (
            fm.slq(op, num_probes=probes, lanczos_steps=steps, reorth="none", seed=seed).moment(1)
            * op.shape[0]
        )

    return {
        "hutchinson": (
            lambda op, seed: fm.hutchinson(op, num_samples=m, seed=seed).estimate,
            lambda op: float(hutchinson_trace(op, m)),
        ),
        "hutch++": (
            lambda op, seed: fm.hutch_plus_plus(op, num_matvecs=m, seed=seed).estimate,
            lambda op: float(hutchpp_trace(op, m)),
        ),
        "xtrace": (
            lambda op, seed: fm.xtrace(op, num_matvecs=m, seed=seed).estimate,
            lambda op: float(xtrace(op, m)),
        ),
        f"slq {probes}x{steps}": (fm_slq, cl_slq),
    }


def timed(fn, *args):
    start = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - start


def run(name, model, data, lm, curvature, m, probes, steps, repeats) -> list[dict]:
    op = fm.make_operator(model, data, curvature, dtype=DTYPE)
    loop = fm.make_operator(model, data, curvature, dtype=DTYPE, chunk_size=1)
    cl = curvlinops_operator(model, data, curvature, lm)
    exact = None
    if not lm:
        exact = float(torch.trace(op.to_dense()))
    warm = torch.ones(op.shape[0], 2, dtype=DTYPE)
    with sdpa_kernel(SDPBackend.MATH):
        op.matmat(warm), cl @ warm  # first-call overheads
    rows = []
    for method, (fm_fn, cl_fn) in methods(m, probes, steps).items():
        fm_s, cl_s, fm_est, cl_est = [], [], None, None
        for repeat in range(repeats):
            fm_est, seconds = timed(fm_fn, op, repeat)
            fm_s.append(seconds)
            torch.manual_seed(repeat)
            with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernel lacks forward AD
                cl_est, seconds = timed(cl_fn, cl)
            cl_s.append(seconds)
        _, loop_s = timed(fm_fn, loop, 0)
        row = {
            "problem": name,
            "curvature": curvature,
            "n": op.shape[0],
            "method": method,
            "products": m if not method.startswith("slq") else probes * steps,
            "fm_s": statistics.median(fm_s),
            "cl_s": statistics.median(cl_s),
            "fm_loop_s": loop_s,
            "fm_over_cl": statistics.median(fm_s) / statistics.median(cl_s),
            "fm_s_all": fm_s,
            "cl_s_all": cl_s,
            "exact_trace": exact,
            "fm_estimate": fm_est,
            "cl_estimate": cl_est,
            "fm_rel_err": None if exact is None else abs(fm_est - exact) / abs(exact),
            "cl_rel_err": None if exact is None else abs(cl_est - exact) / abs(exact),
        }
        rows.append(row)
        print(format_row(row), flush=True)
    if not lm:
        rows.append(top5(name, op, cl, curvature, repeats))
        print(format_row(rows[-1]), flush=True)
    return rows


def top5(name, op, cl, curvature, repeats) -> dict:
    from scipy.sparse.linalg import eigsh

    def single():
        res = fm.lanczos(op, k=5, max_iter=300)
        return res.eigenvalues, res.num_matvecs

    def block():
        res = fm.block_lanczos(op, k=5, block_size=5, max_matvecs=300)
        return res.eigenvalues, res.num_matvecs

    def arpack():
        values = eigsh(cl.to_scipy(), k=5, which="LA", tol=1e-10, return_eigenvectors=False)
        return torch.tensor(sorted(values, reverse=True), dtype=DTYPE)

    seconds = {"lanczos": [], "block": [], "cl": []}
    for _ in range(repeats):
        (values, products), t = timed(single)
        seconds["lanczos"].append(t)
        (block_values, block_products), t = timed(block)
        seconds["block"].append(t)
        cl_values, t = timed(arpack)
        seconds["cl"].append(t)

    def diff(other):
        return float(((other - values).abs() / values.abs()).max())

    median = {key: statistics.median(v) for key, v in seconds.items()}
    return {
        "problem": name,
        "curvature": curvature,
        "n": op.shape[0],
        "method": "top-5 block",
        "products": block_products,
        "lanczos_products": products,
        "fm_s": median["block"],
        "cl_s": median["cl"],
        "fm_loop_s": median["lanczos"],
        "fm_over_cl": median["block"] / median["cl"],
        "lanczos_over_cl": median["lanczos"] / median["cl"],
        "fm_s_all": seconds["block"],
        "cl_s_all": seconds["cl"],
        "lanczos_s_all": seconds["lanczos"],
        "fm_top5": block_values.tolist(),
        "lanczos_top5": values.tolist(),
        "cl_top5": cl_values.tolist(),
        "fm_rel_err": diff(block_values),
        "cl_rel_err": diff(cl_values),
    }


HEADER = (
    f"{'problem':<11} {'curv':<8} {'method':<12} {'m':>4} {'fm s':>7} {'cl s':>7} "
    f"{'fm/cl':>6} {'fm loop s':>9} {'fm err':>8} {'cl err':>8}"
)


def _f(value, spec):
    return format(value, spec) if value is not None else "-".rjust(len(format(1.0, spec)))


def format_row(row: dict) -> str:
    if row["method"].startswith("top-5"):
        return (
            f"{row['problem']:<11} {row['curvature']:<8} {'top-5':<12} {row['products']:>4} "
            f"{row['fm_s']:>7.2f} {row['cl_s']:>7.2f} {row['fm_over_cl']:>6.2f} "
            f"{row['fm_loop_s']:>9.2f} {row['fm_rel_err']:8.1e} {row['cl_rel_err']:8.1e}"
            f"   (block_lanczos; fm loop = lanczos, {row['lanczos_products']} products)"
        )
    return (
        f"{row['problem']:<11} {row['curvature']:<8} {row['method']:<12} {row['products']:>4} "
        f"{row['fm_s']:>7.2f} {row['cl_s']:>7.2f} {row['fm_over_cl']:>6.2f} "
        f"{row['fm_loop_s']:>9.2f} {_f(row['fm_rel_err'], '8.1e')} {_f(row['cl_rel_err'], '8.1e')}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "estimators.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(HEADER)
    start = time.perf_counter()
    digits = digits_problem()
    rows = run("digits-mlp", *digits, False, "ggn", 60, 3, 20, args.repeats)
    rows += run("digits-mlp", *digits, False, "hessian", 60, 3, 20, args.repeats)
    rows += run("gpt2-lm", *gpt2_problem(), True, "ggn", 30, 3, 10, args.repeats)
    total = time.perf_counter() - start
    env = environment(curvlinops=_version("curvlinops-for-pytorch"),
                      chunk_size=fm.operators.DEFAULT_CHUNK_SIZE)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "OMP_NUM_THREADS=1 python benchmarks/estimators.py"
    out.write_text(
        json.dumps({"command": command, "env": env, "total_s": total, "rows": rows}, indent=1)
    )
    print(f"total {total:.1f} s; wrote {out}")


if __name__ == "__main__":
    main()
