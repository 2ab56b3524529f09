"""Inverse policies on one wide head layer: ``python benchmarks/inverse_policies.py``.

One ``nn.Linear(256, o)`` (A is 257 x 257 with the bias column) wrapped in a real
``KFACPreconditioner`` (``factor_update_steps=1, inv_update_steps=1, kl_clip=None``),
fed one forward/backward with ``T`` rows of random inputs and random output
gradients (the same data for every policy at a given ``(o, T)``). For each policy
(``eig``, ``woodbury``, ``auto``; exact damping, and ``woodbury`` with factored
damping reported separately) it measures, through the preconditioner's own code:

1. inverse update: ``pre.update_inverses()`` (eig: ``eigh`` of the dense o x o G and
   of A; woodbury exact: ``lowrank_eigh(U)`` + ``eigh`` of A; woodbury factored: the
   Gram ``U^T U`` + ``eigh`` of A, plus the ``robust_cholesky`` that the first
   ``_precondition_layer`` call after an inverse update builds and caches: its time is
   measured by wrapping ``kfac_optim.preconditioner.robust_cholesky``);
2. precondition: ``layer.inverse.apply(grad, damping)`` of one (o, 257)
   gradient with the stored inverse (the KL clip and the write-back are excluded);
3. memory: ``pre.memory_usage()`` (dense A and G, stacked U, eigenbases, Grams and
   the cached Cholesky factor), after the first precondition call.

It also records ``capture_s``, one forward/backward + ``_update_factors()`` (eig
builds the dense G = g^T g there: O(o^2 T) per factor update; auto past its rank
limit converts U U^T to dense there), the relative error of each preconditioned
gradient against an independent float64 reference built from the raw data (``err_f64``,
where that is cheap), and for exact damping its relative difference from eig's result
(``vs_eig``): all policies must agree to solver tolerance.

Timing: a global warm-up runs every policy once on a small layer first. At each
(o, T) all policies are built and fed first, then timed round-robin (one call of each
policy per round), so that they see the same machine load. Each measurement's first
call is timed; if it took more than ``--cheap-s`` seconds it is the reported value
(n=1), else it is discarded as warm-up and the median of ``--reps`` samples is
reported, each sample the mean of enough back-to-back calls to last 0.2 s.
``OMP_WAIT_POLICY=PASSIVE`` is set unless given: on a loaded 2-core machine OpenMP's
spin-waiting otherwise stalls single calls for seconds.

Skipping eig (stated rule): the eig inverse time is estimated as
``t_ref (o / o_ref)^3`` from the largest eig inverse measured so far in this run
(before any, from an ``eigh`` of a 1024 x 1024 PSD matrix timed at start-up), and its
peak memory as ``4 o^2`` floats (G, its eigenvectors and the ``syevd`` workspace of
about ``2 o^2``). eig is skipped where the time estimate exceeds ``--eig-budget-s`` or
the memory estimate exceeds half the machine's RAM. Where the estimate exceeds
``--eig-once-s`` it is measured at one T per o only (``--eig-ref-t`` if in the grid,
else the smallest T): the dense eigh costs O(o^3) whatever T is (low-rank G can deflate
in the divide-and-conquer stage, so an eig measured at a smaller T is, if anything,
optimistic for eig at a larger T), and the other T of that o report that value,
marked ``ref``.

The ``auto`` policy keeps a low-rank G while its column count k <= min(woodbury_max_rank,
auto_t_max, auto_rho * o) (``kfac_optim.policies.Chooser.max_low_rank``); after one factor update
k = T, so it picks woodbury when T <= rho o and T <= t_max, else eig. The benchmark
predicts the pick from that rule and checks it against the layer's ``describe()``.
After the pick auto runs exactly the picked policy's code, so where that policy's
first inverse call took more than ``--share-s`` (default 5 s) auto is still built and
fed (the pick is read from the layer) but reports the picked policy's timings
(``shared``), which keeps the default run near 10 minutes.

Steady state: these are first inverse updates (k = T columns). ``LowRankFactor``
stacks T new columns per factor update and never drops old ones, so a low-rank G turns
dense (and the layer eig) after ``max_low_rank(o) // T`` factor updates; the summary
lists that count per point (``low_rank_lifetime``).

The summary reports the issue's targets: the eig/woodbury inverse speedup at
o=8192, T=512 (target >= 100x), and the worst ratio of auto to the better of eig and
woodbury (target <= 1.10), for the inverse update, the precondition step and the
per-step cost amortised over ``inv_update_steps`` (default 100). Two ratios are given:
``measured`` (auto's own timing; auto runs the same code as the policy it picks, so it
differs from that policy's timing only by noise) and ``by pick`` (the picked policy's
timing), which isolates the quality of the rule. A crossover sweep at o=2048 places
the woodbury/eig break-even T/o.

Writes a table to stdout and JSON to ``--out``. ``--quick`` runs a small subset.
"""

from __future__ import annotations

import os

