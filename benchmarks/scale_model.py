"""Per-rank K-FAC factor memory and communication for large models, from layer shapes.

    python benchmarks/scale_model.py [--tokens-per-rank 4096] [--validate]

The byte model is the one ``kfac_optim`` implements (``kfac_optim/distributed.py``):

- dense factors (A, and G on the eig path): one all-reduce per factor update of the packed
  upper triangles, n (n + 1) / 2 values per n x n factor, float32 (or ``comm_dtype``);
- Woodbury G (gather mode): an all-gather of every rank's o x T_r column block;
- Woodbury G (``woodbury_reduction="row_sharded"``): per factor update one all_to_all that
  sends the other ranks their rows of this rank's block, (o - ceil(o/R)) T_r values from
  rank 0; per inverse update an all-reduce of the packed k x k Gram in float64; per step an
  all-reduce of U^T V (k x d) and an all-gather of this rank's ceil(o/R) x d rows of the update;
- ``inverse_workers="assign"``: each rank broadcasts the eigenbases it computed
  (d^2 + d + o^2 + o values per dense layer), every rank receives all of them.
- ``inverse_workers="owner"``: the same packed buffers, each summed onto the layer's owner
  (``dist.reduce``), a Woodbury G's blocks gathered to the owner only; and at *every step*
  each owner broadcasts its layers' preconditioned gradients (o x d values per layer).

"buffer" is the size of the tensor handed to the collective (what ``pre.comm`` records);
"sent" is what one rank puts on the wire with ring algorithms: all-reduce 2 (R-1)/R x
buffer, all-gather (R-1) x its block, broadcast (R-1)/R x buffer on average, all_to_all what
it records; for owner mode reduce (R-1)/R x buffer (the reduce-scatter half of an all-reduce;
the chunks sent on to the owner, (R-1)/R^2 x buffer, neglected) and gather-to-owner (R-1)/R
x its block on average. Memory per rank: running factors + eigenbases (eig: 2 (d^2 + o^2)
floats) or U (o x k) + k x k Gram (Woodbury gather, replicated on every rank in replicate /
assign mode) or ceil(o/R) x k rows of U + the k x k Gram (row-sharded). k = the columns of
one factor update, T_r R (an EMA over several updates stacks more, up to
``woodbury_max_rank``). In owner mode each rank holds the layers ``assign_greedy`` gives it
(by inverse cost, as ``KFACPreconditioner`` does), and the table shows the most loaded rank.
"DDP MiB/step" is what DDP's own gradient all-reduce of the preconditioned layers sends per
step, for scale.

Validation: the same formulas applied to the demo LM at 2 ranks are compared with the buffer
bytes ``pre.comm`` records on rank 0 of a real 2-process run (``--validate``, ~2 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kfac_optim.distributed import assign_greedy  # noqa: E402

F32 = 4


@dataclass(frozen=True)
class Layer:
    name: str
    d: int  # inputs (+1 with bias)
    o: int  # outputs
    count: int = 1


def gpt2_124m(vocab=50257):
    e = 769  # 768 + bias
    block = [Layer("c_attn", e, 2304), Layer("attn.c_proj", e, 768), Layer("c_fc", e, 3072),
             Layer("mlp.c_proj", 3073, 768)]
    return [Layer(x.name, x.d, x.o, 12) for x in block] + [Layer("lm_head", 768, vocab)]


def llama(d, layers, mlp, kv, vocab):
    block = [Layer("q_proj", d, d), Layer("k_proj", d, kv), Layer("v_proj", d, kv),
             Layer("o_proj", d, d), Layer("gate_proj", d, mlp), Layer("up_proj", d, mlp),
             Layer("down_proj", mlp, d)]
    return [Layer(x.name, x.d, x.o, layers) for x in block] + [Layer("lm_head", d, vocab)]


MODELS = {
    "gpt2-124m": gpt2_124m(),
    "llama-7b": llama(4096, 32, 11008, 4096, 32000),
    "llama-7b-128k-vocab": llama(4096, 32, 11008, 4096, 128256),
    "llama-70b": llama(8192, 80, 28672, 1024, 32000),
    "llama-70b-128k-vocab": llama(8192, 80, 28672, 1024, 128256),
}


def tri(n: int) -> int:
    return n * (n + 1) // 2


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def row_sharded_bytes(o: int, d: int, ranks: int, tokens_per_rank: int, k: int) -> dict:
    """Rank 0's buffers for one row-sharded Woodbury layer (``pre.comm`` kinds)."""
    mine = ceil_div(o, ranks)
    return {"low_rank_exchange": (o - mine) * tokens_per_rank * F32,
            "low_rank_gram": tri(k) * 8, "low_rank_utv": k * d * F32,
            "low_rank_rows": mine * d * F32}


