"""Bytes sent per factor update, factor memory per rank and step time at 1 vs 2 ranks (gloo).

    python benchmarks/distributed.py [--steps 12] [--bucket-mb 0.25,1]
                                     [--out benchmarks/results/distributed.json]
    python benchmarks/distributed.py --woodbury [--out benchmarks/results/distributed_woodbury.json]

Launches itself under ``torchrun`` with 1 and 2 processes. In each, on the demo GPT-2 LM
(each rank: its own batch of ``--batch`` x ``--seq`` tokens), it times SGD-momentum (the
baseline, same process), then K-FAC with ``factor_update_steps=1, inv_update_steps=--inv``
for the variants below, and records what the preconditioner sent:

- ``eig/replicate``: dense factors, packed upper triangles, every rank computes inverses;
- ``eig/assign``: inverses computed by one rank each and broadcast;
- ``woodbury/replicate`` (gather mode): column blocks of G gathered;
- ``woodbury/row_sharded``: each rank holds its rows of U (``woodbury_reduction``).
- ``eig/owner``, ``woodbury/owner``: statistics reduced to each layer's owner, which alone
  holds its factors and broadcasts the preconditioned gradient every step;
- ``eig/replicate/bucket=X``: the dense reduction in buffers of at most X MiB, issued
  asynchronously (``comm_bucket_mb``).

At 2 ranks it also times the dense reduction alone (``reduce_symmetric`` on the demo's
factor shapes, float32, interleaved rounds, median) for each bucket cap: "comm_ms".
"factor memory" is ``memory_usage()["total"]`` per rank after the run (factors, low-rank
U, eigenbases).

"unpacked" is what full n x n float32 matrices would cost (the same reduction without
packing). Ratios are K-FAC ms/step over SGD ms/step measured in the same process.

``--woodbury`` compares the two Woodbury reductions at 2 ranks on one vocabulary-like head
(``nn.Linear(d, o)``, cross-entropy over o classes, ``--tokens`` rows per rank), for each
``--shapes`` o x d and both damping modes: bytes per factor update (all-gather vs all_to_all
plus the dense A), per inverse update (the row-sharded Gram), per step (row-sharded only:
U^T V all-reduce and the rows all-gather), U and inverse memory per rank
(``pre.memory_usage()``), the mean ms/step over all steps (factor and inverse updates every
``--period`` steps, amortized) and the median ms/step of the steps between updates.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

VARIANTS = {
    "eig/replicate": dict(inverse_policy="eig", inverse_workers="replicate"),
    "eig/assign": dict(inverse_policy="eig", inverse_workers="assign"),
    "eig/owner": dict(inverse_policy="eig", inverse_workers="owner"),
    "woodbury/replicate": dict(inverse_policy="woodbury", inverse_workers="replicate"),
    "woodbury/row_sharded": dict(inverse_policy="woodbury", woodbury_reduction="row_sharded"),
    "woodbury/owner": dict(inverse_policy="woodbury", inverse_workers="owner"),
}
REDUCTIONS = ("gather", "row_sharded")
PER_STEP = ("low_rank_utv", "low_rank_rows")  # row-sharded: sent at every preconditioning step


def time_reduction(pre, caps, rounds=7, reps=5) -> dict[str, float]:
    """Median ms of one dense reduction of ``pre``'s layers as eig/replicate sends it (A and
    G float32 sums, float64 counts) per bucket cap in MiB (None: one buffer); caps
    interleaved in every round."""
    import torch.distributed as dist

    from kfac_optim.distributed import reduce_symmetric

    tensors = []
    for layer in pre.layers.values():
        o, d = layer.shape
        count = torch.tensor(1.0, dtype=torch.float64)
        tensors += [torch.ones(d) if layer.kind == "embedding" else torch.eye(d), count,
                    torch.eye(o), count]
    times: dict[str, list[float]] = {str(c): [] for c in caps}
    for _ in range(rounds):
        for cap in caps:
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(reps):
                reduce_symmetric(tensors, dist.group.WORLD,
                                 bucket_bytes=None if cap is None else int(cap * 2**20))
            times[str(cap)].append((time.perf_counter() - t0) / reps)
    return {c: 1e3 * statistics.median(t) for c, t in times.items()}


def worker(args) -> None:
    import torch.distributed as dist

    from kfac_optim import KFAC
    from kfac_optim.demo import build_lm_model
    from kfac_optim.demo.data import load_lm_data

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    tokens = load_lm_data().train
    g = torch.Generator().manual_seed(1000 + rank)

    def batch():
        starts = torch.randint(0, tokens.numel() - args.seq - 1, (args.batch,), generator=g)
        return torch.stack([tokens[s: s + args.seq] for s in starts.tolist()])

    def timed(make_opt, steps):
        torch.manual_seed(0)
        model = build_lm_model()
        ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
        opt = make_opt(model)
        times = []
        for i in range(steps + 2):
            ids = batch()
            dist.barrier()
            t0 = time.perf_counter()
            opt.zero_grad()
            ddp(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            dist.barrier()
            if i >= 2:  # warm-up excluded
                times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times), opt

    sgd_ms, _ = timed(lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                      args.steps)
    rows = {"sgd": {"ms_per_step": sgd_ms, "ratio_to_sgd": 1.0}}
    caps = [float(c) for c in args.bucket_mb.split(",") if c]
    variants = dict(VARIANTS)
    if world > 1:
        variants.update({f"eig/replicate/bucket={c:g}": dict(inverse_policy="eig",
                                                              comm_bucket_mb=c) for c in caps})
    for name, kw in variants.items():
        ms, opt = timed(lambda m, kw=kw: KFAC(m, lr=0.1, base="sgd", damping_mode="exact",
                                               kl_clip=1e-3, factor_update_steps=1,
                                               inv_update_steps=args.inv, **kw), args.steps)
        pre = opt.preconditioner
        updates = pre.steps  # one factor update per step
        unpacked = 4 * sum(
            layer.shape[1] ** (1 if layer.kind == "embedding" else 2)
            + (0 if layer.low_rank else layer.shape[0] ** 2)
            for layer in pre.layers.values())
        memory = [None] * world
        dist.all_gather_object(memory, pre.memory_usage()["total"])
        rows[name] = {
            "ms_per_step": ms, "ratio_to_sgd": ms / sgd_ms,
            "bytes_per_factor_update": {k: v / updates for k, v in pre.comm.bytes.items()},
            "buffers_per_factor_update": {k: v / updates
                                          for k, v in pre.comm.calls_by_kind.items()},
            "unpacked_dense_bytes": unpacked if world > 1 else 0,
            "factor_memory_bytes_per_rank": memory,
        }
    comm_ms = time_reduction(pre, [None, *caps]) if world > 1 else {}
    if rank == 0:
        Path(args.part).write_text(json.dumps({"world_size": world, "rows": rows,
                                               "comm_ms": comm_ms}))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def woodbury_worker(args) -> None:
    """2 ranks, one head: gather vs row_sharded (see the module docstring)."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from kfac_optim import KFACPreconditioner

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    rows = {}
    for shape in args.shapes.split(","):
        o, d = (int(x) for x in shape.split("x"))
        g = torch.Generator().manual_seed(rank)
        batches = [(torch.randn(args.tokens, d, generator=g),
                    torch.randint(0, o, (args.tokens,), generator=g)) for _ in range(4)]
        runs = [("none", "sgd")] + [(mode, reduction) for mode in ("factored", "exact")
                                    for reduction in REDUCTIONS]
        for mode, reduction in runs:
            torch.manual_seed(0)
            head = torch.nn.Linear(d, o)
            ddp = torch.nn.parallel.DistributedDataParallel(head)
            pre = None if reduction == "sgd" else KFACPreconditioner(
                ddp, inverse_policy="woodbury", woodbury_reduction=reduction,
                damping_mode=mode, factor_update_steps=args.period,
                inv_update_steps=args.period, kl_clip=None, damping=1e-3)
            times, between = [], []
            for step in range(args.head_steps):
                x, y = batches[step % len(batches)]
                dist.barrier()
                t0 = time.perf_counter()
                ddp.zero_grad()
                F.cross_entropy(ddp(x), y).backward()
                if pre is not None:
                    pre.step()
                dist.barrier()
                times.append(time.perf_counter() - t0)
                if step % args.period:
                    between.append(times[-1])
            row = {"ms_per_step_mean": 1e3 * statistics.mean(times),
                   "ms_per_step_between_updates": 1e3 * statistics.median(between)}
            if pre is not None:
                updates = -(-args.head_steps // args.period)
                comm = pre.comm.bytes
                mem = pre.memory_usage()["layers"][""]
                row.update(
                    k=pre.describe()[0]["rank"],
                    bytes_per_factor_update=sum(
                        v for kind, v in comm.items()
                        if kind not in PER_STEP + ("low_rank_gram",)) / updates,
                    bytes_per_inverse_update=comm.get("low_rank_gram", 0) / updates,
                    bytes_per_step=sum(comm.get(kind, 0) for kind in PER_STEP)
                    / args.head_steps,
                    bytes_by_kind=dict(comm),
                    u_bytes_per_rank=mem["low_rank"],
                    inverse_bytes_per_rank=mem["inverses"])
            rows[f"{shape}/{mode}/{reduction}"] = row
    if rank == 0:
        Path(args.part).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def run_woodbury(args, root: Path, env: dict) -> None:
    part = Path(args.out).with_suffix(".part.json")
    part.parent.mkdir(parents=True, exist_ok=True)
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // 2))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           __file__, "--woodbury-worker", "--part", str(part), "--shapes", args.shapes,
           "--tokens", str(args.tokens), "--head-steps", str(args.head_steps),
           "--period", str(args.period)]
    load = os.getloadavg()
    subprocess.run(cmd, env=env, check=True, cwd=root, capture_output=True)
    results = {"torch": torch.__version__, "cpu_count": os.cpu_count(), "world_size": 2,
               "tokens_per_rank": args.tokens, "steps": args.head_steps, "period": args.period,
               "loadavg_before": load, "loadavg_after": os.getloadavg(),
               "rows": json.loads(part.read_text())}
    part.unlink()
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"{'head/damping/reduction':<32} {'k':>5} {'ms/step':>8} {'ms between':>10} "
          f"{'B/factor upd':>13} {'B/inv upd':>10} {'B/step':>10} {'U MiB/rank':>10} "
          f"{'inv MiB/rank':>12}")
    for name, row in results["rows"].items():
        print(f"{name:<32} {row.get('k', ''):>5} {row['ms_per_step_mean']:>8.1f} "
              f"{row['ms_per_step_between_updates']:>10.1f} "
              f"{row.get('bytes_per_factor_update', 0):>13.0f} "
              f"{row.get('bytes_per_inverse_update', 0):>10.0f} "
              f"{row.get('bytes_per_step', 0):>10.0f} "
              f"{row.get('u_bytes_per_rank', 0) / 2**20:>10.1f} "
              f"{row.get('inverse_bytes_per_rank', 0) / 2**20:>12.1f}")
    print(f"load average {load[0]:.2f} before, {results['loadavg_after'][0]:.2f} after; "
          f"wrote {args.out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--inv", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--out", default=None, help="default benchmarks/results/distributed.json, "
                   "with --woodbury distributed_woodbury.json")
    p.add_argument("--woodbury", action="store_true",
                   help="gather vs row_sharded Woodbury on one head at 2 ranks")
    p.add_argument("--shapes", default="4096x128,8192x256", help="heads as o x d, comma-separated")
    p.add_argument("--tokens", type=int, default=256, help="rows per rank (--woodbury)")
    p.add_argument("--head-steps", type=int, default=12, help="steps per run (--woodbury)")
    p.add_argument("--period", type=int, default=4,
                   help="factor and inverse update period (--woodbury)")
    p.add_argument("--bucket-mb", default="0.25,1",
                   help="comma-separated bucket caps (MiB) to compare with one buffer")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--woodbury-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--part", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.woodbury_worker:
        woodbury_worker(args)
        return
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=str(root))
    if args.woodbury:
        args.out = args.out or "benchmarks/results/distributed_woodbury.json"
        run_woodbury(args, root, env)
        return
    args.out = args.out or "benchmarks/results/distributed.json"
    results = {"torch": torch.__version__, "cpu_count": os.cpu_count(),
               "load_average_before": os.getloadavg(), "runs": {}}
    for world in (1, 2):
        part = Path(args.out).with_suffix(f".part{world}.json")
        part.parent.mkdir(parents=True, exist_ok=True)
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // world))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={world}", __file__, "--worker", "--part", str(part),
               "--steps", str(args.steps), "--inv", str(args.inv), "--batch", str(args.batch),
               "--seq", str(args.seq), "--bucket-mb", args.bucket_mb]
        subprocess.run(cmd, env=env, check=True, cwd=root, capture_output=True)
        results["runs"][world] = json.loads(part.read_text())
        part.unlink()
    results["load_average_after"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"{'ranks':>5} {'variant':<26} {'ms/step':>8} {'x SGD':>6} {'dense B/upd':>12} "
          f"{'unpacked B':>11} {'gather B/upd':>13} {'inv bcast B/upd':>16} "
          f"{'grad bcast B/step':>18} {'factor MiB/rank':>16}")
    for world, run in results["runs"].items():
        for name, row in run["rows"].items():
            b = row.get("bytes_per_factor_update", {})
            mem = "/".join(f"{m / 2**20:.1f}" for m in row.get("factor_memory_bytes_per_rank", []))
            print(f"{world:>5} {name:<26} {row['ms_per_step']:>8.1f} {row['ratio_to_sgd']:>6.2f} "
                  f"{b.get('dense', 0):>12.0f} {row.get('unpacked_dense_bytes', 0):>11.0f} "
                  f"{b.get('low_rank_gather', 0):>13.0f} {b.get('inverse_broadcast', 0):>16.0f} "
                  f"{b.get('grad_broadcast', 0):>18.0f} {mem:>16}")
        for cap, ms in run.get("comm_ms", {}).items():
            print(f"{world:>5} dense reduction alone, bucket cap {cap} MiB: {ms:.2f} ms")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
