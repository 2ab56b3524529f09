"""2-rank worker for tests/test_distributed.py (launched with torchrun, gloo on 127.0.0.1).

Each scenario runs K-FAC under DDP with every rank holding part of a batch (uneven valid
token counts) and, on every rank, a single-process reference on the whole batch given the
same (DDP-averaged) gradient. Rank 0 writes the largest differences to ``argv[1]``.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from kfac_optim import KFAC, KFACPreconditioner
from kfac_optim.distributed import all_gather_rows


def model_fn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 24), nn.Tanh(), nn.Linear(24, 3)).double()


def deep_model_fn():
    """Three layers: in owner mode one rank owns two (several tensors per buffer)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(),
                         nn.Linear(24, 3)).double()


def data(step):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(4, 5, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (4, 5), generator=g)
    mask = torch.ones(4, 5)
    mask[0, 4] = 0  # rank 0: 9 valid tokens
    mask[2, 2:] = 0  # rank 1: 3 valid tokens
    mask[3, 1:] = 0
    return x, y, mask


def loss_fn(model, x, y, mask):
    per = F.cross_entropy(model(x).reshape(-1, 3), y.reshape(-1), reduction="none")
    return (per * mask.reshape(-1)).sum() / mask.sum()


def reference_step(ref_model, ref, x, y, mask, grads):
    """One single-process step on the whole batch given the distributed run's averaged
    gradients ``grads``: compares the preconditioning, not the gradient averaging.
    ``ref``: a KFACPreconditioner or a KFAC optimizer."""
    pre = getattr(ref, "preconditioner", ref)
    ref_model.zero_grad()
    pre.set_token_mask(mask)
    loss_fn(ref_model, x, y, mask).backward()
    for p, g in zip(ref_model.parameters(), grads, strict=True):
        p.grad.copy_(g)
    ref.step()


def local(t, rank):
    return t[2 * rank: 2 * rank + 2]


@torch.no_grad()
def max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True)) if a else 0.0


def g_value(layer):
    """G of a layer; a row-sharded U is gathered first (every rank calls this together)."""
    if layer.rows is None:
        return layer.G
    u = all_gather_rows(layer.G_factor, layer.shape[0], dist.group.WORLD)
    return u @ u.t()


def factor_pairs(pre, ref):
    """(distributed, reference) factor pairs of the layers whose factors this rank holds
    (every layer, except in owner mode: the layers it owns)."""
    return [(t, r) for name, layer in pre.layers.items() if layer.A is not None
            for t, r in ((layer.A, ref.layers[name].A), (g_value(layer), ref.layers[name].G))]


def fingerprint(pre):
    """Sums and sums of squares of every held factor: equal iff (almost surely) bitwise."""
    return [[float(t.double().sum()), float(t.double().square().sum())]
            for _, layer in sorted(pre.layers.items()) if layer.A is not None
            for t in (layer.A, g_value(layer))]


def across_ranks(values, op):
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return t.tolist()


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in (model[0], model[2]):
        fully_shard(layer)
    return fully_shard(model)


def fsdp1(model, nested=False, **kw):
    """FSDP1 on CPU (gloo): ``device_id`` must name the CPU (it defaults to an accelerator).
    nested: each Linear its own unit as well; else one flat parameter whose shards cut
    across the layers' parameters (4*24 + 24 + 24*3 + 3 = 195 values: 98 / 97)."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    policy = ModuleWrapPolicy({nn.Linear}) if nested else None
    return FullyShardedDataParallel(model, device_id=torch.device("cpu"), auto_wrap_policy=policy,
                                    **{"use_orig_params": True, **kw})


def whole(wrapped, model, grads=True):
    """Every parameter (or its gradient) whole: FSDP1 gathers, FSDP2 DTensors are gathered."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if not isinstance(wrapped, FullyShardedDataParallel):
        return [full(p.grad if grads else p.detach()).clone() for p in model.parameters()]
    with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False, with_grads=grads):
        return [(p.grad if grads else p.detach()).clone() for p in model.parameters()]


