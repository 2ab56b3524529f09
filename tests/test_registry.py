"""The layer registry (``kfac_optim.layers``) and state schema (``kfac_optim.state``) that
kfac_optim and fisher_metrics share.

References are written out here: the weight matrix ``W`` (o, d) of each layer kind is
checked against what the module computes (``y = W a``), and the factors read from a real
``KFACPreconditioner.state_dict()`` against A and G built from explicit activations and
output gradients of a two-layer network (bias-corrected EMA of two batches, decay 0.5).
Tolerances: exact for layouts, 1e-12 relative for float64 factors.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fisher_metrics as fm
import fisher_metrics.kfac
import fisher_metrics.operators
import kfac_optim
import kfac_optim.capture
from kfac_optim.layers import (
    IGNORE_INDEX,
    LAYER_KINDS,
    capture_for,
    is_causal_lm,
    is_supported,
    layer_kind,
    matrix_shape,
    parameters_from_matrix,
    weight_matrix,
)
from kfac_optim.state import LayerFactors, g_rows, preconditioner_state, read_factors
from tests.fm_reference import DTYPE, single_thread  # noqa: F401

TOL = dict(rtol=1e-12, atol=1e-14)


def hf_conv1d(d, o):
    from transformers.pytorch_utils import Conv1D

    return Conv1D(o, d)


def modules():
    """``{kind: module}``, each with o = 3 outputs."""
    torch.manual_seed(0)
    return {
        "linear": nn.Linear(4, 3),
        "conv1d": hf_conv1d(4, 3),
        "conv2d": nn.Conv2d(2, 3, (2, 3)),
        "nn_conv1d": nn.Conv1d(2, 3, 2),
        "embedding": nn.Embedding(5, 3),
    }


# ----------------------------------------------------------------------------- kinds


def test_layer_kind_of_each_module():
    for kind, module in modules().items():
        assert layer_kind(module) == kind
        assert is_supported(module)
        assert capture_for("m", module).kind == kind
    assert set(modules()) == set(LAYER_KINDS)
    for module in (nn.Conv3d(2, 3, 2), nn.LayerNorm(3), nn.Sequential(nn.Linear(2, 2))):
        assert layer_kind(module) is None and not is_supported(module)
        with pytest.raises(TypeError, match="not supported"):
            capture_for("m", module)
    # fisher_metrics re-exports the registry's names.
    assert fisher_metrics.kfac.LAYER_KINDS is LAYER_KINDS
    assert fisher_metrics.kfac.layer_kind is layer_kind


# ----------------------------------------------------------------------------- matrices


def independent_matrix(kind, weight, bias=None):
    """W (o, d [+1]) written out per kind, bias the last column."""
    if kind in ("conv1d", "embedding"):
        weight = weight.T
    elif kind in ("conv2d", "nn_conv1d"):
        weight = weight.reshape(weight.shape[0], -1)
    return weight if bias is None else torch.cat([weight, bias[:, None]], 1)


def module_output_from_matrix(kind, module, W):
    """``y = W a`` for one input row, with the module's own input (an im2col patch for the
    Conv2d, a one-hot id for the Embedding); returns (module output, W a)."""
    torch.manual_seed(1)
    ones = [1.0] if getattr(module, "bias", None) is not None else []
    if kind == "embedding":
        i = 2
        return module(torch.tensor([i]))[0], W @ F.one_hot(torch.tensor(i), 5).to(W)
    if kind == "conv2d":
        x = torch.randn(1, 2, 2, 3)  # one output position: the patch is the whole input
        return module(x).reshape(-1), W @ torch.cat([x.reshape(-1), torch.tensor(ones)])
    if kind == "nn_conv1d":
        x = torch.randn(1, 2, 2)  # one output position
        return module(x).reshape(-1), W @ torch.cat([x.reshape(-1), torch.tensor(ones)])
    x = torch.randn(4)
    return module(x[None])[0], W @ torch.cat([x, torch.tensor(ones)])


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_weight_matrix_convention_round_trips(kind):
    module = modules()[kind]
    bias = getattr(module, "bias", None)
    has_bias = bias is not None
    W = weight_matrix(kind, module.weight.detach(), None if bias is None else bias.detach())
    assert torch.equal(W, independent_matrix(kind, module.weight.detach(),
                                             None if bias is None else bias.detach()))
    assert matrix_shape(kind, module.weight.shape, has_bias) == tuple(W.shape)
    assert matrix_shape(kind, module.weight.shape) == (3, W.shape[1] - int(has_bias))
    with torch.no_grad():
        y, wa = module_output_from_matrix(kind, module, W)
    torch.testing.assert_close(y, wa, rtol=1e-6, atol=1e-6)
    weight, b = parameters_from_matrix(kind, W, module.weight.shape, has_bias)
    assert torch.equal(weight, module.weight.detach())
    assert (b is None) == (not has_bias) and (b is None or torch.equal(b, bias.detach()))

    # The capture view applies the same convention to .grad, both ways.
    for p in module.parameters():
        p.grad = torch.randn_like(p)
    cap = capture_for("m", module)
    grads = [None if p is None else p.grad for p in (module.weight, bias)]
    assert torch.equal(cap.grad_matrix(), weight_matrix(kind, *grads))
    assert (cap.out_features, cap.in_features) == tuple(W.shape)
    V = torch.randn(W.shape)
    cap.set_grad_matrix(V)
    weight, b = parameters_from_matrix(kind, V, module.weight.shape, has_bias)
    assert torch.equal(module.weight.grad, weight)
    assert b is None or torch.equal(module.bias.grad, b)

    with pytest.raises(ValueError, match="kind must be one of"):
        weight_matrix("conv3d", module.weight)


def test_kfac_fisher_matrix_views_are_the_registry_convention():
    from tests.test_fm_kfac import trained  # Embedding, Conv2d, Linear, HF Conv1D

    model, pre = trained("hybrid")
    rep = fm.KFACFisher.from_preconditioner(pre)
    assert rep.layers == ["emb", "conv", "fc", "head"]
    for name in rep.layers:
        module = model.get_submodule(name)
        tensors = {f"{name}.{k}": torch.randn_like(p) for k, p in module.named_parameters()}
        expected = independent_matrix(layer_kind(module), tensors[f"{name}.weight"],
                                      tensors.get(f"{name}.bias"))
        assert torch.equal(rep.to_matrix(name, tensors), expected)
        back = rep.from_matrix(name, expected)
        assert back.keys() == tensors.keys()
        assert all(torch.equal(back[k], tensors[k]) and back[k].is_contiguous() for k in back)
        assert rep.factors(name)["shape"] == tuple(expected.shape)
        assert rep.factors(name)["kind"] == layer_kind(module)
    pre.remove()


# ----------------------------------------------------------------------------- state


def mlp_batches():
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(5, 3, generator=gen, dtype=DTYPE),
             torch.randint(0, 6, (5,), generator=gen)) for _ in range(2)]


def explicit_rows(model, x, y):
    """Activations (with the bias 1) and output gradients of the summed cross-entropy,
    per layer, written out: fc2(tanh(fc1(x)))."""
    fc1, fc2 = model[0], model[2]
    with torch.no_grad():
        z = torch.tanh(x @ fc1.weight.T + fc1.bias)
        out = z @ fc2.weight.T + fc2.bias
        g2 = torch.softmax(out, 1) - F.one_hot(y, 6).to(out)
        g1 = (g2 @ fc2.weight) * (1 - z**2)
    one = torch.ones(x.shape[0], 1, dtype=x.dtype)
    return {"0": (torch.cat([x, one], 1), g1), "2": (torch.cat([z, one], 1), g2)}


@pytest.mark.parametrize("policy", ["eig", "woodbury"])
def test_read_factors_of_a_real_state(policy):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 6)).to(DTYPE)
    decay = 0.5
    pre = kfac_optim.KFACPreconditioner(model, kl_clip=None, factor_update_steps=1,
                                        factor_decay=decay, inverse_policy=policy)
    assert all(read_factors(e, n) is None for n, e in pre.state_dict()["layers"].items())
    batches = mlp_batches()
    rows = [explicit_rows(model, x, y) for x, y in batches]
    for x, y in batches:  # parameters stay as they are: no optimizer step
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
    state = pre.state_dict()
    for name in ("0", "2"):
        f = read_factors(state["layers"][name], name)
        assert isinstance(f, LayerFactors) and f.updates == 2 and f.rows is None
        (a1, g1), (a2, g2) = rows[0][name], rows[1][name]
        t = a1.shape[0]
        # Bias-corrected EMA of two batches: (decay F_1 + F_2) / (1 + decay).
        a_ref = (decay * a1.T @ a1 / t + a2.T @ a2 / t) / (1 + decay)
        g_ref = (decay * g1.T @ g1 / t + g2.T @ g2 / t) / (1 + decay)
        torch.testing.assert_close(f.a, a_ref, **TOL)
        if policy == "woodbury":
            assert f.low_rank and f.g is None
            # U: the batch blocks g^T / sqrt(N), stacked with EMA weights, bias-corrected.
            u_ref = torch.cat([math.sqrt(decay) * g1.T, g2.T], 1) / math.sqrt(t * (1 + decay))
            torch.testing.assert_close(f.u, u_ref, **TOL)
            torch.testing.assert_close(f.u @ f.u.T, g_ref, **TOL)
        else:
            assert not f.low_rank and f.u is None
            torch.testing.assert_close(f.g, g_ref, **TOL)
        f32 = read_factors(state["layers"][name], name, dtype=torch.float32)
        assert f32.a.dtype == torch.float32
        torch.testing.assert_close(f32.a, a_ref.float())
    pre.remove()


def test_state_unwrap_and_malformed_entries():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 6)).to(DTYPE)
    opt = kfac_optim.KFAC(model, lr=0.1, kl_clip=None, factor_update_steps=1,
                          inverse_policy="woodbury")
    x, y = mlp_batches()[0]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    full = opt.state_dict()
    state = preconditioner_state(full)
    assert state is full["kfac"] and preconditioner_state(state) is state
    with pytest.raises(TypeError, match="'layers'"):
        preconditioner_state({"steps": 1})
    with pytest.raises(TypeError, match="state_dict"):
        preconditioner_state([1])

    entry = state["layers"]["2"]
    assert g_rows(entry, "2") is None
    sharded = {**entry, "G": {**entry["G"], "cols": entry["G"]["cols"][:3], "rows": [0, 3]}}
    assert g_rows(sharded, "2") == (0, 3) and read_factors(sharded, "2").rows == (0, 3)
    with pytest.raises(TypeError, match="layer '2' must be a dict with 'A' and 'G'"):
        read_factors({"A": entry["A"]}, "2")
    with pytest.raises(TypeError, match="layer '2': a factor must be a dict"):
        read_factors({**entry, "A": None}, "2")
    with pytest.raises(TypeError, match="layer '2': factor 'cols' must be a float tensor"):
        read_factors({**entry, "G": {**entry["G"], "cols": [1.0]}}, "2")
    with pytest.raises(ValueError, match="layer '2': factor weight must be > 0"):
        read_factors({**entry, "A": {**entry["A"], "weight": 0.0}}, "2")


# ----------------------------------------------------------------------------- causal LMs


def test_ignore_index_and_is_causal_lm_are_shared():
    assert IGNORE_INDEX == -100
    assert kfac_optim.capture.IGNORE_INDEX is IGNORE_INDEX
    assert fisher_metrics.operators.IGNORE_INDEX is IGNORE_INDEX
    assert fisher_metrics.operators.is_causal_lm is is_causal_lm


def test_is_causal_lm():
    import transformers

    def bare(cls):  # the class is all is_causal_lm looks at
        return cls.__new__(cls)

    class LocalForCausalLM(nn.Module):
        pass

    class ModelWithLMHead(nn.Module):  # outside transformers: its mapping does not apply
        pass

    assert is_causal_lm(bare(transformers.GPT2LMHeadModel))
    assert is_causal_lm(bare(LocalForCausalLM))
    assert not is_causal_lm(bare(ModelWithLMHead)) and not is_causal_lm(nn.Linear(2, 2))
    # Causal LMs by transformers' auto mapping only (no ForCausalLM / LMHeadModel suffix).
    for name in ("ReformerModelWithLMHead", "BertGenerationDecoder"):
        assert is_causal_lm(bare(getattr(transformers, name)))
    assert not is_causal_lm(bare(transformers.BertForSequenceClassification))


def test_causal_lm_without_the_suffix_counts_the_same_rows_in_both_packages():
    """BertGenerationDecoder shifts its labels (by transformers' causal-LM mapping, not by
    its name): K-FAC's N and fisher_metrics' rows are both the shifted valid labels."""
    from transformers import BertGenerationConfig, BertGenerationDecoder

    torch.manual_seed(0)
    config = BertGenerationConfig(vocab_size=13, hidden_size=8, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=16,
                                  max_position_embeddings=16, is_decoder=True)
    model = BertGenerationDecoder(config)
    assert not type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    ids = torch.randint(0, 13, (2, 6), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, 3] = labels[1, 5] = IGNORE_INDEX
    shifted = int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert shifted == 8 != int((labels != IGNORE_INDEX).sum())

    out = model(input_ids=ids, labels=labels)  # the model's own loss shifts
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, 13), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ce)

    pre = kfac_optim.KFACPreconditioner(model, kl_clip=None, factor_update_steps=1)
    model.train()
    model(input_ids=ids, labels=labels).loss.backward()
    assert int(pre._capture._ctx.num_loss_rows) == shifted
    pre.remove()
    op = fm.make_operator(model, [{"input_ids": ids, "labels": labels}], "ggn")
    assert op.num_rows == shifted
