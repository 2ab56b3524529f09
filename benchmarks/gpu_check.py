"""Checks and timings on one CUDA device: ``python benchmarks/gpu_check.py``.

Sections (``--sections``, all by default):

- ``step_time``: per-step time of K-FAC against AdamW on the two language models of
  ``benchmarks/time_to_target.py`` (``gpt2_lm``, ``llama_lm``, built by its
  ``make_workload``), on CUDA, measured interleaved in one process by the demo's
  ``time_interleaved`` (``--time-rounds`` rounds of ``--time-steps`` steps per optimizer,
  default 3 x 100: K-FAC's default inverse period, so each block amortizes one inverse
  update; median of the per-round ratios). K-FAC at its defaults with AdamW's lr
  (``--lr``; the lr does not change the work per step), for each base in ``--bases``.
- ``eigh``: ``torch.linalg.eigh`` of a symmetric positive definite float32 factor
  ``X X^T / 2n + 1e-3 I`` (X: n x 2n standard normal) on CUDA against the CPU (all its
  threads), at n = 256 .. 4096 (``--eigh-sizes``): median seconds over repeats, their
  ratio, the CUDA result's reconstruction residual ``||Q diag(s) Q^T - A||_F / ||A||_F``
  (float64) and its largest eigenvalue difference to the CPU's, relative to the largest
  eigenvalue.
- ``woodbury_store``: a Linear 256 -> 8192 whose G runs on the Woodbury policy (truncated
  EMA of rank 512, 64 rows per step, factors and inverses every step: 64 columns are stacked
  per step and U is truncated back to 8192 x 512 float32, 16 MiB, once past 512). Once
  with ``woodbury_store_device="compute"`` (U on the GPU), once with
  ``"auto"`` and ``woodbury_store_threshold_bytes=1`` (U in pinned host memory, moved on
  use). Checks that the second really stores U pinned on the host and the first on the GPU,
  that both give the same parameters after ``--woodbury-steps`` steps (float32 rounding
  allowed: 1e-4 relative), and times them interleaved (pinned / on-device).
- ``nccl``: a one-GPU NCCL process group (world size 1, ``init_method`` TCP on 127.0.0.1,
  a free port, ``MASTER_ADDR``/``MASTER_PORT`` set likewise) and ``KFAC(...,
  process_group=dist.group.WORLD)`` on an MLP for 3 steps, against the same run without a
  process group: after the first step factors A and G must agree to 1e-6 and parameters to
  1e-5 relative (an all-reduce over one rank changes nothing; the packed symmetric
  transfer and float32 rounding may: on CPU with gloo 4e-9 and 4e-7), and the
  preconditioner must have run its collectives through NCCL (``comm.calls_by_kind``). The
  differences after each later step are recorded, not checked: the Adam-normalised base
  update amplifies rounding-level differences (gloo, step 3: 1e-5 and 1e-4).

Prints one table per section and writes JSON (``--out``, default
``benchmarks/results/gpu_check.json``). A section that raises is reported as failed
(error text in the JSON) and the others still run; the exit code is 1 when a check failed.
Without CUDA it prints ``no CUDA device: nothing measured`` and exits with 0, writing
nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import socket
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from time_to_target import make_workload  # noqa: E402 (the benchmark's workload builders)

from kfac_optim import KFAC, KFACCoverageWarning  # noqa: E402
from kfac_optim.demo.tasks import Task  # noqa: E402
from kfac_optim.demo.training import time_interleaved, timing_reliability  # noqa: E402

SECTIONS = ("step_time", "eigh", "woodbury_store", "nccl")
LM_WORKLOADS = ("gpt2_lm", "llama_lm")
NO_CUDA = "no CUDA device: nothing measured"
NCCL_STEPS = 3
# The device and process-group backend the checks run on. Only for reading the code paths
# on a machine without CUDA may a caller set them to "cpu" / "gloo" (then the pinned-memory
# and NCCL checks report not ok, as they must).
DEVICE = "cuda"
BACKEND = "nccl"


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


# step_time -----------------------------------------------------------------------
def check_step_time(args: argparse.Namespace) -> dict[str, Any]:
    """K-FAC / AdamW step-time ratios on CUDA, per LM workload (see module docstring)."""
    out: dict[str, Any] = {}
    for name in LM_WORKLOADS:
        task = make_workload(name)
        configs = {"adamw": ("adamw", dict(lr=args.lr, weight_decay=0.0))}
        for base in args.bases:
            configs[f"kfac-{base}"] = ("kfac", dict(lr=args.lr, weight_decay=0.0, base=base))
        timing = time_interleaved(task, configs, steps=args.time_steps,
                                  rounds=args.time_rounds, device=DEVICE)
        out[name] = dict(config=task.config, lr=args.lr, timing=timing,
                         unreliable=timing_reliability(timing, [], cores=os.cpu_count()))
    return out


def table_step_time(rec: dict[str, Any]) -> str:
    lines = ["| workload | optimizer | ms/step | x AdamW | ratio spread |",
             "|---|---|---:|---:|---:|"]
    for name, w in rec.items():
        for label, t in w["timing"].items():
            lines.append(f"| {name} | {label} | {t['ms_per_step']:.2f} | "
                         f"{t['ratio_to_adamw']:.2f} | {t['ratio_spread']:.0%} |")
    return "\n".join(lines)


# eigh ----------------------------------------------------------------------------
def _spd(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2 * n, generator=g)
    return x @ x.t() / (2 * n) + 1e-3 * torch.eye(n)


def _median_seconds(fn, reps: int, cuda: bool) -> float:
    times = []
    for _ in range(reps):
        if cuda:
            _sync()
        t0 = time.perf_counter()
        fn()
        if cuda:
            _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def check_eigh(args: argparse.Namespace) -> dict[str, Any]:
    """torch.linalg.eigh on CUDA vs CPU, float32, per size (see module docstring)."""
    rows = []
    for n in args.eigh_sizes:
        a_cpu = _spd(n)
        a_gpu = a_cpu.to(DEVICE)
        torch.linalg.eigh(a_gpu)  # warm-up: cuSOLVER handles and workspace
        _sync()
        reps = 3 if n <= 1024 else 1
        cpu_s = _median_seconds(lambda a=a_cpu: torch.linalg.eigh(a), reps, cuda=False)
        gpu_s = _median_seconds(lambda a=a_gpu: torch.linalg.eigh(a), max(reps, 3), cuda=True)
        s_gpu, q_gpu = torch.linalg.eigh(a_gpu)
        s_cpu = torch.linalg.eigvalsh(a_cpu.double())
        q, s, a64 = q_gpu.double().cpu(), s_gpu.double().cpu(), a_cpu.double()
        residual = float(torch.linalg.matrix_norm(q @ torch.diag(s) @ q.t() - a64)
                         / torch.linalg.matrix_norm(a64))
        eig_diff = float((s - s_cpu).abs().max() / s_cpu.abs().max())
        rows.append(dict(n=n, cpu_s=cpu_s, cuda_s=gpu_s, cpu_over_cuda=cpu_s / gpu_s,
                         reps_cpu=reps, reps_cuda=max(reps, 3), cuda_residual=residual,
                         max_eig_diff_rel=eig_diff, ok=residual < 1e-4 and eig_diff < 1e-4))
    return dict(cpu_threads=torch.get_num_threads(), dtype="float32", rows=rows)


def table_eigh(rec: dict[str, Any]) -> str:
    lines = [f"| n | CPU s ({rec['cpu_threads']} threads) | CUDA s | CPU / CUDA | CUDA residual "
             "| eigenvalues vs CPU | ok |", "|---:|---:|---:|---:|---:|---:|---|"]
    for r in rec["rows"]:
        lines.append(f"| {r['n']} | {r['cpu_s']:.4f} | {r['cuda_s']:.4f} | "
                     f"{r['cpu_over_cuda']:.1f} | {r['cuda_residual']:.1e} | "
                     f"{r['max_eig_diff_rel']:.1e} | {'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines)


# woodbury_store --------------------------------------------------------------------
WOODBURY = dict(d=256, o=8192, rows=64, rank=512)
_WOODBURY_HP = dict(lr=1e-3, weight_decay=0.0, base="adamw", inverse_policy="woodbury",
                    woodbury_rank=WOODBURY["rank"], factor_update_steps=1, inv_update_steps=1)
STORES = {"on_device": dict(woodbury_store_device="compute"),
          "pinned_host": dict(woodbury_store_device="auto", woodbury_store_threshold_bytes=1)}


def _woodbury_task() -> Task:
    d, o, rows = WOODBURY["d"], WOODBURY["o"], WOODBURY["rows"]
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(o, d, generator=g) / d**0.5

    def batches(seed: int):
        gen = torch.Generator().manual_seed(seed)
        while True:
            x = torch.randn(rows, d, generator=gen)
            yield x, x @ teacher.t() + 0.1 * torch.randn(rows, o, generator=gen)

    def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.mse_loss(model(batch[0]), batch[1])

    return Task(name="woodbury_store", config=dict(WOODBURY), build_model=lambda: nn.Linear(d, o),
                batches=batches, loss=loss, evaluate=lambda model: {},
                save_model=lambda model, path: None)


def check_woodbury_store(args: argparse.Namespace) -> dict[str, Any]:
    """U on the GPU vs in pinned host memory: placement, equal results, step time."""
    task = _woodbury_task()
    finals, placement = {}, {}
    for label, store in STORES.items():
        torch.manual_seed(0)
        model = task.build_model().to(DEVICE)
        opt = KFAC(model, **_WOODBURY_HP, **store)
        batches = task.batches(0)
        for _ in range(args.woodbury_steps):
            x, y = (t.to(DEVICE) for t in next(batches))
            opt.zero_grad(set_to_none=True)
            task.loss(model, (x, y)).backward()
            opt.step()
        _sync()
        (row,) = opt.preconditioner.describe()
        # The stored U itself (LayerView.G_factor would hand it back moved to the layer).
        (layer,) = opt.preconditioner._layers.values()
        cols = layer.g.cols
        placement[label] = dict(policy=row["policy"], u_shape=list(cols.shape),
                                u_device=str(cols.device), u_pinned=bool(cols.is_pinned()),
                                u_mb=cols.numel() * cols.element_size() / 2**20)
        finals[label] = model.weight.detach().double().cpu()
        opt.preconditioner.remove()
    diff = float((finals["pinned_host"] - finals["on_device"]).abs().max()
                 / finals["on_device"].abs().max())
    ok = (placement["on_device"]["u_device"].startswith("cuda")
          and placement["pinned_host"]["u_device"] == "cpu"
          and placement["pinned_host"]["u_pinned"]
          and all(p["policy"] == "woodbury" for p in placement.values()) and diff < 1e-4)
    configs = {label: ("kfac", dict(_WOODBURY_HP, **store)) for label, store in STORES.items()}
    timing = time_interleaved(task, configs, steps=args.woodbury_time_steps,
                              rounds=args.time_rounds, reference="on_device", device=DEVICE)
    return dict(config=dict(WOODBURY, steps=args.woodbury_steps), placement=placement,
                max_weight_diff_rel=diff, ok=ok, timing=timing)


def table_woodbury(rec: dict[str, Any]) -> str:
    lines = ["| U store | policy | U shape | U device | pinned | MiB | ms/step | x on-device |",
             "|---|---|---|---|---|---:|---:|---:|"]
    for label, p in rec["placement"].items():
        t = rec["timing"][label]
        lines.append(f"| {label} | {p['policy']} | {tuple(p['u_shape'])} | {p['u_device']} | "
                     f"{p['u_pinned']} | {p['u_mb']:.1f} | {t['ms_per_step']:.2f} | "
                     f"{t['ratio_to_on_device']:.2f} |")
    lines.append(f"\nweights after {rec['config']['steps']} steps, pinned vs on-device: max "
                 f"relative difference {rec['max_weight_diff_rel']:.1e}; "
                 f"{'ok' if rec['ok'] else 'NOT OK'}")
    return "\n".join(lines)


# nccl ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_nccl(args: argparse.Namespace) -> dict[str, Any]:
    """KFAC with a one-rank NCCL group equals KFAC without a group (see module docstring)."""
    import torch.distributed as dist

    if BACKEND == "nccl" and not dist.is_nccl_available():
        raise RuntimeError("torch.distributed has no NCCL backend in this build")
    port = _free_port()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group(BACKEND, init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1,
                            device_id=torch.device("cuda", 0) if DEVICE == "cuda" else None)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10)).to(DEVICE)
        ref_model = copy.deepcopy(model)
        hp = dict(lr=1e-2, weight_decay=0.0, base="adamw", factor_update_steps=1,
                  inv_update_steps=1)
        opt = KFAC(model, process_group=dist.group.WORLD, **hp)
        ref = KFAC(ref_model, process_group=None, **hp)
        g = torch.Generator().manual_seed(0)

        def differences() -> tuple[float, float]:
            factors = max(float((a - b).abs().max() / b.abs().max())
                          for la, lb in zip(opt.preconditioner.layers.values(),
                                            ref.preconditioner.layers.values(), strict=True)
                          for a, b in ((la.A, lb.A), (la.G, lb.G)))
            params = max(float((p - q).detach().abs().max() / q.detach().abs().max())
                         for p, q in zip(model.parameters(), ref_model.parameters(),
                                         strict=True))
            return factors, params

        per_step = []
        for _ in range(NCCL_STEPS):
            x = torch.randn(16, 32, generator=g).to(DEVICE)
            y = torch.randint(0, 10, (16,), generator=g).to(DEVICE)
            for m, o in ((model, opt), (ref_model, ref)):
                o.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(m(x), y).backward()
                o.step()
            _sync()
            per_step.append(differences())
        calls = dict(opt.preconditioner.comm.calls_by_kind)
        (factor_diff, param_diff) = per_step[0]
        return dict(backend=dist.get_backend(), world_size=dist.get_world_size(),
                    init_method=f"tcp://127.0.0.1:{port}", steps=NCCL_STEPS,
                    max_factor_diff_rel=factor_diff, max_param_diff_rel=param_diff,
                    diff_per_step=per_step, collectives=calls,
                    ok=factor_diff < 1e-6 and param_diff < 1e-5 and sum(calls.values()) > 0)
    finally:
        dist.destroy_process_group()


def table_nccl(rec: dict[str, Any]) -> str:
    return ("| backend | world size | steps | factors vs no group (step 1) | parameters (step 1) | "
            "collectives | ok |\n|---|---:|---:|---:|---:|---|---|\n"
            f"| {rec['backend']} | {rec['world_size']} | {rec['steps']} | "
            f"{rec['max_factor_diff_rel']:.1e} | {rec['max_param_diff_rel']:.1e} | "
            f"{rec['collectives']} | {'yes' if rec['ok'] else 'NO'} |")


CHECKS = {"step_time": (check_step_time, table_step_time),
          "eigh": (check_eigh, table_eigh),
          "woodbury_store": (check_woodbury_store, table_woodbury),
          "nccl": (check_nccl, table_nccl)}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma list of {','.join(SECTIONS)}")
    p.add_argument("--lr", type=float, default=2e-3, help="lr of AdamW and K-FAC (2e-3)")
    p.add_argument("--bases", default="adamw,sgd", help="K-FAC base updates timed")
    p.add_argument("--time-steps", type=int, default=100, help="steps per timing block (100)")
    p.add_argument("--time-rounds", type=int, default=3, help="timing rounds (3)")
    p.add_argument("--eigh-sizes", type=_ints, default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--woodbury-steps", type=int, default=10,
                   help="steps of the equal-results check (10)")
    p.add_argument("--woodbury-time-steps", type=int, default=20,
                   help="steps per Woodbury timing block (20)")
    p.add_argument("--out", default="benchmarks/results/gpu_check.json")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if not args.sections or any(s not in SECTIONS for s in args.sections):
        p.error(f"--sections {args.sections}; accepted: {SECTIONS}")
    args.bases = [b.strip() for b in args.bases.split(",") if b.strip()]
    if any(b not in ("sgd", "adamw", "grafting") for b in args.bases):
        p.error(f"--bases {args.bases}; accepted: sgd, adamw, grafting")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the selected checks; print tables; write the JSON. Returns the exit code."""
    args = parse_args(argv)
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    warnings.filterwarnings("ignore", category=KFACCoverageWarning)
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "command": "python benchmarks/gpu_check.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else DEVICE,
        "torch": torch.__version__,
        "cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
        "platform": platform.platform(), "loadavg_start": os.getloadavg(), "sections": {},
    }
    failed = []
    for name in args.sections:
        check, table = CHECKS[name]
        print(f"\n## {name}")
        try:
            rec = check(args)
        except Exception as err:  # report and go on: one device session, every check
            traceback.print_exc()
            results["sections"][name] = {"error": f"{type(err).__name__}: {err}", "ok": False}
            failed.append(name)
            print(f"FAILED: {type(err).__name__}: {err}")
            continue
        results["sections"][name] = rec
        print(table(rec))
        if rec.get("ok") is False or (name == "eigh" and not all(r["ok"] for r in rec["rows"])):
            failed.append(name)
    results["loadavg_end"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - t0
    results["failed"] = failed
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"\n{results['device']}  torch {results['torch']}  CUDA {results['cuda']}  "
          f"load average start/end {results['loadavg_start'][0]:.2f}/"
          f"{results['loadavg_end'][0]:.2f}  wall {results['wall_s']:.0f} s  "
          f"failed: {', '.join(failed) or 'none'}  -> {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