def compare_preconditioner(rank, steps=3, wrap="ddp", build=model_fn, **kw):
    """wrap: "ddp", "fsdp" (K-FAC built after fully_shard), "fsdp-before" (before) or
    "fsdp1" (FullyShardedDataParallel, use_orig_params=True)."""
    model = build()
    ref_model = copy.deepcopy(model)
    common = dict(factor_update_steps=1, inv_update_steps=1, kl_clip=None, damping=1e-2,
                  factor_decay=0.5)
    common.update(kw)
    if wrap == "ddp":
        ddp = DDP(model)
        pre = KFACPreconditioner(ddp, **common)
    elif wrap == "fsdp":
        ddp = shard(model)
        pre = KFACPreconditioner(ddp, **common)
    elif wrap == "fsdp1":
        ddp = fsdp1(model)
        pre = KFACPreconditioner(ddp, **common)
    else:
        pre = KFACPreconditioner(model, **common)
        ddp = shard(model)
    ref = KFACPreconditioner(ref_model, process_group=None, **common)
    worst = {"factors": 0.0, "grads": 0.0}
    for step in range(steps):
        x, y, mask = data(step)
        ddp.zero_grad()
        pre.set_token_mask(local(mask, rank))
        loss_fn(ddp, local(x, rank), local(y, rank), local(mask, rank)).backward()
        averaged = whole(ddp, model)
        pre.step()
        reference_step(ref_model, ref, x, y, mask, averaged)
        pairs = factor_pairs(pre, ref)
        worst["factors"] = max(worst["factors"], max_diff(*zip(*pairs, strict=True)))
        worst["grads"] = max(worst["grads"], max_diff(
            whole(ddp, model), [p.grad for p in ref_model.parameters()]))
    worst["factors"], worst["grads"] = across_ranks([worst["factors"], worst["grads"]],
                                                    dist.ReduceOp.MAX)
    # layers whose factors some rank holds, summed over ranks: 2 x ranks replicated, 2 owned
    (worst["held"],) = across_ranks([len(pairs) / 2], dist.ReduceOp.SUM)
    # low-rank Gs over ranks: every rank must agree on each G's form
    (worst["low_rank"],) = across_ranks([sum(la.low_rank for la in pre.layers.values())],
                                        dist.ReduceOp.SUM)
    worst["bytes"] = dict(pre.comm.bytes)
    worst["u_rows"] = {name: layer.G_factor.shape[0] for name, layer in pre.layers.items()
                       if layer.G_factor is not None}
    worst["policies"] = [row["policy"] for row in pre.describe()]
    worst["calls"] = dict(pre.comm.calls_by_kind)
    worst["fingerprint"] = fingerprint(pre)
    if pre.layer_owners is not None:
        usage = pre.memory_usage()["layers"]
        mine = [usage[n]["total"] for n, r in pre.layer_owners.items() if r == rank]
        others = [usage[n]["total"] for n, r in pre.layer_owners.items() if r != rank]
        worst["owned_min_bytes"] = across_ranks([min(mine)], dist.ReduceOp.MIN)[0]
        worst["unowned_max_bytes"] = across_ranks([max(others)], dist.ReduceOp.MAX)[0]
    return worst


