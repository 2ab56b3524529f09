"""Top-5 eigenvalues of the GGN, empirical Fisher and Hessian: time and accuracy.

Command::

    python benchmarks/spectra.py [--threads 1] [--out benchmarks/results/spectra.json]

Problems (float64, trained briefly so the curvature is not that of the initialisation):

- ``digits-mlp``: scikit-learn digits, 300 standardized samples, MLP 64-32-10 with
  tanh (2410 parameters), cross-entropy;
- ``gpt2-lm``: GPT-2 (2 layers, width 32, 2 heads, 257 byte ids, about 35k
  parameters) on 4 windows of 32 bytes of the pydoc corpus (124 valid tokens).

Methods:

- ``fisher_metrics``: ``fm.top_eigenvalues`` (matrix-free Lanczos, full
  reorthogonalisation, tol 1e-10 relative);
- ``curvlinops+eigsh``: curvlinops' linear operators (``to_scipy()``) with
  ``scipy.sparse.linalg.eigsh(k=5, which="LA")``, where curvlinops imports;
- ``dense``: references built here, independently of both: the GGN
  ``(1/R) sum J^T H J`` from ``torch.func.jacrev`` Jacobians, the empirical
  Fisher from per-row gradients, the Hessian from ``torch.func.hessian``, then
  ``torch.linalg.eigvalsh``. Only where they fit: all three for the MLP; for
  GPT-2 only the empirical Fisher (through the 124 x 124 Gram matrix of the
  per-token gradients; a dense GGN or Hessian would take 35k x 35k).

Relative error: ``max_i |lambda_i - ref_i| / |ref_i|`` over the top 5 against the
dense reference (else against curvlinops+eigsh). Hessian rows also check one
Hessian-vector product of each library against central finite differences of
the gradient (``hvp_vs_finite_differences`` in the JSON; printed below the table).
Times are wall seconds on the machine named in the JSON (its load average is
recorded: the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel

import fisher_metrics as fm
from fisher_metrics.data import corpus_tokens, lm_batches

K = 5
DTYPE = torch.float64
CURVATURES = ("ggn", "empirical_fisher", "hessian")
CURVLINOPS_NAMES = {"ggn": "GGNLinearOperator", "empirical_fisher": "EFLinearOperator",
                    "hessian": "HessianLinearOperator"}


# --------------------------------------------------------------------------- problems


def digits_problem(seed: int = 0):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x[:300], dtype=DTYPE)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    y = torch.tensor(y[:300])
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).to(DTYPE)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), (x, y)


class _LMLogits(nn.Module):
    """GPT-2 as ``ids (B, S) -> next-token logits (B (S - 1), V)`` for curvlinops."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.lm(input_ids=ids, use_cache=False).logits[:, :-1]
        return logits.reshape(-1, logits.shape[-1])


