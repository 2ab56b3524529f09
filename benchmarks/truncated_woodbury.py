"""Cost of the truncated low-rank EMA (``woodbury_rank``) on one wide head.

    python benchmarks/truncated_woodbury.py [--o 4096,8192] [--t 512,2048] [--r 256,512,1024]
                                            [--out benchmarks/results/truncated_woodbury.json]

A head with ``o`` outputs gets ``T`` new output-gradient columns per factor update. Without
truncation its low-rank G grows by T columns per update until ``max_low_rank(o)`` (``auto``:
0.75 o), then turns dense: from there every inverse update is an ``eigh`` of the o x o G.
With ``woodbury_rank=r`` each factor update costs one ``LowRankFactor.truncate`` of the
(o, r + T) stack (QR, O(o (r + T)^2), and an ``eigh`` of (r + T)^2), and each inverse update a
``lowrank_eigh`` of the (o, r) factor.

For each (o, T, r) the script builds a ``LowRankFactor`` in steady state (r columns kept,
one warm-up update), then times, in this process:

- ``update_s``: ``update`` (stack the new block) + ``truncate(r)``: per factor update;
- ``inverse_s``: ``lowrank_eigh`` of the truncated factor: per inverse update;

against the baseline measured in the same process for each o: ``eig_s``, ``eigh`` of a
dense o x o PSD G (what the layer pays per inverse update once it has turned dense). The
ratios ``eig_s / update_s`` and ``eig_s / inverse_s`` are what the table shows. Random
Gaussian columns (the dropped-trace fraction of real gradients, which are far more
concentrated, is in the demo's ``kfac_layers``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from kfac_optim.factors import LowRankFactor
from kfac_optim.inverse import lowrank_eigh


def _time(fn, reps: int) -> float:
    """Median seconds of ``reps`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(o: int, t: int, r: int, reps: int, gen: torch.Generator) -> dict:
    factor = LowRankFactor()
    blocks = [torch.randn(o, t, generator=gen) / t**0.5 for _ in range(reps + 2)]
    factor.update(blocks[0], 0.95)
    factor.truncate(r)  # steady state: r columns
    it = iter(blocks[1:])
    dropped = []

    def update() -> None:
        factor.update(next(it), 0.95)
        dropped.append(factor.truncate(r))

    update_s = _time(update, reps)
    inverse_s = _time(lambda: lowrank_eigh(factor.factor()), reps)
    return {"o": o, "T": t, "r": r, "update_s": update_s, "inverse_s": inverse_s,
            "dropped_G": statistics.median(dropped)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--o", default="4096,8192", help="head widths, comma-separated")
    p.add_argument("--t", default="512,2048", help="columns per factor update")
    p.add_argument("--r", default="256,512,1024", help="woodbury_rank values")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/truncated_woodbury.json")
    args = p.parse_args(argv)
    widths, ts, rs = ([int(v) for v in s.split(",") if v] for s in (args.o, args.t, args.r))
    gen = torch.Generator().manual_seed(0)
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(),
              "platform": platform.platform(), "load_average_before": os.getloadavg(),
              "baseline": {}, "rows": []}
    print(f"{'o':>6} {'T':>5} {'r':>5} {'update s':>9} {'inverse s':>9} {'eig s':>7} "
          f"{'eig/update':>10} {'eig/inverse':>11} {'dropped':>8}")
    for o in widths:
        m = torch.randn(o, o, generator=gen)
        g = m @ m.t() / o
        eig_s = _time(lambda g=g: torch.linalg.eigh(g), 1)
        result["baseline"][str(o)] = eig_s
        for t in ts:
            for r in rs:
                row = measure(o, t, r, args.reps, gen)
                row.update(eig_s=eig_s, eig_over_update=eig_s / row["update_s"],
                           eig_over_inverse=eig_s / row["inverse_s"])
                result["rows"].append(row)
                print(f"{o:>6} {t:>5} {r:>5} {row['update_s']:>9.3f} {row['inverse_s']:>9.3f} "
                      f"{eig_s:>7.2f} {row['eig_over_update']:>10.1f} "
                      f"{row['eig_over_inverse']:>11.1f} {row['dropped_G']:>8.3f}")
    result["load_average_after"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