# Under CPU contention (a shared 2-core box) OpenMP's spinning barriers stall for seconds
# when a worker thread is descheduled; passive waiting avoids that. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import kfac_optim.policies.base as kbase  # noqa: E402
import kfac_optim.policies.eig as keig  # noqa: E402
import kfac_optim.policies.woodbury as kwood  # noqa: E402
from kfac_optim.inverse import eigh_psd  # noqa: E402
from kfac_optim.options import KFACOptions  # noqa: E402
from kfac_optim.policies import make_policy  # noqa: E402
from kfac_optim.preconditioner import KFACPreconditioner  # noqa: E402

D_IN = 256
O_GRID = (1024, 4096, 8192, 16384, 32768)
T_GRID = (256, 1024, 4096)
EXTRA_POINTS = ((8192, 512),)  # the issue's target point
CROSSOVER_O = 2048
CROSSOVER_T = (512, 1024, 1536, 2048)
QUICK_O = (512, 2048)
QUICK_T = (128, 1024)
QUICK_CROSSOVER_O = 512
QUICK_CROSSOVER_T = (256, 512)

# (name in the table, inverse_policy, damping_mode)
VARIANTS = (
    ("eig", "eig", "exact"),
    ("woodbury", "woodbury", "exact"),
    ("auto", "auto", "exact"),
    ("woodbury-factored", "woodbury", "factored"),
)
INV_DTYPES = {"none": None, "float32": torch.float32, "float64": torch.float64}


# Timing helpers ---------------------------------------------------------------------------
class Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


class SolverTimers:
    """Wraps the solvers the inverse policies call (``eigh_psd``, ``lowrank_eigh``,
    ``robust_cholesky`` where ``kfac_optim.policies`` imports them) to time them by call."""

    NAMES = ("eigh_psd", "lowrank_eigh", "robust_cholesky")

    def __init__(self, clock: Clock):
        self.clock = clock
        self.calls: list[tuple[str, str, float]] = []
        self._orig: dict[str, Any] = {}

    def _wrap(self, name: str, fn):
        def timed(matrix, *args, **kwargs):
            t0 = self.clock.now()
            out = fn(matrix, *args, **kwargs)
            self.calls.append((name, "x".join(map(str, matrix.shape)), self.clock.now() - t0))
            return out
        return timed

    @contextlib.contextmanager
    def installed(self):
        for module in (kbase, keig, kwood):
            for name in self.NAMES:
                if hasattr(module, name):
                    self._orig[(module, name)] = getattr(module, name)
                    setattr(module, name, self._wrap(name, getattr(module, name)))
        try:
            yield self
        finally:
            for (module, name), fn in self._orig.items():
                setattr(module, name, fn)

    def take(self) -> list[tuple[str, str, float]]:
        calls, self.calls = self.calls, []
        return calls