def gpt2_problem(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=257, n_positions=32,
                        bos_token_id=256, eos_token_id=256, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).to(DTYPE)
    tokens = corpus_tokens()
    train = lm_batches(tokens[: len(tokens) // 2], seq_len=32, num_sequences=64, batch_size=16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(3):
        for batch in train:
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()
    data = lm_batches(tokens[len(tokens) // 2 :], seq_len=32, num_sequences=4, batch_size=4)
    return model.eval(), data


# --------------------------------------------------------------------------- references


def _flat(model):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def split(t):
        out, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            out[name] = t[offset : offset + shape.numel()].reshape(shape)
            offset += shape.numel()
        return out

    return theta, split


def dense_digits(model, data) -> dict[str, torch.Tensor]:
    """Top-5 of the dense GGN, empirical Fisher and Hessian of the mean cross-entropy."""
    x, y = data
    theta, split = _flat(model)

    def logits(t):
        return functional_call(model, split(t), (x,))

    def row_losses(t):
        return nn.functional.cross_entropy(logits(t), y, reduction="none")

    out = {}
    J = jacrev(logits)(theta)  # (R, C, n)
    p = torch.softmax(logits(theta), -1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    out["ggn"] = torch.einsum("rcn,rcd,rdm->nm", J, H, J) / len(y)
    G = jacrev(row_losses)(theta)  # (R, n)
    out["empirical_fisher"] = G.T @ G / len(y)
    out["hessian"] = hessian(lambda t: row_losses(t).mean())(theta)
    return {name: torch.linalg.eigvalsh(m).flip(0)[:K] for name, m in out.items()}


def dense_gpt2_ef(model, data) -> torch.Tensor:
    """Top-5 of the empirical Fisher from the Gram matrix of per-token gradients."""
    theta, split = _flat(model)
    rows = []
    for batch in data:
        ids = batch["input_ids"]

        def token_losses(t, ids=ids):
            logits = functional_call(model, split(t), (), {"input_ids": ids, "use_cache": False})
            logits = logits.logits[:, :-1].reshape(-1, logits.logits.shape[-1])
            return nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1), reduction="none")

        with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel has no batching rule
            rows.append(jacrev(token_losses)(theta))
    V = torch.cat(rows)  # (R, n)
    return torch.linalg.eigvalsh(V @ V.T / V.shape[0]).flip(0)[:K]


def curvlinops_top(model, data, curvature: str, lm: bool):
    import curvlinops
    from scipy.sparse.linalg import eigsh

    cls = getattr(curvlinops, CURVLINOPS_NAMES[curvature])
    if lm:
        net = _LMLogits(model)
        batches = [(b["input_ids"], b["input_ids"][:, 1:].reshape(-1)) for b in data]
        kwargs = dict(batch_size_fn=lambda X: X.shape[0] * (X.shape[1] - 1))
    else:
        net, batches, kwargs = model, [data], {}
    params = [p for p in net.parameters() if p.requires_grad]
    op = cls(net, nn.CrossEntropyLoss(), params, batches, check_deterministic=False, **kwargs)
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernel lacks forward AD
        values = eigsh(op.to_scipy(), k=K, which="LA", tol=1e-10, return_eigenvectors=False)
    return torch.tensor(sorted(values, reverse=True), dtype=DTYPE)


def _mean_loss(model, data, lm: bool, params: dict) -> torch.Tensor:
    if not lm:
        x, y = data
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)
    total, rows = 0.0, 0
    for batch in data:
        ids = batch["input_ids"]
        logits = functional_call(model, params, (), {"input_ids": ids, "use_cache": False}).logits
        logits = logits[:, :-1].reshape(-1, logits.shape[-1])
        total = total + nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1), reduction="sum")
        rows += logits.shape[0]
    return total / rows


def hessian_fd_check(model, data, lm: bool, eps: float = 3e-5) -> dict[str, float | None]:
    """Relative error of one Hessian-vector product vs central differences of the gradient.

    ``(g(theta + eps v) - g(theta - eps v)) / (2 eps)`` has truncation error
    ``O(eps^2)`` (about 1e-5 relative here) and is independent of both libraries'
    second-order autodiff.
    """
    theta, split = _flat(model)
    v = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(7), dtype=DTYPE)

    def gradient(t):
        t = t.clone().requires_grad_(True)
        with sdpa_kernel(SDPBackend.MATH):
            return torch.autograd.grad(_mean_loss(model, data, lm, split(t)), t)[0]

    fd = (gradient(theta + eps * v) - gradient(theta - eps * v)) / (2 * eps)
    product = fm.make_operator(model, data, "hessian").matvec(v)
    out = {"fm": float((product - fd).norm() / fd.norm()), "curvlinops": None}
    try:
        from estimators import curvlinops_operator  # benchmarks/estimators.py

        op = curvlinops_operator(model, data, "hessian", lm).to_scipy()
        with sdpa_kernel(SDPBackend.MATH):
            product = torch.from_numpy(op @ v.numpy())
        out["curvlinops"] = float((product - fd).norm() / fd.norm())
    except Exception:  # curvlinops missing or failing: reported in the rows' notes
        pass
    return out