def per_rank(layers, ranks: int, tokens_per_rank: int, woodbury_min_out: int | None,
             mode: str = "replicate", max_rank: int = 8192, row_sharded: bool = False) -> dict:
    """Bytes for one factor update, one inverse update and one step (and memory) per rank;
    ``mode`` is ``inverse_workers``. Woodbury for o >= woodbury_min_out while the T_global
    columns of one update fit under ``max_rank`` (``woodbury_max_rank``: past it the layer
    falls back to a dense G, as the preconditioner does); ``row_sharded``:
    ``woodbury_reduction="row_sharded"``. Owner mode adds ``grad_broadcast`` bytes at every
    step."""
    dense_buf = gather_block = inv_bcast = grad_bcast = 0
    shard = dict.fromkeys(("low_rank_exchange", "low_rank_gram", "low_rank_utv",
                           "low_rank_rows"), 0)
    t_global = tokens_per_rank * ranks
    woodbury_layers = 0
    memory, costs = {}, {}
    for layer in layers:
        low = (woodbury_min_out is not None and layer.o >= woodbury_min_out
               and t_global <= max_rank)
        woodbury_layers += layer.count * low
        dense_buf += layer.count * (tri(layer.d) + (0 if low else tri(layer.o))) * F32
        mem = 2 * layer.d**2 * F32  # A and its eigenbasis
        if low and row_sharded and ranks > 1:
            for kind, v in row_sharded_bytes(layer.o, layer.d, ranks, tokens_per_rank,
                                             t_global).items():
                shard[kind] += layer.count * v
            mem += (ceil_div(layer.o, ranks) * t_global + t_global**2) * F32
        elif low:
            gather_block += layer.count * layer.o * tokens_per_rank * F32
            mem += (layer.o * t_global + t_global**2) * F32
        else:
            mem += 2 * layer.o**2 * F32
            inv_bcast += layer.count * (layer.d**2 + layer.d + layer.o**2 + layer.o) * F32
        grad_bcast += layer.count * layer.o * layer.d * F32
        k = min(layer.o, max_rank) if low else layer.o
        for i in range(layer.count):
            memory[f"{layer.name}.{i}"] = mem
            costs[f"{layer.name}.{i}"] = layer.d**3 + layer.o * k * k
    r = ranks
    if mode == "owner":
        load = [0] * r
        for name, owner in assign_greedy(costs, r).items():
            load[owner] += memory[name]
        factor_memory = max(load)
        sent = (r - 1) / r * dense_buf + (r - 1) / r * gather_block
    else:
        factor_memory = sum(memory.values())
        sent = 2 * (r - 1) / r * dense_buf + (r - 1) * gather_block
        if mode == "assign":
            sent += (r - 1) / r * inv_bcast
    sent += shard["low_rank_exchange"]
    step_sent = (r - 1) / r * grad_bcast if mode == "owner" else 0
    step_sent += 2 * (r - 1) / r * shard["low_rank_utv"] + (r - 1) * shard["low_rank_rows"]
    return {"woodbury_layers": woodbury_layers,
            "dense_buffer_bytes": dense_buf, "gather_block_bytes": gather_block,
            "inverse_broadcast_bytes": inv_bcast if mode == "assign" else 0,
            "grad_broadcast_bytes_per_step": grad_bcast if mode == "owner" else 0,
            "row_sharded_buffer_bytes": shard,
            "sent_bytes_per_update": sent,
            "sent_bytes_per_inverse_update": 2 * (r - 1) / r * shard["low_rank_gram"],
            "sent_bytes_per_step_every_step": step_sent,
            "ddp_grad_allreduce_sent_bytes_per_step": 2 * (r - 1) / r * grad_bcast,
            "factor_memory_bytes": factor_memory}