# Machine ---------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def _git() -> dict[str, Any]:
    def run(*cmd: str) -> str:
        return subprocess.run(cmd, capture_output=True, text=True, check=False,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    try:
        dirty = run("git", "status", "--porcelain", "--", "kfac_optim")
        return {"commit": run("git", "rev-parse", "HEAD"),
                "kfac_optim_dirty": bool(dirty)}
    except OSError:
        return {}


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {
        "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
        "ram_gib": round(_ram_bytes() / 2**30, 1), "device": str(device),
        "blas": "mkl" if torch.backends.mkl.is_available() else "other",
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "git": _git(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# One case ---------------------------------------------------------------------------------
def case_seed(o: int, t: int) -> int:
    return 1000 * o + t


def make_data(o: int, t: int, seed: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, D_IN, generator=gen)
    r = torch.randn(t, o, generator=gen)
    return x.to(device), r.to(device)


def reference_f64(o: int, t: int, damping: float, seed: int) -> dict[str, torch.Tensor]:
    """Preconditioned gradient in float64, built from the raw data independently of the
    package: ``A = X_b^T X_b / T``, ``G = R^T R / T`` (summed loss, N = T rows),
    ``V = R^T X_b``; exact damping ``(A (x) G + lambda I)^{-1} vec(V)`` and factored
    (pi-split) damping ``(G + lambda_G I)^{-1} V (A + lambda_A I)^{-1}``, from the
    eigenpairs of A and of G (thin, from the T x T Gram ``R R^T / T``, when T < o)."""
    x, r = make_data(o, t, seed, torch.device("cpu"))
    xb = torch.cat([x, torch.ones(t, 1)], 1).double()
    r = r.double()
    v = r.t() @ xb
    s_a, q_a = torch.linalg.eigh(xb.t() @ xb / t)
    if t < o:
        s, w = torch.linalg.eigh(r @ r.t() / t)
        keep = s > s.max() * 1e-12
        s_g = s[keep]
        q_g = (r.t() @ w[:, keep]) / (t * s_g).sqrt()
    else:
        s_g, q_g = torch.linalg.eigh(r.t() @ r / t)
        s_g = s_g.clamp(min=0)
    vp = v @ q_a
    proj = q_g.t() @ vp
    rest = vp - q_g @ proj
    exact = (q_g @ (proj / (torch.outer(s_g, s_a) + damping)) + rest / damping) @ q_a.t()
    pi = ((s_a.sum() / s_a.numel()) / (s_g.sum() / o)).sqrt()
    lam_a, lam_g = pi * damping**0.5, damping**0.5 / pi
    fact = (q_g @ (proj / torch.outer(s_g + lam_g, s_a + lam_a))
            + rest / (lam_g * (s_a + lam_a))) @ q_a.t()
    return {"exact": exact, "factored": fact}


def predicted_pick(policy: str, o: int, t: int, opts: KFACOptions) -> str:
    if policy == "eig":
        return "eig"
    return "woodbury" if t <= make_policy(opts).max_low_rank(o) else "eig"


class Case:
    """One preconditioner at one point: built and fed one forward/backward at init;
    ``inverse_once`` / ``precondition_once`` time one call of the preconditioner's own
    code; ``result`` reads memory and the preconditioned gradient."""

    def __init__(self, o: int, t: int, policy: str, damping_mode: str, args, clock: Clock,
                 timers: SolverTimers, device: torch.device, data):
        self.o, self.t, self.policy, self.damping_mode = o, t, policy, damping_mode
        self.clock, self.timers = clock, timers
        torch.manual_seed(0)
        self.model = nn.Linear(D_IN, o).to(device)
        self.pre = KFACPreconditioner(
            self.model, inverse_policy=policy, damping_mode=damping_mode,
            factor_update_steps=1, inv_update_steps=1, kl_clip=None, loss_reduction="sum",
            inv_dtype=args.inv_dtype)
        x, r = data
        t0 = clock.now()
        (self.model(x) * r).sum().backward()
        self.grad = torch.cat([self.model.weight.grad, self.model.bias.grad[:, None]], 1)
        self.pre.step()  # folds the statistics (and computes a first inverse)
        self.capture_s = clock.now() - t0
        self.name, self.layer = next(iter(self.pre.layers.items()))
        # the pick is made at the factor update: a low-rank G past its column limit is dense
        self.pick = "woodbury" if self.layer.low_rank else "eig"
        self.expected_pick = predicted_pick(policy, o, t, self.pre.options)
        self.damping = self.pre.options.damping
        self.breakdown: list[tuple[str, str, float]] = []
        timers.take()

    def inverse_once(self) -> float:
        pre, layer = self.pre, self.layer
        t0 = self.clock.now()
        pre.update_inverses()
        elapsed = self.clock.now() - t0
        calls = self.timers.take()
        if layer.inverse.kind == "woodbury":  # factored: the first apply builds the solver
            layer.inverse.apply(self.grad, self.damping)
            chol = self.timers.take()
            calls += chol
            elapsed += sum(c[2] for c in chol)
        self.breakdown = calls
        return elapsed

    def precondition_once(self) -> float:
        t0 = self.clock.now()
        self.layer.inverse.apply(self.grad, self.damping)
        return self.clock.now() - t0

    def result(self) -> tuple[dict[str, Any], torch.Tensor]:
        pre, layer = self.pre, self.layer
        out = layer.inverse.apply(self.grad, self.damping)
        self.timers.take()
        mem = pre.memory_usage()["layers"][self.name]
        desc = pre.describe()[0]
        row = {
            "o": self.o, "T": self.t, "policy": self.policy, "damping_mode": self.damping_mode,
            "status": "measured", "picked": desc["policy"], "rank": desc["rank"],
            "expected_pick": self.expected_pick,
            "basis_rank": layer.inverse.basis_rank,
            "capture_s": self.capture_s,
            "memory_bytes": mem["total"], "memory": mem,
            "breakdown": [{"fn": f, "shape": s, "s": dt} for f, s, dt in self.breakdown],
        }
        return row, out


def measure_interleaved(cases: dict[str, Case], method: str, args, skip=(), shares=None
                        ) -> tuple[dict[str, tuple[float, list[float]]], set[str]]:
    """Time ``method`` of every case round-robin, so that all policies at a point see
    the same machine load. Round 0 (one call of each) decides: a call longer than
    ``--cheap-s`` is reported alone (n=1); the others run ``--reps`` more rounds, each
    sample the mean of enough back-to-back calls to last 0.2 s, and report the median of
    those samples (round 0 being their warm-up). ``shares``: ``{case: other}``; the case
    is left out (and returned in the shared set) where ``other``'s round-0 call took
    longer than ``--share-s``."""
    first, shared = {}, set()
    for name, case in cases.items():
        if name in skip:
            continue
        other = (shares or {}).get(name)
        if other in first and first[other] > args.share_s:
            shared.add(name)
            continue
        first[name] = getattr(case, method)()
    cheap = [n for n, f in first.items() if f <= args.cheap_s]
    inner = {n: max(1, min(1000, int(0.2 / max(first[n], 1e-6)))) for n in cheap}
    samples: dict[str, list[float]] = {n: [] for n in cheap}
    for _ in range(args.reps):
        for n in cheap:
            fn = getattr(cases[n], method)
            samples[n].append(sum(fn() for _ in range(inner[n])) / inner[n])
    return {n: ((statistics.median(samples[n]), samples[n]) if n in samples
                else (first[n], [first[n]])) for n in first}, shared


# Eig skip rule ----------------------------------------------------------------------------
class EigRule:
    def __init__(self, args, clock: Clock, device: torch.device):
        self.args = args
        self.ram = _ram_bytes()
        n = 1024
        gen = torch.Generator().manual_seed(0)
        m = torch.randn(n, n // 2, generator=gen).to(device)
        g = m @ m.t()
        eigh_psd(g)  # warm-up
        t0 = clock.now()
        eigh_psd(g)
        self.ref = (n, clock.now() - t0, "calibration eigh(1024)")
        self.measured_at: dict[int, int] = {}  # o -> T where eig was measured once

    def estimate_s(self, o: int) -> float:
        n, t, _ = self.ref
        return t * (o / n) ** 3

    def estimate_peak_bytes(self, o: int) -> int:
        return 4 * o * o * 4

    def observe(self, o: int, inverse_s: float) -> None:
        if o >= self.ref[0]:
            self.ref = (o, inverse_s, f"eig inverse at o={o}")

    def decide(self, o: int, t: int, t_list: list[int]) -> tuple[str, str]:
        """("run" | "skip" | "ref", reason)."""
        est = self.estimate_s(o)
        mem = self.estimate_peak_bytes(o)
        basis = f"est {est:.0f} s from {self.ref[2]} x (o/{self.ref[0]})^3"
        if mem > 0.5 * self.ram:
            return "skip", (f"peak ~4 o^2 floats = {mem / 2**30:.0f} GiB > half the RAM "
                            f"({self.ram / 2**30:.0f} GiB); {basis}")
        if est > self.args.eig_budget_s:
            return "skip", f"{basis} > --eig-budget-s {self.args.eig_budget_s:.0f}"
        if est > self.args.eig_once_s:
            ref_t = self.args.eig_ref_t if self.args.eig_ref_t in t_list else min(t_list)
            if t != ref_t:
                return "ref", (f"{basis} > --eig-once-s {self.args.eig_once_s:.0f}: "
                               f"measured at T={ref_t} only (eig cost is T-independent)")
        return "run", basis


# Driver -----------------------------------------------------------------------------------
def global_warmup(device: torch.device, timers: SolverTimers, clock: Clock) -> None:
    class A:
        inv_dtype = None
    data = make_data(256, 64, 0, device)
    for _, policy, mode in VARIANTS:
        case = Case(256, 64, policy, mode, A, clock, timers, device, data)
        case.inverse_once()
        case.precondition_once()
        case.result()
    timers.take()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


def wants_reference(o: int, t: int) -> bool:
    """float64 reference where it is cheap: eigh of at most 2048 and o min(o,T)^2 <= 2^34."""
    k = min(o, t)
    return k <= 2048 and o * k * k <= 2**34


def _print_row(row: dict[str, Any]) -> None:
    head = f"  {row['variant']:18s} o={row['o']:6d} T={row['T']:5d}  "
    if row["status"] in ("skipped", "ref", "shared"):
        print(f"{head}{row['status']}: {row.get('note', '')}", flush=True)
        return
    print(f"{head}inverse {row['inverse_s']:8.3f} s  precond {1e3 * row['precondition_s']:9.2f} ms"
          f"  mem {row['memory_bytes'] / 2**20:8.1f} MiB  picked {row['picked']}", flush=True)


def run_point(o: int, t: int, t_list: list[int], variants, args, clock, timers, rule, device,
              section: str) -> list[dict[str, Any]]:
    """All variants at one (o, T), timed round-robin (``measure_interleaved``)."""
    ref = None
    if args.reference and wants_reference(o, t):
        ref = reference_f64(o, t, KFACOptions().damping, case_seed(o, t))
    data = make_data(o, t, case_seed(o, t), device)
    rows: dict[str, dict[str, Any]] = {}
    cases: dict[str, Case] = {}
    for vname, policy, mode in variants:
        pick = predicted_pick(policy, o, t, KFACOptions(inverse_policy=policy))
        base = {"section": section, "o": o, "T": t, "variant": vname, "policy": policy,
                "damping_mode": mode, "expected_pick": pick}
        if pick == "eig":
            action, reason = rule.decide(o, t, t_list)
            if action == "ref" and policy == "eig":  # filled in later from this o's eig
                rows[vname] = {**base, "status": "ref", "note": reason, "picked": "eig"}
                continue
            if action in ("skip", "ref"):
                rows[vname] = {**base, "status": "skipped", "note": reason, "picked": pick,
                               "est_inverse_s": rule.estimate_s(o),
                               "est_memory_bytes": 2 * o * o * 4 + 2 * (D_IN + 1) ** 2 * 4}
                continue
        rows[vname] = base
        cases[vname] = Case(o, t, policy, mode, args, clock, timers, device, data)
    del data
    # auto runs the picked policy's code after the pick: share that policy's timings where
    # its first inverse call took longer than --share-s (keeps the run short)
    shares = {v: c.pick for v, c in cases.items()
              if c.policy == "auto" and c.pick in cases and c.damping_mode == "exact"}
    inv, shared = measure_interleaved(cases, "inverse_once", args, shares=shares)
    pc, _ = measure_interleaved(cases, "precondition_once", args, skip=shared)
    eig_out = None
    for vname, case in cases.items():
        row = rows[vname]
        if vname in shared:
            continue
        res, out = case.result()
        row.update(res)
        row.update(inverse_s=inv[vname][0], inverse_times=inv[vname][1],
                   precondition_s=pc[vname][0], precondition_times=pc[vname][1])
        if ref is not None:
            row["rel_err_vs_f64"] = rel_diff(out, ref[case.damping_mode])
        if case.damping_mode == "exact":
            if vname == "eig":
                eig_out = out
            elif eig_out is not None:
                row["rel_diff_vs_eig"] = rel_diff(out, eig_out)
        if row["picked"] != row["expected_pick"]:
            row["note"] = (f"MISMATCH: auto rule predicts {row['expected_pick']}, "
                           f"picked {row['picked']}")
    for vname in shared:
        case, src = cases[vname], rows[cases[vname].pick]
        rows[vname].update({k: src[k] for k in (
            "inverse_s", "inverse_times", "precondition_s", "precondition_times",
            "memory_bytes", "memory", "breakdown", "basis_rank", "rank")})
        rows[vname].update(status="shared", picked=case.pick, capture_s=case.capture_s,
                           note=f"timings shared with {case.pick} (identical code after "
                                f"the pick; its inverse > --share-s)")
    del cases, eig_out, ref
    gc.collect()
    return [rows[v] for v, _, _ in variants]


def run_grid(points: list[tuple[int, int]], args, clock, timers, rule, device,
             section: str, variants=VARIANTS) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    t_by_o: dict[int, list[int]] = {}
    for o, t in points:
        t_by_o.setdefault(o, []).append(t)
    eig_ref: dict[int, dict[str, Any]] = {}
    for o, t in points:
        t0 = time.perf_counter()
        point = run_point(o, t, t_by_o[o], variants, args, clock, timers, rule, device,
                          section)
        for row in point:
            _print_row(row)
            if row["status"] == "measured" and row["picked"] == "eig":
                rule.observe(o, row["inverse_s"])
                if row["variant"] == "eig":
                    eig_ref[o] = row
        print(f"  -- o={o} T={t}: {time.perf_counter() - t0:.0f} s wall", flush=True)
        rows += point
    for row in rows:
        if row["status"] != "ref":
            continue
        src = eig_ref.get(row["o"])
        if src is None:
            row.update(status="skipped", note=row["note"] + "; the reference T was not run",
                       est_inverse_s=rule.estimate_s(row["o"]),
                       est_memory_bytes=2 * row["o"] ** 2 * 4)
            continue
        row.update(ref_T=src["T"], inverse_s=src["inverse_s"],
                   precondition_s=src["precondition_s"], memory_bytes=src["memory_bytes"])
    return rows


def _cell(row: dict[str, Any], key: str, scale: float, fmt: str) -> str:
    v = row.get(key)
    if v is None:
        return "-"
    s = format(v * scale, fmt)
    return s + "*" if row.get("status") == "ref" else s


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'o':>6} {'T':>5}  {'variant':18s} {'picked':8s} {'inverse_s':>10} "
            f"{'precond_ms':>11} {'mem_MiB':>9} {'capture_s':>9} {'n':>2} {'err_f64':>8} "
            f"{'vs_eig':>8}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] == "skipped":
            est = (f"~{r['est_memory_bytes'] / 2**20:.0f}"
                   if r.get("est_memory_bytes") is not None else "-")
            lines.append(f"{r['o']:>6} {r['T']:>5}  {r['variant']:18s} {r['picked']:8s} "
                         f"{'skipped':>10} {'-':>11} {est:>9} {'-':>9} {'-':>2} {'-':>8} "
                         f"{'-':>8}  "
                         f"skipped: {r['note']}")
            continue
        n = len(r.get("inverse_times", [])) or "-"
        rd = r.get("rel_diff_vs_eig")
        re_ = r.get("rel_err_vs_f64")
        note = r.get("note", "")
        if r["status"] == "ref":
            note = f"* = measured at T={r['ref_T']} (T-independent)"
        elif r["status"] == "shared":
            note = f"= {r['picked']} row (same code after the pick; inverse > --share-s)"
        lines.append(
            f"{r['o']:>6} {r['T']:>5}  {r['variant']:18s} {r['picked']:8s} "
            f"{_cell(r, 'inverse_s', 1, '.3f'):>10} {_cell(r, 'precondition_s', 1e3, '.2f'):>11} "
            f"{_cell(r, 'memory_bytes', 2**-20, '.1f'):>9} "
            f"{_cell(r, 'capture_s', 1, '.3f'):>9} {n!s:>2} "
            f"{('-' if re_ is None else format(re_, '.1e')):>8} "
            f"{('-' if rd is None else format(rd, '.1e')):>8}  {note}")
    return "\n".join(lines)


def _get(rows, o, t, variant):
    for r in rows:
        if r["o"] == o and r["T"] == t and r["variant"] == variant and "inverse_s" in r:
            return r
    return None


RHO_WHATIF = (0.5, 0.6, 2 / 3, 0.75, 0.85, 1.0)


def metric_fns(inv_steps: int, fac_steps: int) -> dict[str, Any]:
    """Per-row cost metrics (None where a row lacks the figure)."""
    def amort(r):
        return r["precondition_s"] + r["inverse_s"] / inv_steps

    def amort_capture(r):
        cap = r.get("capture_s")
        return None if cap is None else amort(r) + cap / fac_steps

    return {"inverse": lambda r: r["inverse_s"], "precondition": lambda r: r["precondition_s"],
            "amortised": amort, "amortised+capture": amort_capture}


def rule_whatif(rows: list[dict[str, Any]], metrics: dict[str, Any]) -> dict[str, Any]:
    """Worst (picked / best) over every point with eig and woodbury figures, for auto
    rules ``woodbury iff T <= rho o`` (t_max does not bind at these T)."""
    pts = sorted({(r["o"], r["T"]) for r in rows})
    out = {}
    for rho in RHO_WHATIF:
        worst = {}
        for m, fn in metrics.items():
            w_ratio, where = 1.0, None
            for o, t in pts:
                e, w = _get(rows, o, t, "eig"), _get(rows, o, t, "woodbury")
                if not (e and w) or fn(e) is None or fn(w) is None:
                    continue
                pick = fn(w) if t <= rho * o else fn(e)
                ratio = pick / min(fn(e), fn(w))
                if ratio > w_ratio:
                    w_ratio, where = ratio, (o, t)
            worst[m] = {"ratio": w_ratio, "at": where}
        out[f"{rho:.3g}"] = worst
    return out


def summarize(rows: list[dict[str, Any]], inv_steps: int, fac_steps: int = 10,
              cross_rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"inv_update_steps_for_amortised": inv_steps,
                           "factor_update_steps_for_amortised": fac_steps}
    target = None
    e, w, f = (_get(rows, 8192, 512, v) for v in ("eig", "woodbury", "woodbury-factored"))
    if e and w:
        target = {
            "o": 8192, "T": 512,
            "eig_inverse_s": e["inverse_s"], "eig_status": e["status"],
            "woodbury_inverse_s": w["inverse_s"],
            "speedup_inverse_exact": e["inverse_s"] / w["inverse_s"],
            "speedup_precondition_exact": e["precondition_s"] / w["precondition_s"],
            "memory_ratio_exact": e["memory_bytes"] / w["memory_bytes"],
            "meets_100x": e["inverse_s"] / w["inverse_s"] >= 100,
        }
        if f:
            target["woodbury_factored_inverse_s"] = f["inverse_s"]
            target["speedup_inverse_factored_vs_eig_exact"] = e["inverse_s"] / f["inverse_s"]
    out["target_speedup_o8192_T512"] = target

    metrics = metric_fns(inv_steps, fac_steps)
    ratios = []
    points = sorted({(r["o"], r["T"]) for r in rows})
    for o, t in points:
        e, w, a = (_get(rows, o, t, v) for v in ("eig", "woodbury", "auto"))
        if not (w and a):
            continue
        entry = {"o": o, "T": t, "auto_picked": a["picked"], "eig_status": None if e is None
                 else e["status"]}
        for m, fn in metrics.items():
            if fn(w) is None or fn(a) is None:
                continue
            cands = {"woodbury": fn(w)} | ({"eig": fn(e)} if e and fn(e) is not None else {})
            best_name = min(cands, key=cands.get)
            best = cands[best_name]
            picked = cands.get(a["picked"])
            entry[m] = {
                "best": best_name, "best_s": best,
                "measured_ratio": fn(a) / best,
                "by_pick_ratio": None if picked is None else picked / best,
                "eig_missing": "eig" not in cands,
            }
        ratios.append(entry)
    out["auto_vs_best"] = ratios
    for m in metrics:
        comp = [r for r in ratios if m in r and not r[m]["eig_missing"]]
        if not comp:
            continue
        wm = max(comp, key=lambda r: r[m]["measured_ratio"])
        bp = [r for r in comp if r[m]["by_pick_ratio"] is not None]
        wp = max(bp, key=lambda r: r[m]["by_pick_ratio"]) if bp else None
        out[f"worst_auto_{m}"] = {
            "measured": {"ratio": wm[m]["measured_ratio"], "o": wm["o"], "T": wm["T"]},
            "by_pick": None if wp is None else {"ratio": wp[m]["by_pick_ratio"],
                                                 "o": wp["o"], "T": wp["T"],
                                                 "picked": wp["auto_picked"],
                                                 "best": wp[m]["best"]},
            "points_compared": len(comp),
        }
    mism = [r for r in rows if str(r.get("note", "")).startswith("MISMATCH")]
    out["auto_pick_mismatches"] = [(r["o"], r["T"]) for r in mism]
    diffs = [r["rel_diff_vs_eig"] for r in rows if "rel_diff_vs_eig" in r]
    out["max_rel_diff_vs_eig"] = max(diffs) if diffs else None
    errs: dict[str, float] = {}
    for r in rows:
        if "rel_err_vs_f64" in r:
            errs[r["variant"]] = max(errs.get(r["variant"], 0.0), r["rel_err_vs_f64"])
    out["max_rel_err_vs_f64_by_variant"] = errs
    out["rule_whatif"] = {
        "note": "worst picked/best over grid + crossover points with eig and woodbury "
                "figures, for the rule 'woodbury iff T <= rho o'",
        "by_rho": rule_whatif(rows + (cross_rows or []), metrics)}
    life = {}
    for o, t in points:
        life[f"{o},{t}"] = {
            policy: make_policy(KFACOptions(inverse_policy=policy)).max_low_rank(o) // t
            for policy in ("woodbury", "auto")}
    out["low_rank_lifetime"] = {
        "note": "factor updates (k = T each) a low-rank G lasts before turning dense",
        "by_o_T": life}
    return out


def _at(where) -> str:
    return "" if where is None else f"({where[0]},{where[1]})"


def format_summary(s: dict[str, Any]) -> str:
    lines = []
    t = s.get("target_speedup_o8192_T512")
    if t:
        lines.append(
            f"Target 1 (o=8192, T=512, exact damping): eig inverse {t['eig_inverse_s']:.2f} s "
            f"vs woodbury {t['woodbury_inverse_s']:.4f} s -> {t['speedup_inverse_exact']:.0f}x "
            f"({'meets' if t['meets_100x'] else 'MISSES'} >= 100x); precondition "
            f"{t['speedup_precondition_exact']:.1f}x, memory {t['memory_ratio_exact']:.1f}x.")
        if "speedup_inverse_factored_vs_eig_exact" in t:
            lines.append(f"  woodbury factored inverse {t['woodbury_factored_inverse_s']:.4f} s "
                         f"({t['speedup_inverse_factored_vs_eig_exact']:.0f}x vs eig exact).")
    else:
        lines.append("Target 1: not measured in this run (needs o=8192, T=512 with eig).")
    for m in ("inverse", "precondition", "amortised", "amortised+capture"):
        w = s.get(f"worst_auto_{m}")
        if not w:
            continue
        bp = w["by_pick"]
        bp_txt = ("-" if bp is None else
                  f"{bp['ratio']:.2f} at o={bp['o']}, T={bp['T']} (picked {bp['picked']}, "
                  f"best {bp['best']})")
        lines.append(f"Target 2, auto/best {m:17s}: by pick {bp_txt}; measured "
                     f"{w['measured']['ratio']:.2f} at o={w['measured']['o']}, "
                     f"T={w['measured']['T']} ({w['points_compared']} points).")
    lines.append(f"  (amortised = precondition + inverse / {s['inv_update_steps_for_amortised']}; "
                 f"+capture adds capture_s / {s['factor_update_steps_for_amortised']}: "
                 "the defaults inv_update_steps, factor_update_steps)")
    wi = s.get("rule_whatif", {}).get("by_rho")
    if wi:
        names = list(next(iter(wi.values())))
        lines.append("What-if auto rule 'woodbury iff T <= rho o', worst picked/best (grid + "
                     "crossover):")
        lines.append("  rho    " + "".join(f"{n:>20s}" for n in names))
        for rho, worst in wi.items():
            cells = "".join(f"{worst[n]['ratio']:>9.2f} {_at(worst[n]['at']):>10s}"
                            for n in names)
            lines.append(f"  {rho:6s} {cells}")
    if s["auto_pick_mismatches"]:
        lines.append(f"auto pick MISMATCHES the documented rule at {s['auto_pick_mismatches']}")
    if s["max_rel_err_vs_f64_by_variant"]:
        lines.append("max relative error vs the float64 reference: " + ", ".join(
            f"{k} {v:.1e}" for k, v in s["max_rel_err_vs_f64_by_variant"].items()))
    if s["max_rel_diff_vs_eig"] is not None:
        lines.append(f"max relative difference of woodbury/auto (exact) from eig: "
                     f"{s['max_rel_diff_vs_eig']:.1e}")
    return "\n".join(lines)


def crossover_summary(rows: list[dict[str, Any]], inv_steps: int) -> list[dict[str, Any]]:
    out = []
    for o, t in sorted({(r["o"], r["T"]) for r in rows}):
        e, w = _get(rows, o, t, "eig"), _get(rows, o, t, "woodbury")
        if e and w:
            out.append({
                "o": o, "T": t, "T_over_o": t / o,
                "woodbury_over_eig_inverse": w["inverse_s"] / e["inverse_s"],
                "woodbury_over_eig_precondition": w["precondition_s"] / e["precondition_s"],
                "woodbury_over_eig_amortised": (w["precondition_s"] + w["inverse_s"] / inv_steps)
                / (e["precondition_s"] + e["inverse_s"] / inv_steps),
            })
    return out


def report(result: dict[str, Any]) -> None:
    """(Re)compute the summary of ``result`` in place and print the tables and summary."""
    rows, cross_rows = result["rows"], result["crossover_rows"]
    opts = KFACOptions()
    summary = summarize(rows, opts.inv_update_steps, opts.factor_update_steps, cross_rows)
    summary["crossover"] = crossover_summary(cross_rows, opts.inv_update_steps)
    result["summary"] = summary
    info, cfg = result["machine"], result["config"]
    print()
    print(f"torch {info['torch']}, {info['threads']} threads, {info['cpu']} x{info['cpu_count']}, "
          f"OMP_WAIT_POLICY={result['env']['OMP_WAIT_POLICY']}; factor dtype float32, "
          f"inv_dtype {cfg['inv_dtype']} (None: the factor dtype, float32; float64 retried on "
          f"solver failure); damping {cfg['damping']}; d = {cfg['d_with_bias']} with bias")
    print(format_table(rows))
    if cross_rows:
        print(f"\nCrossover sweep (o={cross_rows[0]['o']}):")
        print(format_table(cross_rows))
        for c in summary["crossover"]:
            print(f"  T/o={c['T_over_o']:.2f}: woodbury/eig inverse "
                  f"{c['woodbury_over_eig_inverse']:.2f}, precondition "
                  f"{c['woodbury_over_eig_precondition']:.2f}, amortised "
                  f"{c['woodbury_over_eig_amortised']:.2f}")
    print()
    print(format_summary(summary))
    print(f"\nTotal {result['elapsed_s']:.0f} s; loadavg start {info['loadavg_start']} end "
          f"{info.get('loadavg_end')}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small subset for smoke runs")
    p.add_argument("--out", default="benchmarks/results/inverse_policies.json")
    p.add_argument("--reps", type=int, default=3, help="timed repeats of cheap calls (median)")
    p.add_argument("--cheap-s", type=float, default=1.0,
                   help="a first call longer than this is reported alone (n=1)")
    p.add_argument("--eig-budget-s", type=float, default=300.0,
                   help="skip eig where its estimated inverse time exceeds this")
    p.add_argument("--eig-once-s", type=float, default=60.0,
                   help="measure eig at one T per o where its estimate exceeds this")
    p.add_argument("--eig-ref-t", type=int, default=512)
    p.add_argument("--share-s", type=float, default=5.0,
                   help="auto reuses the timings of the policy it picked where that "
                        "policy's inverse took longer than this (0: always, inf: never)")
    p.add_argument("--no-crossover", action="store_true", help="skip the o=2048 T/o sweep")
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="skip the float64 reference (accuracy column err_f64)")
    p.add_argument("--inv-dtype", choices=sorted(INV_DTYPES), default="none",
                   help="KFACOptions.inv_dtype (none: the factor dtype, float32)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--resummarize", metavar="JSON", default=None,
                   help="recompute the summary of an earlier run's JSON (no measuring) and "
                        "write it to --out")
    args = p.parse_args(argv)
    if args.resummarize:
        result = json.loads(Path(args.resummarize).read_text())
        report(result)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"wrote {args.out}")
        return 0
    args.inv_dtype = INV_DTYPES[args.inv_dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = Clock(device)
    timers = SolverTimers(clock)
    start = time.perf_counter()

    if args.quick:
        points = [(o, t) for o in QUICK_O for t in QUICK_T]
        cross = [(QUICK_CROSSOVER_O, t) for t in QUICK_CROSSOVER_T]
    else:
        points = sorted({(o, t) for o in O_GRID for t in T_GRID} | set(EXTRA_POINTS))
        cross = [(CROSSOVER_O, t) for t in CROSSOVER_T]
    if args.no_crossover:
        cross = []
    info = machine_info(device)
    print(f"torch {info['torch']}  threads {info['threads']}  cpu {info['cpu']} "
          f"x{info['cpu_count']}  RAM {info['ram_gib']} GiB  device {device}  "
          f"loadavg {info['loadavg_start']}", flush=True)
    with timers.installed():
        global_warmup(device, timers, clock)
        rule = EigRule(args, clock, device)
        print(f"eig calibration: eigh(1024) {rule.ref[1]:.3f} s", flush=True)
        rows = run_grid(points, args, clock, timers, rule, device, "grid")
        cross_rows = run_grid(cross, args, clock, timers, rule, device, "crossover",
                              variants=VARIANTS[:3]) if cross else []
    info["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    elapsed = time.perf_counter() - start

    result = {
        "command": "python benchmarks/inverse_policies.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "machine": info,
        "env": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")},
        "config": {
            "d_in": D_IN, "d_with_bias": D_IN + 1, "factor_dtype": "float32",
            "inv_dtype": str(args.inv_dtype), "damping": KFACOptions().damping,
            "auto_rho": KFACOptions().auto_rho, "auto_t_max": KFACOptions().auto_t_max,
            "woodbury_max_rank": KFACOptions().woodbury_max_rank, "reps": args.reps,
            "cheap_s": args.cheap_s, "share_s": args.share_s,
            "eig_budget_s": args.eig_budget_s,
            "eig_once_s": args.eig_once_s, "eig_ref_t": args.eig_ref_t, "quick": args.quick,
            "eig_calibration": {"o": 1024, "note": "eigh_psd of a rank-512 PSD 1024x1024"},
        },
        "rows": rows, "crossover_rows": cross_rows, "elapsed_s": elapsed,
    }
    report(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