def environment(**extra) -> dict:
    """What the JSON records of the machine and libraries (plus ``extra``)."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "platform": platform.platform(), "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(), **extra}


# --------------------------------------------------------------------------- runs


def rel_error(values: torch.Tensor, reference: torch.Tensor) -> float:
    return float(((values - reference).abs() / reference.abs()).max())


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def run_problem(name, model, data, lm: bool, have_curvlinops: str | None) -> list[dict]:
    rows = []
    dense, dense_s = {}, {}
    if lm:
        dense["empirical_fisher"], dense_s["empirical_fisher"] = timed(
            lambda: dense_gpt2_ef(model, data)
        )
    else:
        all_dense, seconds = timed(lambda: dense_digits(model, data))
        dense = all_dense
        dense_s = {c: seconds / len(CURVATURES) for c in CURVATURES}
    for curvature in CURVATURES:
        warm = fm.make_operator(model, data, curvature, dtype=DTYPE)  # first-call overheads
        warm.matvec(torch.ones(warm.shape[0], dtype=DTYPE))
        res, fm_s = timed(
            lambda c=curvature: fm.top_eigenvalues(model, data, curvature=c, k=K, dtype=DTYPE,
                                                   max_iter=300)
        )
        fm_values = torch.tensor(res["top_eigenvalues"], dtype=DTYPE)
        cl_values, cl_s, cl_note = None, None, have_curvlinops
        if have_curvlinops is None:
            try:
                cl_values, cl_s = timed(lambda c=curvature: curvlinops_top(model, data, c, lm))
            except Exception as err:  # report, do not hide, a failing third-party run
                cl_note = f"curvlinops failed: {type(err).__name__}: {err}"[:300]
        reference = dense.get(curvature)
        ref_name = "dense" if reference is not None else ("curvlinops+eigsh" if cl_values is not
                                                          None else None)
        if reference is None:
            reference = cl_values
        row = {
            "problem": name,
            "curvature": curvature,
            "num_params": res["num_params"],
            "rows": res["batch_size_used"],
            "reference": ref_name,
            "reference_top5": None if reference is None else reference.tolist(),
            "dense_s": dense_s.get(curvature),
            "fm_top5": fm_values.tolist(),
            "fm_s": fm_s,
            "fm_matvecs": res["num_matvecs"],
            "fm_converged": res["num_converged"],
            "fm_rel_err": None if reference is None else rel_error(fm_values, reference),
            "curvlinops_top5": None if cl_values is None else cl_values.tolist(),
            "curvlinops_s": cl_s,
            "curvlinops_rel_err": None if cl_values is None or ref_name != "dense"
            else rel_error(cl_values, reference),
            "fm_vs_curvlinops": None if cl_values is None else rel_error(fm_values, cl_values),
            "note": cl_note,
        }
        if curvature == "hessian":
            check = row["hvp_vs_finite_differences"] = hessian_fd_check(model, data, lm)
            if ref_name != "dense" and (check["curvlinops"] or 0.0) > 100 * check["fm"]:
                row["reference_warning"] = (
                    "the reference is suspect: curvlinops' Hessian-vector product is "
                    f"{check['curvlinops']:.1e} from central differences, fisher_metrics' "
                    f"{check['fm']:.1e}, so fm_rel_err measures curvlinops' error here"
                )
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


HEADER = (f"{'problem':<11} {'curvature':<16} {'n':>6} {'lambda_1':>10} {'ref':<9} "
          f"{'dense s':>8} {'fm s':>7} {'matvecs':>7} {'fm err':>8} {'cl s':>7} {'cl err':>8} "
          f"{'fm vs cl':>8}")


def _f(value, spec):
    return format(value, spec) if value is not None else "-".rjust(len(format(1.0, spec)))


def format_row(row: dict) -> str:
    ref = {"dense": "dense", "curvlinops+eigsh": "cl+eigsh", None: "none"}[row["reference"]]
    return (f"{row['problem']:<11} {row['curvature']:<16} {row['num_params']:>6} "
            f"{row['fm_top5'][0]:>10.4g} {ref:<9} {_f(row['dense_s'], '8.2f')} "
            f"{row['fm_s']:>7.2f} {row['fm_matvecs']:>7} {_f(row['fm_rel_err'], '8.1e')} "
            f"{_f(row['curvlinops_s'], '7.2f')} {_f(row['curvlinops_rel_err'], '8.1e')} "
            f"{_f(row['fm_vs_curvlinops'], '8.1e')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "spectra.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import curvlinops  # noqa: F401

        have_curvlinops = None
    except Exception as err:
        have_curvlinops = f"curvlinops not available: {type(err).__name__}: {err}"
        print(have_curvlinops + " (install: pip install --no-deps curvlinops-for-pytorch "
              "backpack-for-pytorch einops einconv linear_operator opt-einsum)")
    print(HEADER)
    start = time.perf_counter()
    rows = run_problem("digits-mlp", *digits_problem(), lm=False, have_curvlinops=have_curvlinops)
    rows += run_problem("gpt2-lm", *gpt2_problem(), lm=True, have_curvlinops=have_curvlinops)
    total = time.perf_counter() - start
    for row in rows:
        if "hvp_vs_finite_differences" in row:
            check = row["hvp_vs_finite_differences"]
            print(f"{row['problem']}: Hessian-vector product vs central differences (eps 3e-5): "
                  f"fisher_metrics {check['fm']:.1e}, curvlinops "
                  f"{_f(check['curvlinops'], '.1e').strip()}")
        if "reference_warning" in row:
            print(f"{row['problem']} {row['curvature']}: {row['reference_warning']}")
    env = environment(curvlinops=have_curvlinops or _version("curvlinops-for-pytorch"),
                      scipy=_version("scipy"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python benchmarks/spectra.py", "k": K, "env": env,
                               "total_s": total, "rows": rows}, indent=1))
    print(f"total {total:.1f} s; wrote {out}")


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
