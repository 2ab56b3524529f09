"""Issue 11: attention layers.

K-FAC: ``nn.MultiheadAttention`` uses ``in_proj_weight`` and ``out_proj.weight`` inside
``F.multi_head_attention_forward``, so no hook sees its projections: it is refused at
construction (naming the layer and ``skip_layers``) and, skipped or frozen, ``out_proj`` is
not listed as captured. A layer whose weight gets gradients while its forward never runs is
refused at ``step()``.

fisher_metrics: the GGN, empirical and Monte-Carlo Fisher products on stock attention
modules (the eval-mode fast path has no forward-mode AD), against the dense float64
references of ``tests.fm_reference`` (explicit ``jacrev`` Jacobians and output Hessians).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisher_metrics.operators import make_operator
from kfac_optim import KFACPreconditioner
from tests.fm_reference import DTYPE, Problem, single_thread  # noqa: F401

E, HEADS, CLASSES = 4, 2, 3


class Encoder(nn.Module):
    """A tiny ``nn.TransformerEncoderLayer`` (batch first: the fast path) and a linear head."""

    def __init__(self, norm_first: bool = False):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(E, HEADS, dim_feedforward=6, dropout=0.0,
                                              batch_first=True, norm_first=norm_first)
        self.head = nn.Linear(E, CLASSES)

    def forward(self, x):
        return self.head(self.enc(x))


class Attention(nn.Module):
    """Causal self-attention through a bare ``nn.MultiheadAttention`` (no weights returned)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, E)
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.head = nn.Linear(E, CLASSES)

    def forward(self, x):
        h = self.embed(x)
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
        out, _ = self.attn(h, h, h, attn_mask=mask, need_weights=False)
        return self.head(out)


def _batch(model: nn.Module, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    features = 3 if isinstance(model, Attention) else E
    x = torch.randn(2, 5, features, generator=generator, dtype=model.head.weight.dtype)
    y = torch.randint(0, CLASSES, (2, 5), generator=generator)
    return x, y


# --------------------------------------------------------------------------- K-FAC


@pytest.mark.parametrize("make", [Attention, Encoder], ids=["mha", "encoder_layer"])
def test_attention_refused_at_construction_naming_layer(make):
    torch.manual_seed(0)
    model = make()
    name = "attn" if make is Attention else "enc.self_attn"
    with pytest.raises(ValueError, match=rf"layer '{name}'.*MultiheadAttention.*"
                                         r"skip_layers=\(nn.MultiheadAttention,\)"):
        KFACPreconditioner(model, lr=0.1)
    model.requires_grad_(False)  # frozen: nothing to refuse, out_proj not listed
    assert KFACPreconditioner(model, lr=0.1).layer_names == []


@pytest.mark.parametrize("skip", [nn.MultiheadAttention, r"self_attn$"], ids=["type", "name"])
def test_skipped_attention_is_not_listed_and_keeps_base_gradient(skip):
    torch.manual_seed(0)
    model = Encoder()
    pre = KFACPreconditioner(model, lr=0.1, damping=0.1, skip_layers=(skip,))
    listed = [row["layer"] for row in pre.describe()]
    assert listed == pre.layer_names == ["enc.linear1", "enc.linear2", "head"]
    x, y = _batch(model)
    F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    attn = [p for p in model.enc.self_attn.parameters() if p.grad is not None]
    before = [p.grad.clone() for p in attn]
    head = model.head.weight.grad.clone()
    pre.step()
    assert len(attn) == 4
    for p, g in zip(attn, before, strict=True):
        assert torch.equal(p.grad, g)
    assert not torch.allclose(model.head.weight.grad, head)
    assert all(row["factor_updates"] == 1 for row in pre.describe())


class Functional(nn.Module):
    """``proj`` is an ``nn.Linear`` whose weight the forward uses directly."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.proj = nn.Linear(4, 2)
        self.unused = nn.Linear(4, 2)

    def forward(self, x):
        return F.linear(torch.tanh(self.inp(x)), self.proj.weight, self.proj.bias)


def test_layer_whose_forward_never_runs_is_refused_at_step():
    torch.manual_seed(0)
    model = Functional()
    x = torch.randn(5, 3)
    model(x).square().sum().backward()
    pre = KFACPreconditioner(model, lr=0.1)
    pre.step()  # gradients from before construction, no forward since: nothing to judge
    model.zero_grad()
    model(x).square().sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    with pytest.raises(RuntimeError, match=r"\['proj'\].*never ran.*skip_layers"):
        pre.step()
    for name, p in model.named_parameters():  # nothing was touched
        assert torch.equal(p.grad, grads[name]) if name in grads else p.grad is None
    pre.remove()
    ok = KFACPreconditioner(model, lr=0.1, skip_layers=("proj",))
    model.zero_grad()
    model(x).square().sum().backward()
    ok.step()  # 'unused' has no gradient: not refused
    assert ok.layer_names == ["inp", "unused"]


# --------------------------------------------------------------------------- fisher_metrics


CASES = {"encoder": Encoder, "encoder_norm_first": lambda: Encoder(norm_first=True),
         "mha_causal": Attention}


@pytest.mark.parametrize("curvature", ["ggn", "empirical_fisher", "fisher_mc"])
@pytest.mark.parametrize("case", list(CASES))
def test_curvature_products_on_attention_match_dense_reference(case, curvature):
    torch.manual_seed(0)
    model = CASES[case]().to(DTYPE)
    batch = _batch(model)
    names = [name for name, _ in model.named_parameters()]
    op = make_operator(model, [batch], curvature, mc_samples=2, seed=3)
    assert model.training and torch.backends.mha.get_fastpath_enabled()  # restored
    # the reference runs in training mode (dropout 0): never the fast path
    dense = Problem(model, names, [batch], "ce").dense(curvature, op)
    got = op.to_dense()
    assert float((got - dense).norm() / dense.norm()) < 1e-8
    torch.testing.assert_close(got, dense, rtol=1e-8, atol=1e-12)
