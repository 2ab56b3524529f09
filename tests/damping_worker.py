"""2-rank worker for tests/test_adaptive_damping.py (torchrun, gloo on 127.0.0.1).

KFAC(damping_adaptation="levenberg_marquardt") under DDP, each rank holding half of every
batch, against a single-process run on the whole batch (same initial model), in the
replicate and owner placements. Rank 0 writes every rank's damping and rho history and
the largest parameter difference to ``argv[1]``.
"""

from __future__ import annotations

import gc
import json
import math
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from kfac_optim import KFAC


def model_fn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh(),
                         nn.Linear(7, 3)).double()


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + step)
    return torch.randn(32, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (32,),
                                                                              generator=g)


def run(model, opt, rows: slice, steps: int = 6) -> dict:
    dampings, rhos = [], []
    for s in range(steps):
        x, y = data(s)
        x, y = x[rows], y[rows]

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        dampings.append(opt.param_groups[0]["damping"])
        rhos.append(opt.damping_adaptation.rho)
    return {"damping": dampings, "rho": rhos}


def scenario(rank: int, **kw) -> dict:
    opts = dict(lr=0.1, damping=3e-2, damping_adaptation="levenberg_marquardt",
                damping_adaptation_steps=1, factor_update_steps=1, inv_update_steps=2, **kw)
    local = model_fn()
    ddp = DDP(local)
    mine = run(ddp, KFAC(ddp, **opts), slice(16 * rank, 16 * (rank + 1)))
    ref_model = model_fn()
    ref = run(ref_model, KFAC(ref_model, process_group=None, **opts), slice(None))
    every = [None, None]
    dist.all_gather_object(every, mine)
    diff = max(float((p - q).abs().max()) for p, q in zip(local.parameters(),
                                                        ref_model.parameters(), strict=True))
    rel = max(abs(a - b) / abs(b) for a, b in zip(mine["rho"], ref["rho"], strict=True)
              if math.isfinite(b))
    return {"ranks": every, "reference": ref, "max_param_diff": diff, "max_rho_rel": rel}


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {"replicate": scenario(rank),
               "owner": scenario(rank, inverse_workers="owner")}
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f)
    gc.collect()  # the scenarios' DDP reducers go before the group does
    dist.barrier()  # no rank tears gloo down while the other still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