def resume(rank, path, **extra):
    """Train 4 steps, and 2 + save / load (one file per rank) + 2: the same parameters."""
    kw = {**dict(lr=0.05, damping=1e-2, factor_update_steps=1, inv_update_steps=2,
                 inverse_policy="auto", factor_decay=0.7), **extra}

    def run(ddp, opt, pre_steps):
        for step in pre_steps:
            x, y, mask = data(step)
            opt.zero_grad()
            opt.preconditioner.set_token_mask(local(mask, rank))
            loss_fn(ddp, local(x, rank), local(y, rank), local(mask, rank)).backward()
            opt.step()

    m1 = model_fn()
    d1 = DDP(m1)
    o1 = KFAC(d1, **kw)
    run(d1, o1, range(4))
    m2 = model_fn()
    d2 = DDP(m2)
    o2 = KFAC(d2, **kw)
    run(d2, o2, range(2))
    state = o2.state_dict()
    layer = state["kfac"]["layers"]["0"]
    keys = sorted(state["kfac"]["layers"]) + sorted(layer) + sorted(layer["G"])
    if extra.get("inverse_workers") != "owner":  # owner mode: inv None on the other rank
        keys += sorted(layer["inv"] or {})
    all_keys = [None, None]
    dist.all_gather_object(all_keys, keys)
    torch.save({"model": m2.state_dict(), "opt": state}, f"{path}.rank{rank}.pt")
    ckpt = torch.load(f"{path}.rank{rank}.pt", weights_only=True)
    m3 = model_fn()
    m3.load_state_dict(ckpt["model"])
    d3 = DDP(m3)
    o3 = KFAC(d3, **kw)
    o3.load_state_dict(ckpt["opt"])
    run(d3, o3, range(2, 4))
    out = {"same_keys_on_ranks": all_keys[0] == all_keys[1], "keys": keys,
           "g_rows": layer["G"].get("rows"),
           "max_param_diff": max_diff(list(m1.parameters()), list(m3.parameters()))}
    if extra.get("inverse_workers") == "owner":
        dist.barrier()  # every rank's file is written
        other = torch.load(f"{path}.rank{1 - rank}.pt", weights_only=True)["opt"]
        out["other_rank_refused"] = refuses(KFAC(DDP(model_fn()), **kw), other)
        out["replicate_refuses"] = refuses(KFAC(DDP(model_fn()), **dict(kw, inverse_workers=
                                                                         "replicate")), state)
    return out


def refuses(opt, state):
    try:
        opt.load_state_dict(state)
    except RuntimeError:
        return True
    return False


def from_replicated_state(rank, path):
    """A replicated state (the "resume" scenario's files) loaded in owner mode: each rank
    keeps the layers it owns, and 2 more steps match the replicated run."""
    kw = dict(lr=0.05, damping=1e-2, factor_update_steps=1, inv_update_steps=2,
              inverse_policy="auto", factor_decay=0.7)
    params = []
    for workers in ("replicate", "owner"):
        # loaded per run: the optimizer adopts the file's momentum buffers and updates them
        ckpt = torch.load(f"{path}.rank{rank}.pt", weights_only=True)
        model = model_fn()
        model.load_state_dict(ckpt["model"])
        ddp = DDP(model)
        opt = KFAC(ddp, inverse_workers=workers, **kw)
        opt.load_state_dict(ckpt["opt"])
        for step in (2, 3):
            x, y, mask = data(step)
            opt.zero_grad()
            opt.preconditioner.set_token_mask(local(mask, rank))
            loss_fn(ddp, local(x, rank), local(y, rank), local(mask, rank)).backward()
            opt.step()
        params.append(list(model.parameters()))
    usage = opt.preconditioner.memory_usage()["layers"]
    owners = opt.preconditioner.layer_owners
    return {"max_param_diff": max_diff(*params),
            "unowned_bytes": sum(usage[n]["total"] for n, r in owners.items() if r != rank)}


def fsdp_optimizer_steps(rank, **extra):
    """KFAC as the optimizer of an FSDP2 model: parameters stay sharded and finite, and
    match a single-process KFAC run given the same averaged gradients."""
    model = model_fn()
    ref_model = copy.deepcopy(model)
    kw = dict(lr=0.1, damping=1e-2, factor_update_steps=1, inv_update_steps=2)
    sharded = shard(model)
    opt = KFAC(sharded, **kw, **extra)
    ref = KFAC(ref_model, process_group=None, **kw)
    for step in range(3):
        x, y, mask = data(step)
        opt.zero_grad()
        opt.preconditioner.set_token_mask(local(mask, rank))
        loss_fn(sharded, local(x, rank), local(y, rank), local(mask, rank)).backward()
        averaged = [full(p.grad).clone() for p in model.parameters()]
        opt.step()
        reference_step(ref_model, ref, x, y, mask, averaged)
    params = [full(p.detach()) for p in model.parameters()]
    return {"sharded": all(hasattr(p, "full_tensor") for p in model.parameters()),
            "max_param_diff": max_diff(params, list(ref_model.parameters()))}


