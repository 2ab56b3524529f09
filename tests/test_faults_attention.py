"""Issue 11: attention layers.

K-FAC: ``nn.MultiheadAttention`` uses ``in_proj_weight`` and ``out_proj.weight`` inside
``F.multi_head_attention_forward``, so no hook saw its projections. K-FAC now runs its forward
through hooked projections (equal to the stock forward) and preconditions the q, k, v blocks
and ``out_proj``, tested against a written-out attention and explicit Kronecker solves;
skipped, ``out_proj`` is not listed. A layer whose weight gets gradients while its forward
never runs is refused at ``step()``.

fisher_metrics: the GGN, empirical and Monte-Carlo Fisher products on stock attention
modules (the eval-mode fast path has no forward-mode AD), against the dense float64
references of ``tests.fm_reference`` (explicit ``jacrev`` Jacobians and output Hessians).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisher_metrics import KFACFisher
from fisher_metrics.operators import make_operator
from kfac_optim import KFACPreconditioner
from tests.fm_reference import DTYPE, Problem, single_thread  # noqa: F401
from tests.kfac_reference import kron_exact, kron_factored

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

DAMPING = 3e-2


def _reference_attention(attn: nn.MultiheadAttention, x, mask, probes=None):
    """Causal batch-first self-attention written out (no torch attention code): returns the
    output, the out-projection input and the q, k, v, out projections (``+ probes``)."""
    e, h = attn.embed_dim, attn.num_heads
    w, b = attn.in_proj_weight, attn.in_proj_bias
    proj = [x @ w[i * e:(i + 1) * e].T + b[i * e:(i + 1) * e] for i in range(3)]
    if probes is not None:
        proj = [p + z for p, z in zip(proj, probes[:3], strict=True)]
    q, k, v = (p.reshape(*p.shape[:2], h, e // h).transpose(1, 2) for p in proj)
    scores = q @ k.transpose(-1, -2) / (e // h) ** 0.5
    scores = scores.masked_fill(mask, float("-inf"))
    ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
    out = ctx @ attn.out_proj.weight.T + attn.out_proj.bias
    if probes is not None:
        out = out + probes[3]
    return out, ctx, proj


@pytest.mark.parametrize("damping_mode", ["exact", "factored"])
def test_attention_projections_match_dense_kfac_reference(damping_mode):
    """q, k, v blocks of in_proj and out_proj: A, G and the preconditioned gradients equal
    an explicit Kronecker solve on factors built from a written-out attention."""
    torch.manual_seed(0)
    model = Attention().to(DTYPE)
    x, y = _batch(model)
    mask = torch.ones(5, 5, dtype=torch.bool).triu(1)
    h = model.embed(x).detach()
    attn = model.attn
    with torch.no_grad():
        stock = attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        torch.testing.assert_close(_reference_attention(attn, h, mask)[0], stock,
                                   rtol=1e-12, atol=1e-12)
    probes = [torch.zeros(2, 5, E, dtype=DTYPE, requires_grad=True) for _ in range(4)]
    out, ctx, _ = _reference_attention(attn, h, mask, probes)
    loss = F.cross_entropy(model.head(out).flatten(0, 1), y.flatten(), reduction="sum")
    grads = torch.autograd.grad(loss, probes)
    rows = 10  # one loss term per token: T = N
    ones = torch.ones(rows, 1, dtype=DTYPE)
    a_in = torch.cat([h.reshape(rows, E), ones], 1)
    a_out = torch.cat([ctx.detach().reshape(rows, E), ones], 1)
    expected = {f"attn.{n}_proj": (a, g.reshape(rows, E).T @ g.reshape(rows, E) / rows)
                for n, a, g in zip("qkvo", [a_in] * 3 + [a_out], grads, strict=True)}
    expected = {n.replace("o_proj", "out_proj"): (a.T @ a / rows, gg)
                for n, (a, gg) in expected.items()}

    pre = KFACPreconditioner(model, lr=0.1, damping=DAMPING, damping_mode=damping_mode,
                             kl_clip=None)
    assert pre.layer_names == ["embed", "attn.q_proj", "attn.k_proj", "attn.v_proj",
                               "attn.out_proj", "head"]
    assert [row["layer"] for row in pre.describe()] == pre.layer_names
    assert pre.layers["attn.q_proj"].kind == "linear"
    assert pre.layers["attn.q_proj"].shape == (E, E + 1)
    F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    w, b = attn.in_proj_weight.grad.clone(), attn.in_proj_bias.grad.clone()
    v = {f"attn.{n}_proj": torch.cat([w[i * E:(i + 1) * E], b[i * E:(i + 1) * E, None]], 1)
         for i, n in enumerate("qkv")}
    v["attn.out_proj"] = torch.cat([attn.out_proj.weight.grad, attn.out_proj.bias.grad[:, None]],
                                   1)
    pre.step()
    solve = kron_exact if damping_mode == "exact" else kron_factored
    got = {f"attn.{n}_proj": torch.cat([attn.in_proj_weight.grad[i * E:(i + 1) * E],
                                        attn.in_proj_bias.grad[i * E:(i + 1) * E, None]], 1)
           for i, n in enumerate("qkv")}
    got["attn.out_proj"] = torch.cat([attn.out_proj.weight.grad,
                                      attn.out_proj.bias.grad[:, None]], 1)
    for name, (a, gg) in expected.items():
        view = pre.layers[name]
        torch.testing.assert_close(view.A, a, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(view.G, gg, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got[name], solve(v[name], a, gg, DAMPING), rtol=1e-7,
                                   atol=1e-9)
    pre.remove()
    assert "forward" not in attn.__dict__


def _mha_call(attn, x, kv, batch_first, need_weights, masks):
    t = (lambda z: z) if batch_first else (lambda z: z.transpose(0, 1))
    q = t(x)
    k = v = q if kv is None else t(kv)
    attn.zero_grad()
    out, weights = attn(q, k, v, need_weights=need_weights, **masks)
    (out.sin().sum() + (0 if weights is None else weights.cos().sum())).backward()
    return out.detach(), weights, [p.grad.clone() for p in attn.parameters()]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("variant", ["self", "kdim_vdim", "bias_kv_no_bias", "masks"])
def test_attention_forward_under_kfac_equals_stock(batch_first, need_weights, variant):
    torch.manual_seed(0)
    kw = {"kdim_vdim": dict(kdim=3, vdim=3), "bias_kv_no_bias": dict(add_bias_kv=True,
                                                                      bias=False)}
    attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, **kw.get(variant, {}))
    attn = attn.to(DTYPE)
    x = torch.randn(2, 5, E, dtype=DTYPE)
    kv = torch.randn(2, 6, 3, dtype=DTYPE) if variant == "kdim_vdim" else None
    masks = {}
    if variant == "masks":
        padding = torch.zeros(2, 5, dtype=torch.bool)
        padding[0, -2:] = True
        masks = dict(attn_mask=torch.ones(5, 5, dtype=torch.bool).triu(1),
                     key_padding_mask=padding)
    stock = _mha_call(attn, x, kv, batch_first, need_weights, masks)
    pre = KFACPreconditioner(attn, lr=0.1)
    assert pre.layer_names == (["q_proj", "k_proj", "v_proj", "out_proj"])
    patched = _mha_call(attn, x, kv, batch_first, need_weights, masks)
    assert all(row["factor_updates"] == 0 for row in pre.describe())
    pre.step()
    assert all(row["factor_updates"] == 1 for row in pre.describe())
    for a, b in zip(stock[:2] + tuple(stock[2]), patched[:2] + tuple(patched[2]), strict=True):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-13)
    with torch.no_grad():  # without grad the stock forward runs
        if kv is None:
            assert torch.equal(attn(x, x, x)[0], type(attn).forward(attn, x, x, x)[0])


@pytest.mark.parametrize("skip", [nn.MultiheadAttention, r"self_attn$"], ids=["type", "name"])
def test_skipped_attention_is_not_listed_and_keeps_base_gradient(skip):
    torch.manual_seed(0)
    model = Encoder()
    pre = KFACPreconditioner(model, lr=0.1, damping=0.1, skip_layers=(skip,))
    assert "forward" not in model.enc.self_attn.__dict__  # not patched
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


def test_encoder_layer_trains_with_attention_preconditioned():
    torch.manual_seed(0)
    model = Encoder()
    pre = KFACPreconditioner(model, lr=0.1, damping=0.1, factor_update_steps=1)
    names = ["enc.self_attn." + n for n in ("q_proj", "k_proj", "v_proj", "out_proj")]
    assert pre.layer_names == [*names, "enc.linear1", "enc.linear2", "head"]
    x, y = _batch(model)
    F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    before = model.enc.self_attn.in_proj_weight.grad.clone()
    pre.step()
    assert all(row["factor_updates"] == 1 for row in pre.describe())
    assert not torch.allclose(model.enc.self_attn.in_proj_weight.grad, before)
    model.eval()  # eval mode with grad: no layer captures, the q, k, v blocks neither
    F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    pre.step()
    assert all(row["factor_updates"] == 1 for row in pre.describe())
    model.train()
    fisher = KFACFisher.from_preconditioner(pre)  # reads out_proj, skips the q, k, v blocks
    assert sorted(fisher.skipped_layers) == sorted(names[:3])
    assert "enc.self_attn.out_proj" not in fisher.skipped_layers
    pre.remove()
    model.enc.self_attn.in_proj_weight.requires_grad_(False)  # frozen blocks: not layers
    pre = KFACPreconditioner(model, lr=0.1, skip_layers=("linear",))
    assert pre.layer_names == ["enc.self_attn.out_proj", "head"]
    pre.remove()
    model.enc.self_attn.requires_grad_(False)  # all frozen: not patched
    pre = KFACPreconditioner(model, lr=0.1)
    assert pre.layer_names == ["enc.linear1", "enc.linear2", "head"]
    assert "forward" not in model.enc.self_attn.__dict__


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
