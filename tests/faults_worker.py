"""2-rank worker for tests/test_faults_distributed.py (torchrun, gloo on 127.0.0.1): ranks
that disagree or fall out of step, FSDP2 on a tiny GPT-2 with Conv1D, an owner-mode state.

The process group has a 60 s timeout: a regression (a hang) fails in a minute, not in 30.
Rank 0 writes the results to ``argv[1]``; error messages are recorded per rank.
"""

from __future__ import annotations

import copy
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from kfac_optim import KFAC, KFACPreconditioner
from tests.dist_worker import data, finish, full, local, loss_fn, max_diff, model_fn

# option: (rank 0's value, rank 1's value)
DIFFERING = {"damping": (1e-2, 2e-2), "kl_clip": (1e-3, None),
             "damping_mode": ("exact", "factored"), "factor_decay": (0.5, 0.9),
             "inverse_policy": ("eig", "woodbury"),
             "factor_update_steps": (1, 2), "inverse_workers": ("replicate", "owner"),
             "comm_dtype": (None, torch.bfloat16)}


def every_rank(value):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def error_of(build, kind):
    try:
        build()
    except kind as e:
        return str(e)
    return None


def differing_options(rank):
    """Each option set differently on the two ranks: every rank's construction error."""
    out = {}
    for name, values in DIFFERING.items():
        kw = {"lr": 0.1, "kl_clip": None, name: values[rank]}
        out[name] = every_rank(error_of(lambda kw=kw: KFACPreconditioner(model_fn(), **kw),
                                        ValueError))
    width = 24 + rank  # another model on rank 1: the layers' shapes differ

    def other_model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Tanh(),
                                   torch.nn.Linear(width, 3)).double()

    out["layers"] = every_rank(error_of(lambda: KFACPreconditioner(other_model(), kl_clip=None),
                                        ValueError))
    out["same"] = every_rank(error_of(lambda: KFACPreconditioner(model_fn(), kl_clip=None),
                                      ValueError))
    return out


def out_of_step(rank, extra_rank=None, load_ahead=False, **kw):
    """3 steps of a plain model; ``extra_rank`` calls ``pre.step()`` once more after the
    first; with ``load_ahead`` rank 1 resumes from a state one step ahead. Each rank's
    RuntimeError (None: none)."""
    common = dict(factor_update_steps=1, inv_update_steps=1, kl_clip=None, **kw)
    model = model_fn()
    pre = KFACPreconditioner(model, **common)
    if load_ahead and rank == 1:
        ahead = KFACPreconditioner(model_fn(), process_group=None, **common)
        x, y, mask = data(0)
        loss_fn(ahead.model, x, y, mask).backward()
        ahead.step()
        pre.load_state_dict(ahead.state_dict())
    message = None
    try:
        for step in range(3):
            x, y, mask = data(step)
            model.zero_grad()
            pre.set_token_mask(local(mask, rank))
            loss_fn(model, local(x, rank), local(y, rank), local(mask, rank)).backward()
            pre.step()
            if step == 0 and rank == extra_rank:
                pre.step()
    except RuntimeError as e:
        message = str(e)
    return every_rank(message)


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).double()


def gpt2_fsdp(rank, before):
    """KFAC on a tiny GPT-2 built before or after ``fully_shard`` (each Conv1D, the block,
    the root); 3 steps against a single-process float64 KFAC given the same gradients."""
    from torch.distributed.fsdp import fully_shard
    from transformers.pytorch_utils import Conv1D

    model = gpt2()
    ref_model = copy.deepcopy(model)
    kw = dict(lr=0.1, damping=1e-2, factor_update_steps=1, inv_update_steps=2)
    opt = KFAC(model, **kw) if before else None
    for module in [m for m in model.modules() if isinstance(m, Conv1D)]:
        fully_shard(module)
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    opt = opt or KFAC(model, **kw)
    ref = KFAC(ref_model, process_group=None, **kw)
    for step in range(3):
        ids = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(200 + step))
        mine = ids[2 * rank: 2 * rank + 2]
        opt.zero_grad()
        model(input_ids=mine, labels=mine).loss.backward()
        averaged = [full(p.grad).clone() for p in model.parameters()]
        opt.step()
        ref_model.zero_grad()
        ref_model(input_ids=ids, labels=ids).loss.backward()
        for p, g in zip(ref_model.parameters(), averaged, strict=True):
            p.grad.copy_(g)
        ref.step()
    pre = opt.preconditioner
    return {"sharded": all(hasattr(p, "full_tensor") for p in model.parameters()),
            "layers": sorted(pre.layer_names), "ref_layers": sorted(ref.preconditioner.layer_names),
            "types": sorted({type(model.get_submodule(n)).__name__ for n in pre.layer_names}),
            "max_param_diff": max_diff([full(p.detach()) for p in model.parameters()],
                                       list(ref_model.parameters()))}


def owner_state(rank):
    """One rank's owner-mode state read by fisher_metrics: the error (None: read)."""
    from fisher_metrics import KFACFisher

    model = model_fn()
    pre = KFACPreconditioner(model, inverse_workers="owner", factor_update_steps=1,
                             inv_update_steps=1, kl_clip=None)
    x, y, mask = data(0)
    pre.set_token_mask(local(mask, rank))
    loss_fn(model, local(x, rank), local(y, rank), local(mask, rank)).backward()
    pre.step()
    return every_rank(error_of(lambda: KFACFisher.from_state_dict(pre.state_dict(), model),
                               ValueError))


def main():
    out = sys.argv[1]
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    results = {"options": differing_options(rank),
               "extra-step": out_of_step(rank, extra_rank=1),
               "owner-extra-step": out_of_step(rank, extra_rank=0, inverse_workers="owner"),
               "load-ahead": out_of_step(rank, load_ahead=True),
               "in-step": out_of_step(rank),
               "gpt2-fsdp-after": gpt2_fsdp(rank, before=False),
               "gpt2-fsdp-before": gpt2_fsdp(rank, before=True),
               "owner-state": owner_state(rank)}
    finish(rank, out, results)


if __name__ == "__main__":
    main()
