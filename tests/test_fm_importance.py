"""Pruning masks, Fisher scaling, conflict statistics and QKOV interference vs explicit references.

References are written out here: rankings of hand-summed scores, per-sample
gradients from ``torch.func.jacrev`` of ``fm_reference.Problem`` (the MLP has one
row per sample), and Q / K / V / O slices cut by hand from GPT-2's fused
``c_attn`` and from a grouped-query LLaMA. Tolerance 1e-12 relative (float64).
"""

import math

import pytest
import torch
from torch.func import jacrev

import fisher_metrics as fm
from tests.fm_reference import (
    DTYPE,
    Problem,
    mlp_problem,
    single_thread,  # noqa: F401
    tiny_gpt2,
    tiny_llama,
)

TOL = 1e-12


@pytest.fixture(scope="module")
def mlp_fisher():
    model, batches, _ = mlp_problem("ce")
    return model, batches, fm.DiagonalFisher.collect(model, batches)


def test_unstructured_masks_prune_the_lowest_scores(mlp_fisher):
    model, _, fd = mlp_fisher
    for criterion in ("fisher", "saliency"):
        scores = fd.diagonal()
        if criterion == "saliency":
            scores = {
                n: 0.5 * s * p.detach().square()
                for (n, s), p in zip(scores.items(), model.parameters(), strict=True)
            }
        flat = fd.flatten(scores)
        masks = fm.pruning_masks(fd, 0.3, criterion=criterion, model=model)
        keep = fd.flatten(masks)
        assert int((~keep).sum()) == math.floor(0.3 * 53)
        assert float(flat[~keep].max()) <= float(flat[keep].min())
        masks = fm.pruning_masks(fd, 0.5, scope="layer", criterion=criterion, model=model)
        for name, mask in masks.items():
            assert mask.shape == fd.param_shapes[name]
            assert int((~mask).sum()) == math.floor(0.5 * mask.numel())
            assert float(scores[name][~mask].max()) <= float(scores[name][mask].min())
    assert all(bool(m.all()) for m in fm.pruning_masks(fd, 0.0).values())


def test_channel_masks_prune_rows_with_their_bias(mlp_fisher):
    model, _, fd = mlp_fisher
    d = fd.diagonal()
    channel = {layer: d[f"{layer}.weight"].sum(1) + d[f"{layer}.bias"] for layer in ("0", "2")}
    masks = fm.pruning_masks(fd, 0.5, structure="channel", scope="layer", model=model)
    for layer, scores in channel.items():
        kept = masks[f"{layer}.bias"]
        assert torch.equal(masks[f"{layer}.weight"], kept[:, None].expand_as(d[f"{layer}.weight"]))
        assert int((~kept).sum()) == math.floor(0.5 * kept.numel())
        assert float(scores[~kept].max()) <= float(scores[kept].min())
    masks = fm.pruning_masks(fd, 0.5, structure="channel", model=model)
    all_scores = torch.cat(list(channel.values()))
    kept = torch.cat([masks["0.bias"], masks["2.bias"]])
    assert int((~kept).sum()) == 4
    assert float(all_scores[~kept].max()) <= float(all_scores[kept].min())


def head_values(model, q_head_scale):
    """Unit diagonal except q_proj rows of head h scaled by ``q_head_scale[h]``."""
    values = {n: torch.ones_like(p, dtype=DTYPE) for n, p in model.named_parameters()}
    q = values["model.layers.0.self_attn.q_proj.weight"]
    for h, scale in enumerate(q_head_scale):
        q[h * 4 : (h + 1) * 4] *= scale
    return fm.DiagonalFisher(values, model=model)


def test_head_masks_follow_gqa():
    model = tiny_llama()
    prefix = "model.layers.0.self_attn"
    # heads 0 and 1 (both reading kv head 0) are the least important: kv head 0 goes too
    masks = fm.pruning_masks(
        head_values(model, [0.1, 0.2, 5.0, 6.0]), 0.5, structure="head", model=model
    )
    q, o = masks[f"{prefix}.q_proj.weight"], masks[f"{prefix}.o_proj.weight"]
    assert q[:8].logical_not().all() and q[8:].all()
    assert o[:, :8].logical_not().all() and o[:, 8:].all()
    for kv in ("k_proj", "v_proj"):
        assert masks[f"{prefix}.{kv}.weight"][:4].logical_not().all()
        assert masks[f"{prefix}.{kv}.weight"][4:].all()
    assert masks["model.layers.0.mlp.up_proj.weight"].all()
    # heads 0 and 2 pruned: each kv head is still read by a kept query head
    masks = fm.pruning_masks(
        head_values(model, [0.1, 5.0, 0.2, 6.0]), 0.5, structure="head", model=model
    )
    q = masks[f"{prefix}.q_proj.weight"]
    assert (
        q[:4].logical_not().all() and q[4:8].all() and q[8:12].logical_not().all() and q[12:].all()
    )
    assert masks[f"{prefix}.k_proj.weight"].all() and masks[f"{prefix}.v_proj.weight"].all()


