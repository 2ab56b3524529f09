"""DiagonalFisher / GroupFisher vs dense float64 references (tests/fm_reference.py).

References: the diagonals of the dense empirical Fisher, GGN and sampled Fisher
built with ``torch.func.jacrev`` in ``fm_reference.Problem``; group values as
sums of the dense diagonal over hand-written slices; EMA and Welford statistics
computed directly from the dense per-row gradient matrix. Tolerances: exact
paths to 1e-12 relative (float64 round-off); the Monte-Carlo Fisher within 5
standard errors of the GGN diagonal per entry.
"""

import math
import warnings

import pytest
import torch
from torch import nn
from torch.func import jacrev

import fisher_metrics as fm
from tests.fm_reference import (
    DTYPE,
    GPT2_NAMES,
    Problem,
    gpt2_problem,
    mlp,
    mlp_batches,
    mlp_problem,
    relative_error,
    single_thread,  # noqa: F401
    tiny_llama,
)

TOL = 1e-12
REFERENCE = {"empirical": "empirical_fisher", "ggn": "ggn"}


def flat(rep):
    return rep.flatten(rep.diagonal())


@pytest.mark.parametrize("per_sample", ["vmap", "rows"])
@pytest.mark.parametrize("fisher", ["empirical", "ggn"])
@pytest.mark.parametrize("kind", ["ce", "mse"])
def test_mlp_diagonal_matches_dense(kind, fisher, per_sample):
    model, batches, problem = mlp_problem(kind)
    fd = fm.DiagonalFisher.collect(model, batches, fisher, per_sample=per_sample)
    dense = problem.dense(REFERENCE[fisher])
    assert relative_error(flat(fd), dense.diagonal()) <= TOL
    assert fd.num_rows == 10 and fd.num_samples == 10 and fd.fisher_type == fisher
    assert fd.trace() == pytest.approx(float(dense.trace()), rel=TOL)
    assert fd.layers == ["0", "2"] and fd.layer_params["0"] == ["0.weight", "0.bias"]


@pytest.mark.parametrize("kind", ["ce", "mse"])
def test_mc_diagonal_is_the_sampled_fisher_and_within_sampling_error(kind):
    model, batches, problem = mlp_problem(kind)
    op = fm.make_operator(model, batches, "fisher_mc", mc_samples=3, seed=5)
    for per_sample in ("vmap", "rows"):
        fd = fm.DiagonalFisher.collect(
            model, batches, "mc", mc_samples=3, seed=5, per_sample=per_sample
        )
        assert relative_error(flat(fd), problem.fisher_mc(op.sampled_targets).diagonal()) <= TOL
    # Many samples: within 5 standard errors (Welford) of the exact GGN diagonal, entry by entry.
    fd = fm.DiagonalFisher.collect(model, batches, "mc", mc_samples=400, seed=1, mode="welford")
    ggn = problem.ggn().diagonal()
    stderr = fd.flatten(fd.stderr())
    assert bool(((flat(fd) - ggn).abs() <= 5 * stderr + 1e-12).all())
    assert relative_error(flat(fd), ggn) < 0.1


@pytest.mark.parametrize("fisher", ["empirical", "ggn"])
def test_gpt2_tokens_with_padding_match_dense(fisher):
    model, batch, problem = gpt2_problem(GPT2_NAMES)
    fd = fm.DiagonalFisher.collect(model, batch, fisher, params=GPT2_NAMES)
    assert fd.param_names == GPT2_NAMES and fd.num_rows == 5  # 2 x 3 shifted tokens, one masked
    assert relative_error(flat(fd), problem.dense(REFERENCE[fisher]).diagonal()) <= TOL
    with pytest.raises(ValueError, match="per_sample='vmap'"):
        fm.DiagonalFisher.collect(model, batch, params=GPT2_NAMES, per_sample="vmap")


