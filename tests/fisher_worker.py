"""2-rank worker for tests/test_fisher_type.py (torchrun, gloo on 127.0.0.1).

``fisher_type="type2"`` under DDP, each rank holding half of every batch (uneven valid token
counts, tests/dist_worker.py's data), against a single-process type-2 reference on the whole
batch given the same DDP-averaged gradient (no
backward of its own); and ``"mc"`` with ``fisher_seed``: each rank's
generator is seeded with ``seed + rank``, so the reference draws rank 0's half with seed and
rank 1's with seed + 1. Rank 0 writes the largest differences to ``argv[1]``.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from kfac_optim import KFACPreconditioner
from tests.dist_worker import (
    across_ranks,
    data,
    factor_pairs,
    finish,
    local,
    max_diff,
    model_fn,
)

SEED = 7


def compare(rank, fisher_type, steps=3, swap=False):
    """swap: the reference draws the halves with each other's seeds (must then differ)."""
    model = model_fn()
    ref_model = copy.deepcopy(model)
    common = dict(factor_update_steps=1, inv_update_steps=1, kl_clip=None, damping=1e-2,
                  factor_decay=0.5, fisher_type=fisher_type, fisher_seed=SEED)
    ddp = DDP(model)
    pre = KFACPreconditioner(ddp, **common)
    ref = KFACPreconditioner(ref_model, process_group=None, **common)
    gens = [torch.Generator().manual_seed(SEED + r) for r in range(2)][::-1 if swap else 1]
    worst = {"factors": 0.0, "grads": 0.0}
    for step in range(steps):
        x, y, mask = data(step)
        ddp.zero_grad()
        pre.set_token_mask(local(mask, rank))
        logits = ddp(local(x, rank))
        assert pre.fisher_backward(logits, "categorical", mask=local(mask, rank))
        per = torch.nn.functional.cross_entropy(logits.reshape(-1, 3), local(y, rank).reshape(-1),
                                                reduction="none")
        (per * local(mask, rank).reshape(-1)).sum().div(local(mask, rank).sum()).backward()
        averaged = [p.grad.clone() for p in model.parameters()]
        pre.step()
        # reference: the whole batch, one fisher_backward per rank's half (its generator)
        ref_model.zero_grad()
        for r in range(2):
            ref.set_token_mask(local(mask, r))
            out = ref_model(local(x, r))
            ref.fisher_backward(out, "categorical", mask=local(mask, r), generator=gens[r])
        for p, g in zip(ref_model.parameters(), averaged, strict=True):
            p.grad = g.clone()
        ref.step()
        pairs = factor_pairs(pre, ref)
        worst["factors"] = max(worst["factors"], max_diff(*zip(*pairs, strict=True)))
        worst["grads"] = max(worst["grads"], max_diff(
            [p.grad for p in model.parameters()], [p.grad for p in ref_model.parameters()]))
    worst["G_norm"] = min(float(layer.G.norm()) for layer in pre.layers.values())
    worst["factors"], worst["grads"] = across_ranks([worst["factors"], worst["grads"]],
                                                    dist.ReduceOp.MAX)
    return worst


def main():
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {kind: compare(rank, kind) for kind in ("type2", "mc")}
    results["mc-swapped-seeds"] = compare(rank, "mc", swap=True)
    finish(rank, out, results)


if __name__ == "__main__":
    main()