def test_scale_by_fisher(mlp_fisher):
    model, batches, fd = mlp_fisher
    updates = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    out = fm.scale_by_fisher(updates, fd, damping=1e-3, power=0.5)
    for name, u in updates.items():
        assert torch.allclose(out[name], u / (fd.values[name] + 1e-3).sqrt(), rtol=TOL)
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(batches[0][0]), batches[0][1]).backward()
    out = fm.scale_by_fisher(model, fd, damping=1e-2)
    assert torch.allclose(
        out["2.bias"], model[2].bias.grad / (fd.values["2.bias"] + 1e-2), rtol=TOL
    )
    model.zero_grad(set_to_none=True)


def test_detect_conflicts_statistic_vs_per_sample_gradients(mlp_fisher):
    model, batches, _ = mlp_fisher
    names = [n for n, _ in model.named_parameters()]
    a = jacrev(Problem(model, names, [batches[0]], "ce").row_losses)(
        Problem(model, names, [], "ce").theta
    )
    b = jacrev(Problem(model, names, [batches[1]], "ce").row_losses)(
        Problem(model, names, [], "ce").theta
    )
    ga, gb = a.mean(0), b.mean(0)
    res = fm.detect_conflicts(model, batches[0], batches[1], z_threshold=0.5)
    assert res["num_samples"] == (3, 7) and res["num_rows"] == (3, 7)
    offset = 0
    for name in names:
        size = dict(model.named_parameters())[name].numel()
        s = slice(offset, offset + size)
        offset += size
        inner = ga[s] @ gb[s]
        se = ((a[:, s] @ gb[s]).var() / 3 + (b[:, s] @ ga[s]).var() / 7).sqrt()
        got = res["groups"][f"{name}|param"]
        assert float(got["inner"]) == pytest.approx(float(inner), rel=TOL)
        assert float(got["cosine"]) == pytest.approx(
            float(inner / (ga[s].norm() * gb[s].norm())), rel=TOL
        )
        assert float(got["z"]) == pytest.approx(float(inner / se), rel=1e-10)
        assert bool(got["conflict"]) == bool(inner / se < -0.5)
    zs = [c[2] for c in res["conflicts"]]
    assert zs == sorted(zs) and all(z < -0.5 for z in zs)
    channel = fm.detect_conflicts(model, batches[0], batches[1], structure="channel")
    inner_rows = (ga[:30].reshape(5, 6) * gb[:30].reshape(5, 6)).sum(1)
    assert torch.allclose(channel["groups"]["0.weight|channel"]["inner"], inner_rows, rtol=TOL)
    empty = (batches[1][0], torch.full_like(batches[1][1], -100))
    with pytest.warns(RuntimeWarning, match="task B has no valid row"):
        res = fm.detect_conflicts(model, batches[0], empty)
    assert res["conflicts"] == [] and float(res["groups"]["0.weight|param"]["inner"]) == 0.0


def two_gpt2_tasks():
    model, batch_a = tiny_gpt2()
    generator = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 11, (2, 4), generator=generator)
    batch_b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    fa, fb = (fm.DiagonalFisher.collect(model, b) for b in (batch_a, batch_b))
    (ga, _), (gb, _) = (fm.task_gradient(model, b) for b in (batch_a, batch_b))
    return model, fa, fb, ga, gb


def manual_slice(tensors, block, head, H=2, hd=4, d=8):
    """GPT-2 slice of ``head`` in ``block``: c_attn columns (and bias) or c_proj rows, by hand."""
    prefix = "transformer.h.0.attn"
    if block == "O":
        return tensors[f"{prefix}.c_proj.weight"][head * hd : (head + 1) * hd].reshape(-1)
    j = "QKV".index(block)
    cols = slice(j * d + head * hd, j * d + (head + 1) * hd)
    w, b = tensors[f"{prefix}.c_attn.weight"], tensors[f"{prefix}.c_attn.bias"]
    return torch.cat([w[:, cols].T.reshape(-1), b[cols]])


