"""2-rank DeepSpeed worker for tests/test_deepspeed.py (torchrun, DS_ACCELERATOR=cpu, gloo).

Stage 0: K-FAC as DeepSpeed's client optimizer matches a single-process K-FAC given the
same averaged gradients. Stages 1-3: the error K-FAC raises. Rank 0 writes ``argv[1]``.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import deepspeed
import torch.distributed as dist

from kfac_optim import KFAC
from tests.dist_worker import data, local, loss_fn, max_diff, reference_step
from tests.dist_worker import model_fn as model_fn64

CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
          "steps_per_print": 10**9, "wall_clock_breakdown": False,
          "zero_allow_untested_optimizer": True}
KW = dict(lr=0.1, damping=1e-2, factor_update_steps=1, inv_update_steps=2)


def model_fn():
    return model_fn64().float()  # DeepSpeed reduces float32/16 gradients only


def batch(step):
    x, y, mask = data(step)
    return x.float(), y, mask


def stage0(rank):
    model = model_fn()
    ref_model = copy.deepcopy(model)
    opt = KFAC(model, **KW)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=opt, config={**CONFIG, "zero_optimization": {"stage": 0}})
    ref = KFAC(ref_model, process_group=None, **KW)
    for step in range(3):
        x, y, mask = batch(step)
        opt.preconditioner.set_token_mask(local(mask, rank))
        loss = loss_fn(engine, local(x, rank), local(y, rank), local(mask, rank))
        engine.backward(loss)
        averaged = [p.grad.clone() for p in model.parameters()]
        engine.step()
        reference_step(ref_model, ref, x, y, mask, averaged)
    return {"max_param_diff": max_diff(list(model.parameters()), list(ref_model.parameters()))}


def refused(rank, stage):
    model = model_fn()
    try:
        opt = KFAC(model, **KW)
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=opt,
            config={**CONFIG, "zero_optimization": {"stage": stage}})
        x, y, mask = batch(0)
        engine.backward(loss_fn(engine, local(x, rank), local(y, rank), local(mask, rank)))
        engine.step()
    except RuntimeError as err:
        return {"error": str(err)}
    return {"error": None}


def main():
    out = sys.argv[1]
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    results = {"stage0": stage0(rank)}
    for stage in (1, 2, 3):
        results[f"stage{stage}"] = refused(rank, stage)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