def fsdp1_optimizer_steps(rank):
    """KFAC as the optimizer of a nested FSDP1 model (use_orig_params=True): layer names
    are the unwrapped ones, parameters stay flat shards, and match a single-process KFAC
    run given the same averaged gradients."""
    model = model_fn()
    ref_model = copy.deepcopy(model)
    kw = dict(lr=0.1, damping=1e-2, factor_update_steps=1, inv_update_steps=2)
    wrapped = fsdp1(model, nested=True)
    opt = KFAC(wrapped, **kw)
    ref = KFAC(ref_model, process_group=None, **kw)
    for step in range(3):
        x, y, mask = data(step)
        opt.zero_grad()
        opt.preconditioner.set_token_mask(local(mask, rank))
        loss_fn(wrapped, local(x, rank), local(y, rank), local(mask, rank)).backward()
        averaged = whole(wrapped, model)
        opt.step()
        reference_step(ref_model, ref, x, y, mask, averaged)
    return {"layer_names": opt.preconditioner.layer_names,
            "local_numel": sum(p.numel() for p in model.parameters()),  # of 195
            "max_param_diff": max_diff(whole(wrapped, model, grads=False),
                                       list(ref_model.parameters()))}


def fsdp1_refusals(rank):
    """The messages of what K-FAC refuses under FSDP1, in the order tried."""
    errors = {}
    flat = fsdp1(model_fn(), use_orig_params=False)
    inner = fsdp1(model_fn())
    for key, build in (("use_orig_params_false", lambda: KFAC(flat, lr=0.1)),
                       ("inner_module", lambda: KFACPreconditioner(inner.module, kl_clip=None))):
        try:
            build()
            errors[key] = None
        except ValueError as e:
            errors[key] = str(e)
    model = model_fn()  # K-FAC built before wrapping: the first step sees flat shards
    pre = KFACPreconditioner(model, factor_update_steps=1, inv_update_steps=1, kl_clip=None)
    wrapped = fsdp1(model)
    x, y, mask = data(0)
    pre.set_token_mask(local(mask, rank))
    loss_fn(wrapped, local(x, rank), local(y, rank), local(mask, rank)).backward()
    try:
        pre.step()
        errors["built_before_wrap"] = None
    except RuntimeError as e:
        errors["built_before_wrap"] = str(e)
    return errors