class TinySeq(nn.Module):
    """ids (N, T) -> Embedding(7, 4) -> tanh -> Linear(4, 5): per-token logits (N, T, 5)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.out = nn.Linear(4, 5)

    def forward(self, ids):
        return self.out(torch.tanh(self.emb(ids)))


def seq_data(seed=0):
    torch.manual_seed(seed)
    model = TinySeq().to(DTYPE)
    generator = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, 7, (3, 4), generator=generator)
    labels = torch.randint(0, 5, (3, 4), generator=generator)
    labels[1, 2:] = -100
    labels[2] = -100  # a sample without any valid token
    return model, (ids, labels)


def test_token_rows_vmap_equals_rows_equals_dense():
    model, batch = seq_data()
    names = [n for n, _ in model.named_parameters()]
    problem = Problem(model, names, [batch], "ce")
    for fisher in ("empirical", "ggn", "mc"):
        results = [
            fm.DiagonalFisher.collect(model, batch, fisher, per_sample=p, mc_samples=2, seed=3)
            for p in ("vmap", "rows")
        ]
        assert results[0].num_rows == 6 and results[0].num_samples == 3
        assert relative_error(flat(results[0]), flat(results[1])) <= TOL
        if fisher != "mc":
            assert (
                relative_error(flat(results[0]), problem.dense(REFERENCE[fisher]).diagonal()) <= TOL
            )
    shifted = [
        fm.DiagonalFisher.collect(model, batch, shift_labels=True, per_sample=p)
        for p in ("vmap", "rows")
    ]
    assert shifted[0].num_rows == 4
    assert relative_error(flat(shifted[0]), flat(shifted[1])) <= TOL


def per_row_squares(problem):
    """Dense ``(R, n)`` matrix of per-row squared gradients."""
    return jacrev(problem.row_losses)(problem.theta).square()


def test_ema_welford_oneshot_vs_direct():
    model = mlp()
    batches = mlp_batches("ce", sizes=(3, 5, 4))
    names = [n for n, _ in model.named_parameters()]
    squares = [per_row_squares(Problem(model, names, [b], "ce")) for b in batches]
    decay = 0.8
    collectors = {
        mode: fm.DiagonalFisherCollector(model, mode=mode, decay=decay)
        for mode in ("oneshot", "ema", "welford")
    }
    for b in batches:
        for c in collectors.values():
            assert c.update(b, task="a") == b[1].numel()
    batch_means = [s.mean(dim=0) for s in squares]
    weights = [(1 - decay) * decay ** (len(batches) - 1 - t) for t in range(len(batches))]
    ema = sum(w * m for w, m in zip(weights, batch_means, strict=True)) / (
        1 - decay ** len(batches)
    )
    rows = torch.cat(squares)
    ema_fisher = collectors["ema"].fisher("a")
    assert ema_fisher.steps == 3 and ema_fisher.mode == "ema"
    assert relative_error(flat(ema_fisher), ema) <= TOL
    assert relative_error(flat(collectors["oneshot"].fisher("a")), rows.mean(dim=0)) <= TOL
    welford = collectors["welford"].fisher("a")
    assert relative_error(flat(welford), rows.mean(dim=0)) <= TOL
    assert relative_error(welford.flatten(welford.variance), rows.var(dim=0)) <= 1e-10
    stderr = (rows.var(dim=0) / rows.shape[0]).sqrt()
    assert relative_error(welford.flatten(welford.stderr()), stderr) <= 1e-10
    # collect(mode="ema") treats each batch as one step
    direct = fm.DiagonalFisher.collect(model, batches, mode="ema", decay=decay)
    assert relative_error(flat(direct), ema) <= TOL
    # one Fisher per task key
    collectors["oneshot"].update(batches[0], task="b")
    assert collectors["oneshot"].tasks == ["a", "b"]
    assert relative_error(flat(collectors["oneshot"].fisher("b")), batch_means[0]) <= TOL


def test_storage_dtype_and_device():
    model = mlp().float()
    batches = [(x.float(), y) for x, y in mlp_batches("ce")]
    exact = fm.DiagonalFisher.collect(model, batches)
    assert exact.storage_dtype == torch.float32 and exact.dtype == torch.float32
    half = fm.DiagonalFisher.collect(
        model, batches, mode="ema", storage_dtype=torch.float16, storage_device="cpu"
    )
    assert all(v.dtype == torch.float16 for v in half.values.values())
    assert half.dtype == torch.float32 and half.device == torch.device("cpu")
    out = half.mvp({n: torch.ones_like(p) for n, p in model.named_parameters()})
    assert out["0.weight"].dtype == torch.float32
    bf16 = fm.DiagonalFisher.collect(model, batches, storage_dtype=torch.bfloat16)
    assert relative_error(flat(bf16), flat(exact)) < 1e-2
    assert flat(exact.to(dtype=torch.float64)).dtype == torch.float64


def test_contributions_nested_by_task_then_sample_and_empty_task():
    model, batch = seq_data()
    collector = fm.DiagonalFisherCollector(model, keep_contributions=True)
    collector.update(batch, task="a")
    collector.update(batch, task="a")
    contributions = collector.contributions
    assert list(contributions) == ["a"]
    assert list(contributions["a"]) == [f"a_{i}" for i in range(6)]
    assert list(contributions["a"]["a_0"]) == ["emb.weight", "out.weight", "out.bias"]
    assert collector.contribution_rows["a"]["a_2"] == 0  # no valid token: zero contribution
    assert all(float(v.abs().sum()) == 0 for v in contributions["a"]["a_2"].values())
    from_contributions = collector.fisher_from_contributions("a")
    assert relative_error(flat(from_contributions), flat(collector.fisher("a"))) <= TOL
    names = [n for n, _ in model.named_parameters()]
    problem = Problem(model, names, [batch], "ce")
    rows = per_row_squares(problem)
    sample_rows = {0: [0, 1, 2, 3], 1: [4, 5]}
    for i, index in sample_rows.items():
        stored = torch.cat([contributions["a"][f"a_{i}"][n].reshape(-1) for n in names])
        assert relative_error(stored, rows[index].sum(dim=0)) <= TOL
    # An empty task: zeros with a warning, never a mean over nothing.
    ids, labels = batch
    empty = (ids, torch.full_like(labels, -100))
    with pytest.warns(RuntimeWarning, match="no valid row"):
        assert collector.update(empty, task="empty") == 0
    with pytest.warns(RuntimeWarning, match="no valid row"):
        zeros = collector.fisher("empty")
    assert float(flat(zeros).abs().sum()) == 0.0 and zeros.num_rows == 0
    with pytest.warns(RuntimeWarning, match="no stored contribution"):
        assert float(flat(collector.fisher_from_contributions("empty")).abs().sum()) == 0.0
    with pytest.warns(RuntimeWarning, match="no stored contribution"):
        collector.fisher_from_contributions("never-seen")
    with pytest.warns(RuntimeWarning, match="no valid row"):
        fm.DiagonalFisher.collect(model, empty)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        collector.fisher("a")


# --------------------------------------------------------------------------- groups


def test_gpt2_group_sums_match_dense_diagonal():
    names = [
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_attn.bias",
        "transformer.h.0.attn.c_proj.weight",
        "transformer.h.0.mlp.c_fc.weight",
    ]
    model, batch, problem = gpt2_problem(names)
    diag = problem.split(problem.empirical_fisher().diagonal().detach())
    gf = fm.DiagonalFisher.collect(model, batch, params=names).groups(model)
    H, hd, d = 2, 4, 8
    w = diag["transformer.h.0.attn.c_attn.weight"]  # Conv1D (d, 3 d): columns [q | k | v]
    expected = torch.tensor(
        [
            [float(w[:, j * d + h * hd : j * d + (h + 1) * hd].sum()) for h in range(H)]
            for j in range(3)
        ],
        dtype=DTYPE,
    )
    assert torch.allclose(gf.values["transformer.h.0.attn.c_attn.weight|head"], expected, rtol=TOL)
    b = diag["transformer.h.0.attn.c_attn.bias"]
    assert torch.allclose(
        gf.values["transformer.h.0.attn.c_attn.bias|head"], b.reshape(3, H, hd).sum(-1), rtol=TOL
    )
    o = diag["transformer.h.0.attn.c_proj.weight"]  # Conv1D (d_in = H hd, d): head h owns rows
    expected_o = torch.stack([o[h * hd : (h + 1) * hd].sum() for h in range(H)])
    assert torch.allclose(
        gf.values["transformer.h.0.attn.c_proj.weight|head"], expected_o, rtol=TOL
    )
    fc = diag["transformer.h.0.mlp.c_fc.weight"]  # Conv1D (8, 32): channel = column
    assert torch.allclose(gf.values["transformer.h.0.mlp.c_fc.weight|channel"], fc.sum(0), rtol=TOL)
    assert gf.trace() == pytest.approx(float(sum(v.sum() for v in diag.values())), rel=TOL)
    spec = gf.attention[0]
    assert (spec.name, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (
        "transformer.h.0.attn",
        2,
        2,
        4,
    )
    importance = gf.head_importance()["transformer.h.0.attn"]
    assert torch.allclose(
        importance, expected.sum(0) + b.reshape(3, H, hd).sum(-1).sum(0) + expected_o, rtol=TOL
    )
    top = gf.top_groups(2, kind="channel")
    column = int(fc.sum(0).argmax())
    assert top[0].key == "transformer.h.0.mlp.c_fc.weight|channel" and top[0].index == (column,)
    assert top[0].value == pytest.approx(float(fc.sum(0).max()), rel=TOL)
    assert gf.top_heads(1)[0].key == "transformer.h.0.attn|head"
    # As a representation: every entry carries its group mean.
    delta = {n: torch.randn_like(v) for n, v in diag.items()}
    means = {
        "transformer.h.0.attn.c_attn.weight": (expected / (d * hd))
        .repeat_interleave(hd, 1)
        .reshape(1, -1),
        "transformer.h.0.attn.c_attn.bias": b.reshape(3, H, hd)
        .mean(-1)
        .repeat_interleave(hd, 1)
        .reshape(-1),
        "transformer.h.0.attn.c_proj.weight": (expected_o / (hd * d)).repeat_interleave(hd)[
            :, None
        ],
        "transformer.h.0.mlp.c_fc.weight": fc.mean(0, keepdim=True),
    }
    quad = sum(float((means[n] * delta[n].square()).sum()) for n in names)
    assert gf.quadratic_form(delta) == pytest.approx(quad, rel=TOL)


def tiny_models():
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    llama = tiny_llama()  # torch.manual_seed(0) first: bert and t5 draw after it
    bert = BertForMaskedLM(
        BertConfig(
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            vocab_size=11,
            max_position_embeddings=16,
        )
    )
    t5 = T5ForConditionalGeneration(
        T5Config(num_heads=3, d_kv=4, d_model=8, d_ff=16, num_layers=1, vocab_size=11)
    )
    return llama, bert, t5


def test_bert_t5_head_groups_are_slice_sums():
    _, bert, t5 = tiny_models()
    for model, q, o, heads, hd in (
        (
            bert,
            "bert.encoder.layer.0.attention.self.query",
            "bert.encoder.layer.0.attention.output.dense",
            2,
            4,
        ),
        (
            t5,
            "encoder.block.0.layer.0.SelfAttention.q",
            "encoder.block.0.layer.0.SelfAttention.o",
            3,
            4,
        ),
    ):
        values = {n: torch.rand(p.shape, dtype=torch.float64) for n, p in model.named_parameters()}
        gf = fm.DiagonalFisher(values, model=model).groups(model)
        wq, wo = values[f"{q}.weight"], values[f"{o}.weight"]  # Linear (H hd, d) and (d, H hd)
        expected_q = torch.stack([wq[h * hd : (h + 1) * hd].sum() for h in range(heads)])
        expected_o = torch.stack([wo[:, h * hd : (h + 1) * hd].sum() for h in range(heads)])
        assert torch.allclose(gf.values[f"{q}.weight|head"], expected_q, rtol=TOL)
        assert torch.allclose(gf.values[f"{o}.weight|head"], expected_o, rtol=TOL)
        assert gf.trace() == pytest.approx(sum(float(v.sum()) for v in values.values()), rel=TOL)
    assert [s.name for s in gf.attention] == [
        "encoder.block.0.layer.0.SelfAttention",
        "decoder.block.0.layer.0.SelfAttention",
        "decoder.block.0.layer.1.EncDecAttention",
    ]


def test_llama_gqa_head_mapping():
    llama, _, _ = tiny_models()
    (spec,) = fm.attention_layers(llama)
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim) == (4, 2, 4)
    assert [spec.kv_head(h) for h in range(4)] == [0, 0, 1, 1]
    assert [spec.block_head("K", h) for h in range(4)] == [0, 0, 1, 1]
    assert [fm.gqa_kv_head(h, 8, 2) for h in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    # A real diagonal Fisher of the GQA model (token rows of a causal LM batch).
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 11, (2, 5), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    fd = fm.DiagonalFisher.collect(llama, batch, params=r"self_attn")
    gf = fd.groups(llama)
    prefix = "model.layers.0.self_attn"
    d = {n.rpartition(".")[0].rpartition(".")[2]: v.double() for n, v in fd.diagonal().items()}
    q = torch.stack([d["q_proj"][h * 4 : (h + 1) * 4].sum() for h in range(4)])
    k = torch.stack([d["k_proj"][g * 4 : (g + 1) * 4].sum() for g in range(2)])
    v = torch.stack([d["v_proj"][g * 4 : (g + 1) * 4].sum() for g in range(2)])
    o = torch.stack([d["o_proj"][:, h * 4 : (h + 1) * 4].sum() for h in range(4)])
    assert gf.values[f"{prefix}.k_proj.weight|head"].shape == (2,)
    assert torch.allclose(gf.values[f"{prefix}.k_proj.weight|head"], k, rtol=1e-12)
    kv = torch.tensor([0, 0, 1, 1])
    expected = q + o + (k[kv] + v[kv]) / 2
    importance = gf.head_importance()[prefix]
    assert torch.allclose(importance, expected, rtol=1e-12)
    assert float(importance.sum()) == pytest.approx(fd.trace(), rel=1e-12)


def test_bad_arguments():
    model, batches, _ = mlp_problem("ce")
    with pytest.raises(ValueError, match="fisher must be one of"):
        fm.DiagonalFisher.collect(model, batches, "hessian")
    with pytest.raises(ValueError, match="mode must be one of"):
        fm.DiagonalFisherCollector(model, mode="sum")
    with pytest.raises(ValueError, match="decay must lie in"):
        fm.DiagonalFisherCollector(model, decay=1.0)
    with pytest.raises(ValueError, match="per_sample must be one of"):
        fm.DiagonalFisherCollector(model, per_sample="loop")
    with pytest.raises(ValueError, match="storage_dtype"):
        fm.DiagonalFisherCollector(model, storage_dtype=torch.int32)
    with pytest.raises(TypeError, match="keep_contributions"):
        fm.DiagonalFisherCollector(model, keep_contributions=1)
    with pytest.raises(ValueError, match="fisher='ggn' needs loss_fn"):
        fm.DiagonalFisherCollector(model, fisher="ggn", loss_fn=lambda out, y: out.sum(-1))
    with pytest.raises(TypeError, match="model must be"):
        fm.DiagonalFisherCollector("model")
    collector = fm.DiagonalFisherCollector(model)
    with pytest.raises(TypeError, match="task must be a string"):
        collector.update(batches, task=3)
    with pytest.raises(ValueError, match="task must be one of the tasks"):
        collector.fisher("nope")
    with pytest.raises(ValueError, match="keep_contributions=True"):
        collector.fisher_from_contributions("nope")
    fd = fm.DiagonalFisher.collect(model, batches)
    with pytest.raises(ValueError, match="stderr needs"):
        fd.stderr()
    with pytest.raises(ValueError, match="not a parameter of model"):
        fm.DiagonalFisher({"x.weight": torch.ones(2)}, model=model)
    gf = fd.groups(model)
    with pytest.raises(ValueError, match="kind must be one of"):
        gf.top_groups(1, kind="neuron")
    with pytest.raises(ValueError, match="normalize must be one of"):
        gf.top_groups(1, normalize="max")
    with pytest.raises(ValueError, match="key must be one of"):
        gf.top_groups(1, key="nope")
    with pytest.raises(ValueError, match="no attention layer"):
        gf.top_heads(1)
    with pytest.raises(ValueError, match="num_kv_heads must divide"):
        fm.gqa_kv_head(0, 4, 3)
    with pytest.raises(ValueError, match="head must lie in"):
        fm.gqa_kv_head(4, 4, 2)
    with pytest.raises(TypeError, match="DiagonalFisher or GroupFisher"):
        fm.GroupFisher.from_diagonal({"0.weight": torch.ones(5, 6)}, model)
    assert math.isclose(
        gf.top_groups(1, normalize="mean")[0].value,
        max(
            float(v.max()) / fd_g.size
            for v, fd_g in zip(gf.values.values(), gf.groupings.values(), strict=True)
        ),
    )