def test_qkov_interference_gpt2_vs_manual_slices():
    model, fa, fb, ga, gb = two_gpt2_tasks()
    da, db = fa.diagonal(), fb.diagonal()
    pooled = {n: (da[n] + db[n]) / 2 for n in da}
    for variant, pool in (
        ("signed", "A"),
        ("unsigned", "pooled"),
        ("symmetric", "A"),
        ("signed", "B"),
    ):
        res = fm.qkov_interference(
            model, ga, gb, fa, fb, variant=variant, fisher_pool=pool, rel_ridge=1e-3
        )
        layer = res["layers"]["transformer.h.0.attn"]
        fisher = {"A": da, "B": db, "pooled": pooled}["pooled" if variant == "symmetric" else pool]
        for row, block in enumerate("QKVO"):
            for head in range(2):
                f = manual_slice(fisher, block, head)
                x, y = manual_slice(ga, block, head), manual_slice(gb, block, head)
                lam = max(1e-8, 1e-3 * float(f.max()))
                if variant == "signed":
                    expected = (x * y / (f + lam)).sum()
                elif variant == "unsigned":
                    expected = ((x * y).abs() / (f + lam)).sum()
                else:
                    fa_, fb_ = manual_slice(da, block, head), manual_slice(db, block, head)
                    expected = (x * y * (1 / (fa_ + lam) + 1 / (fb_ + lam)) / 2).sum()
                assert float(layer["scores"][row, head]) == pytest.approx(
                    float(expected) / f.numel(), rel=1e-10
                )
                assert float(layer["ridge"][row, head]) == pytest.approx(lam, rel=TOL)
                assert float(layer["fisher_median"][row, head]) == float(f.median())
                assert float(layer["fisher_min"][row, head]) == float(f.min())
                assert float(layer["frac_below_eps"][row, head]) == float(
                    (f < 1e-12).double().mean()
                )
        assert layer["slice_size"].tolist() == [36, 36, 36, 32]
    total = fm.qkov_interference(model, ga, gb, fa, aggregate="sum")["layers"][
        "transformer.h.0.attn"
    ]
    mean = fm.qkov_interference(model, ga, gb, fa)["layers"]["transformer.h.0.attn"]
    assert torch.allclose(
        total["scores"], mean["scores"] * torch.tensor([36, 36, 36, 32.0])[:, None], rtol=TOL
    )
    with pytest.warns(RuntimeWarning, match="no gradient for task B"):
        empty = fm.qkov_interference(model, ga, {}, fa)
    assert float(empty["layers"]["transformer.h.0.attn"]["scores"].abs().sum()) == 0.0
    assert torch.equal(empty["layers"]["transformer.h.0.attn"]["fisher_max"], mean["fisher_max"])


def test_qkov_gqa_kv_slices():
    model = tiny_llama()
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, 11, (2, 5), generator=generator)
        batches.append(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        )
    params = r"self_attn"
    fa = fm.DiagonalFisher.collect(model, batches[0], params=params)
    ga, _ = fm.task_gradient(model, batches[0], params=params)
    gb, _ = fm.task_gradient(model, batches[1], params=params)
    res = fm.qkov_interference(model, ga, gb, fa, rel_ridge=0.0, ridge=1e-6)
    layer = res["layers"]["model.layers.0.self_attn"]
    assert layer["scores"].shape == (4, 4)
    k = "model.layers.0.self_attn.k_proj.weight"
    for head in range(4):
        g = head // 2  # query head h reads kv head floor(h / (4 / 2))
        rows = slice(g * 4, (g + 1) * 4)
        f, x, y = fa.values[k][rows], ga[k][rows], gb[k][rows]
        expected = float((x * y / (f + 1e-6)).mean())
        assert float(layer["scores"][1, head]) == pytest.approx(expected, rel=1e-10)
    assert torch.equal(layer["scores"][1, 0], layer["scores"][1, 1])


def test_bad_arguments(mlp_fisher):
    model, batches, fd = mlp_fisher
    with pytest.raises(ValueError, match="sparsity must lie"):
        fm.pruning_masks(fd, 1.0)
    with pytest.raises(ValueError, match="structure must be one of"):
        fm.pruning_masks(fd, 0.5, structure="block")
    with pytest.raises(ValueError, match="scope must be one of"):
        fm.pruning_masks(fd, 0.5, scope="model")
    with pytest.raises(ValueError, match="model is required"):
        fm.pruning_masks(fd, 0.5, structure="channel")
    with pytest.raises(ValueError, match="no attention layer"):
        fm.pruning_masks(fd, 0.5, structure="head", model=model)
    with pytest.raises(TypeError, match="DiagonalFisher or GroupFisher"):
        fm.pruning_masks(torch.ones(3), 0.5)
    with pytest.raises(TypeError, match="power"):
        fm.scale_by_fisher({}, fd, power="1")
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="has no .grad"):
        fm.scale_by_fisher(model, fd)
    with pytest.raises(ValueError, match="structure must be one of"):
        fm.detect_conflicts(model, batches[0], batches[1], structure="neuron")
    with pytest.raises(ValueError, match="z_threshold"):
        fm.detect_conflicts(model, batches[0], batches[1], z_threshold=-1)
    gpt2, fa, fb, ga, gb = two_gpt2_tasks()
    with pytest.raises(ValueError, match="fisher_b is required"):
        fm.qkov_interference(gpt2, ga, gb, fa, fisher_pool="pooled")
    with pytest.raises(ValueError, match="variant must be one of"):
        fm.qkov_interference(gpt2, ga, gb, fa, variant="abs")
    with pytest.raises(ValueError, match="aggregate must be one of"):
        fm.qkov_interference(gpt2, ga, gb, fa, aggregate="max")
    with pytest.raises(ValueError, match="grad_a lacks"):
        fm.qkov_interference(gpt2, {"x": torch.ones(1)}, gb, fa)
    with pytest.raises(ValueError, match="no attention layer"):
        fm.qkov_interference(model, {}, {}, fd)