def main():
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {}
    for policy in ("eig", "woodbury"):
        for mode in ("exact", "factored"):
            results[f"{policy}-{mode}"] = compare_preconditioner(rank, inverse_policy=policy,
                                                                 damping_mode=mode)
    results["ekfac"] = compare_preconditioner(rank, eigenvalue_correction=True)
    for policy in ("eig", "woodbury"):
        for mode in ("exact", "factored"):
            results[f"assign-{policy}-{mode}"] = compare_preconditioner(
                rank, inverse_policy=policy, damping_mode=mode, inverse_workers="assign",
                max_condition_number=1e4)
    for policy in ("eig", "woodbury"):
        for mode in ("exact", "factored"):
            results[f"owner-{policy}-{mode}"] = compare_preconditioner(
                rank, inverse_policy=policy, damping_mode=mode, inverse_workers="owner")
    # low-rank G turning dense on its owner (auto: past 0.75 o columns); the others follow
    results["owner-auto"] = compare_preconditioner(rank, inverse_workers="owner",
                                                   inverse_policy="auto")
    # a clip that binds: the scale from the broadcast results must be the reference's
    results["owner-kl-clip"] = compare_preconditioner(rank, inverse_workers="owner",
                                                      kl_clip=1e-8, lr=1.0)
    # a cap below one factor's bytes (1e-4 MiB = 104 B): every tensor in its own buffer
    results["bucketed"] = compare_preconditioner(rank, comm_bucket_mb=1e-4)
    results["owner-deep"] = compare_preconditioner(rank, build=deep_model_fn,
                                                   inverse_workers="owner")
    results["owner-bucketed"] = compare_preconditioner(rank, build=deep_model_fn,
                                                       inverse_workers="owner",
                                                       comm_bucket_mb=1e-4)
    results["comm_bfloat16"] = compare_preconditioner(rank, comm_dtype=torch.bfloat16)
    results["resume"] = resume(rank, out)
    rowshard = dict(inverse_policy="woodbury", woodbury_reduction="row_sharded")
    for mode in ("exact", "factored"):
        results[f"rowshard-woodbury-{mode}"] = compare_preconditioner(
            rank, steps=4, damping_mode=mode, **rowshard)
    # layer 0 (o = 24) row-sharded Woodbury, layer 2 (o = 3) dense and assigned; clipping
    results["rowshard-assign-hybrid"] = compare_preconditioner(
        rank, inverse_policy="hybrid", hybrid_min_out=20, woodbury_reduction="row_sharded",
        inverse_workers="assign", max_condition_number=1e4)
    # damping_scale="relative": each layer's lambda from its own inverse, equal on every rank
    for mode in ("exact", "factored"):
        results[f"relative-eig-{mode}"] = compare_preconditioner(
            rank, damping_scale="relative", damping_mode=mode)
        results[f"relative-owner-woodbury-{mode}"] = compare_preconditioner(
            rank, damping_scale="relative", damping_mode=mode, inverse_policy="woodbury",
            inverse_workers="owner")
        results[f"relative-rowshard-{mode}"] = compare_preconditioner(
            rank, steps=4, damping_scale="relative", damping_mode=mode, **rowshard)
    # 16 columns per update: past 40 at the third step both layers turn dense
    results["rowshard-dense-fallback"] = compare_preconditioner(
        rank, steps=4, woodbury_max_rank=40, **rowshard)
    results["rowshard-fsdp"] = compare_preconditioner(rank, wrap="fsdp", **rowshard)
    # Truncated EMA (woodbury_rank=6 < 12 columns per update): gather mode truncates the
    # gathered U by QR, row-sharded mode through the all-reduced float64 Gram.
    for reduction in ("gather", "row_sharded"):
        results[f"truncate-{reduction}"] = compare_preconditioner(
            rank, steps=4, inverse_policy="woodbury", woodbury_rank=6,
            woodbury_reduction=reduction)
    results["rowshard-resume"] = resume(rank, f"{out}.rowshard", **rowshard)
    results["resume-owner"] = resume(rank, out + ".owner", inverse_workers="owner")
    results["owner-from-replicated-state"] = from_replicated_state(rank, out)
    for policy in ("eig", "woodbury"):
        results[f"fsdp-{policy}"] = compare_preconditioner(rank, wrap="fsdp",
                                                           inverse_policy=policy)
        results[f"owner-fsdp-{policy}"] = compare_preconditioner(
            rank, wrap="fsdp", inverse_policy=policy, inverse_workers="owner")
    results["fsdp-before-shard"] = compare_preconditioner(rank, wrap="fsdp-before")
    results["fsdp-kfac-steps"] = fsdp_optimizer_steps(rank)
    for policy in ("eig", "woodbury"):
        results[f"fsdp1-{policy}"] = compare_preconditioner(rank, wrap="fsdp1",
                                                            inverse_policy=policy)
    results["fsdp1-kfac-steps"] = fsdp1_optimizer_steps(rank)
    results["fsdp1-refusals"] = fsdp1_refusals(rank)
    results["owner-fsdp-kfac-steps"] = fsdp_optimizer_steps(rank, inverse_workers="owner")
    finish(rank, out, results)


def finish(rank, out, results):
    """Rank 0 writes ``results`` to ``out``; every rank leaves the group and exits."""
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # measured: gloo workers sometimes abort at interpreter exit


if __name__ == "__main__":
    main()