def demo_layers():
    """The demo LM's preconditioned layers as ``Layer`` shapes, the names of those with a
    diagonal A, and of positional tables (found by one real step, as at run time)."""
    import torch

    from kfac_optim import KFACPreconditioner
    from kfac_optim.demo import build_lm_model

    model = build_lm_model()
    pre = KFACPreconditioner(model, kl_clip=None)
    ids = torch.randint(0, 256, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    layers = list(pre.layers.values())
    out = [Layer(la.name, la.shape[1], la.shape[0]) for la in layers]
    diagonal = {la.name for la in layers if la.kind == "embedding"}
    positional = {la.name for la in layers if la.positional}
    return out, diagonal, positional


def validate() -> dict:
    """Model vs measured buffer bytes at 2 ranks (benchmarks/distributed.py's worker)."""
    root = Path(__file__).resolve().parent.parent
    out = root / "benchmarks" / "results" / "scale_validate.json"
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(root / "benchmarks" / "distributed.py"), "--worker", "--part", str(out),
           "--steps", "2", "--inv", "10", "--batch", "16", "--seq", "64", "--bucket-mb", ""]
    subprocess.run(cmd, env=env, check=True, cwd=root, capture_output=True)
    measured = json.loads(out.read_text())["rows"]
    out.unlink()
    layers, diagonal, positional = demo_layers()
    tokens = 16 * 64
    # diagonal A (Embedding) is a vector of d values, not a triangle
    dense = sum((layer.d if layer.name in diagonal else tri(layer.d)) + tri(layer.o)
                for layer in layers) * F32
    woodbury_dense = dense - sum(tri(la.o) for la in layers) * F32
    # 2 + 2 steps, each a factor update; one inverse update (step 0: k = 2 x 1024 columns),
    # used by the 4 preconditioning steps: per update, the Gram counts 1/4, U^T V and rows 1
    per_update = {"low_rank_exchange": 1, "low_rank_gram": 0.25, "low_rank_utv": 1,
                  "low_rank_rows": 1}
    row_sharded = {"dense": woodbury_dense, **dict.fromkeys(per_update, 0)}
    for la in layers:
        if la.name not in positional:
            for kind, v in row_sharded_bytes(la.o, la.d, 2, tokens, 2 * tokens).items():
                row_sharded[kind] += v * per_update[kind]
    woodbury = {"dense": woodbury_dense,
                "low_rank_gather": sum(la.o for la in layers if la.name not in positional)
                * tokens * F32}
    # every step, each preconditioned (o, d) gradient (positional tables are not)
    grads = sum(la.o * la.d for la in layers if la.name not in positional) * F32
    model = {"eig/replicate": {"dense": dense},
             "eig/owner": {"dense": dense, "grad_broadcast": grads},
             "woodbury/replicate": woodbury,
             "woodbury/owner": dict(woodbury, grad_broadcast=grads),
             "woodbury/row_sharded": row_sharded}
    report = {}
    for name, expected in model.items():
        got = measured[name]["bytes_per_factor_update"]
        report[name] = {k: {"model": v, "measured": got.get(k)} for k, v in expected.items()}
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens-per-rank", type=int, default=4096)
    p.add_argument("--woodbury-min-out", type=int, default=16384,
                   help="hybrid policy threshold for the Woodbury rows")
    p.add_argument("--validate", action="store_true")
    p.add_argument("--out", default="benchmarks/results/scale_model.json")
    args = p.parse_args()
    results = {"tokens_per_rank": args.tokens_per_rank, "rows": []}
    print(f"{'model':<22} {'ranks':>5} {'policy':<18} {'woodbury':>8} {'memory GiB':>10} "
          f"{'sent MiB/update':>16} {'+ MiB every step':>16} {'DDP MiB/step':>13} "
          f"{'dense buf MiB':>14} {'gather blk MiB':>15}")
    for model, layers in MODELS.items():
        for ranks in (1, 8, 64, 1024):
            for policy in ("eig/replicate", "eig/assign", "eig/owner", "hybrid/replicate",
                           "hybrid/row_sharded"):
                wmin = args.woodbury_min_out if policy.startswith("hybrid") else None
                workers = "replicate" if policy.endswith("row_sharded") else policy.split("/")[1]
                row = per_rank(layers, ranks, args.tokens_per_rank, wmin, workers,
                               row_sharded=policy.endswith("row_sharded"))
                row.update(model=model, ranks=ranks, policy=policy)
                results["rows"].append(row)
                print(f"{model:<22} {ranks:>5} {policy:<18} {row['woodbury_layers']:>8} "
                      f"{row['factor_memory_bytes'] / 2**30:>10.1f} "
                      f"{row['sent_bytes_per_update'] / 2**20:>16.0f} "
                      f"{row['sent_bytes_per_step_every_step'] / 2**20:>16.0f} "
                      f"{row['ddp_grad_allreduce_sent_bytes_per_step'] / 2**20:>13.0f} "
                      f"{row['dense_buffer_bytes'] / 2**20:>14.0f} "
                      f"{row['gather_block_bytes'] / 2**20:>15.0f}")
    if args.validate:
        results["validation_2_ranks"] = validate()
        print("validation at 2 ranks (buffer bytes per factor update, model vs measured):")
        for name, kinds in results["validation_2_ranks"].items():
            for kind, v in kinds.items():
                print(f"  {name:<20} {kind:<17} model {v['model']:>10} measured {v['measured']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
