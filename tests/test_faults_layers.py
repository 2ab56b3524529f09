"""Issue 11, "Layers: preconditioned, or refused; never listed and left raw".

Each test checks against an independent dense float64 reference (explicit Kronecker solve,
explicit padded patches by loops, per-sample gradients from torch.func) or the clear error.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from kfac_optim import KFACCoverageWarning, KFACPreconditioner
from tests.kfac_reference import (  # noqa: F401 (float64_default: autouse fixture)
    factors,
    float64_default,
    kron_exact,
    linear_rows,
    probe_layer,
)
from tests.test_kfac_behaviour import _train_step as _step
from tests.test_kfac_numerics import DAMPING, TOL


def _pre(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KFACCoverageWarning)
        return KFACPreconditioner(model, damping_mode="exact", damping=DAMPING,
                                  factor_update_steps=1, inv_update_steps=1, kl_clip=None, **kwargs)


# 1. nn.Conv1d is the (1, k) Conv2d -------------------------------------------------

def test_conv1d_equals_the_1_by_k_conv2d():
    torch.manual_seed(0)
    c1 = nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2)
    c2 = nn.Conv2d(3, 4, (1, 3), stride=(1, 2), padding=(0, 2), dilation=(1, 2))
    with torch.no_grad():
        c2.weight.copy_(c1.weight.unsqueeze(2))
        c2.bias.copy_(c1.bias)
    m1 = nn.Sequential(c1, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    m2 = nn.Sequential(c2, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    x, y = torch.randn(5, 3, 9), torch.randint(0, 3, (5,))
    m1(x), m2(x.unsqueeze(2))
    with torch.no_grad():
        m2[3].weight.copy_(m1[3].weight)
        m2[3].bias.copy_(m1[3].bias)
    p1, p2 = _pre(m1), _pre(m2)
    assert p1.layers["0"].kind == "nn_conv1d" and p2.layers["0"].kind == "conv2d"
    _step(m1, p1, x, y)
    _step(m2, p2, x.unsqueeze(2), y)
    for key in ("A", "G"):
        torch.testing.assert_close(getattr(p1.layers["0"], key), getattr(p2.layers["0"], key),
                                   rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c1.weight.grad, c2.weight.grad.squeeze(2), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c1.bias.grad, c2.bias.grad, rtol=1e-10, atol=1e-12)


# 2. Grouped / depthwise convolutions, padding modes, asymmetric 'same' ------------

@pytest.mark.parametrize("cin,cout,groups", [(4, 6, 2), (3, 3, 3)])  # grouped, depthwise
def test_grouped_conv_equals_separate_convs(cin, cout, groups):
    torch.manual_seed(1)
    grouped = nn.Conv2d(cin, cout, 3, padding=1, groups=groups)
    ci, co = cin // groups, cout // groups
    parts = nn.ModuleList(nn.Conv2d(ci, co, 3, padding=1) for _ in range(groups))
    with torch.no_grad():
        for i, part in enumerate(parts):
            part.weight.copy_(grouped.weight[i * co:(i + 1) * co])
            part.bias.copy_(grouped.bias[i * co:(i + 1) * co])
    head = nn.Linear(cout * 16, 3)

    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.parts = parts

        def forward(self, x):
            return torch.cat([p(x[:, i * ci:(i + 1) * ci]) for i, p in enumerate(self.parts)], 1)

    x, y = torch.randn(6, cin, 4, 4), torch.randint(0, 3, (6,))
    models = [nn.Sequential(conv, nn.Tanh(), nn.Flatten(), head) for conv in (grouped, Split())]
    pres = [_pre(m, skip_layers=("^3$",)) for m in models]
    names = [f"0.group{i}" for i in range(groups)]
    assert pres[0].layer_names == names
    assert [row["layer"] for row in pres[0].describe()] == names
    for model, pre in zip(models, pres, strict=True):
        _step(model, pre, x, y)
    want_w = torch.cat([p.weight.grad for p in parts])
    want_b = torch.cat([p.bias.grad for p in parts])
    torch.testing.assert_close(grouped.weight.grad, want_w, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grouped.bias.grad, want_b, rtol=1e-10, atol=1e-10)


def _padded_patches(x, conv, pads, mode):
    """Explicit im2col: pad with ``F.pad`` (``pads`` as F.pad takes them), cut patches by
    loops over output positions; rows (B * L, C kh kw + 1)."""
    xp = F.pad(x, pads, mode="constant" if mode == "zeros" else mode)
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for n in range(x.shape[0]):
        for i in range(ho):
            for j in range(wo):
                patch = xp[n, :, i * sh:i * sh + dh * (kh - 1) + 1:dh,
                           j * sw:j * sw + dw * (kw - 1) + 1:dw]
                rows.append(torch.cat([patch.reshape(-1), torch.ones(1)]))
    return torch.stack(rows)


PADDINGS = {  # name: (conv kwargs, F.pad pads (left, right, top, bottom))
    "reflect": (dict(kernel_size=3, padding=1, padding_mode="reflect"), (1, 1, 1, 1)),
    "replicate": (dict(kernel_size=3, padding=(1, 2), padding_mode="replicate"), (2, 2, 1, 1)),
    "circular": (dict(kernel_size=3, padding=1, padding_mode="circular"), (1, 1, 1, 1)),
    "same_even": (dict(kernel_size=(2, 4), padding="same"), (1, 2, 0, 1)),
    "same_even_reflect": (dict(kernel_size=(2, 4), padding="same", padding_mode="reflect"),
                          (1, 2, 0, 1)),
}


@pytest.mark.parametrize("name", list(PADDINGS))
def test_padding_modes_and_asymmetric_same(name):
    torch.manual_seed(2)
    kwargs, pads = PADDINGS[name]
    conv = nn.Conv2d(2, 3, **kwargs)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    x, y = torch.randn(4, 2, 5, 6), torch.randint(0, 3, (4,))
    model(x)
    pre = _pre(model, skip_layers=("^3$",))
    rows = _padded_patches(x, conv, pads, conv.padding_mode)
    w = torch.cat([conv.weight.reshape(3, -1), conv.bias[:, None]], 1)
    out = conv(x)
    # the im2col rows times the weight matrix are the module's own output
    torch.testing.assert_close((rows @ w.T).reshape(4, -1, 3), out.flatten(2).transpose(1, 2),
                               rtol=1e-12, atol=1e-12)
    xi, g = probe_layer(conv, lambda: F.cross_entropy(model(x), y, reduction="sum"))
    g_rows = g.flatten(2).transpose(1, 2).reshape(-1, 3)
    a_ref, g_ref = factors(rows, g_rows, rows.shape[0], 4)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    v = torch.cat([conv.weight.grad.reshape(3, -1), conv.bias.grad[:, None]], 1)
    pre.step()
    torch.testing.assert_close(pre.layers["0"].A, a_ref, **TOL)
    torch.testing.assert_close(pre.layers["0"].G, g_ref, **TOL)
    got = torch.cat([conv.weight.grad.reshape(3, -1), conv.bias.grad[:, None]], 1)
    torch.testing.assert_close(got, kron_exact(v, a_ref, g_ref, DAMPING), **TOL)


# 3. Frozen bias ---------------------------------------------------------------------

def test_frozen_bias_is_a_constant():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    layer = model[0]
    layer.bias.requires_grad_(False)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    xi, g = probe_layer(layer, lambda: F.cross_entropy(model(x), y, reduction="sum"))
    a, gg = factors(*linear_rows(xi, g, bias=False), 8, 8)  # a bias-free layer
    pre = _pre(model)
    assert pre.layers["0"].shape == (6, 5)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    v = layer.weight.grad.clone()
    pre.step()
    assert layer.bias.grad is None
    torch.testing.assert_close(pre.layers["0"].A, a, **TOL)
    torch.testing.assert_close(layer.weight.grad, kron_exact(v, a, gg, DAMPING), **TOL)


# 4. Lazy modules --------------------------------------------------------------------

def test_lazy_module_before_its_first_forward_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.LazyLinear(3))
    with pytest.raises(ValueError, match=r"'2'.*LazyLinear.*run one forward"):
        KFACPreconditioner(model, kl_clip=None)
    model(torch.randn(2, 4))
    assert _pre(model).layer_names == ["0", "2"]


# 5. EKFAC on weight-shared layers ---------------------------------------------------

@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_conv_ekfac_moments_are_per_sample_gradients_squared(approx):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                          nn.Linear(3 * 16, 4))
    x, y = torch.randn(6, 2, 4, 4), torch.randint(0, 4, (6,))
    pre = _pre(model, eigenvalue_correction=True, kfac_approx=approx)
    _step(model, pre, x, y)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xn, yn):
        out = functional_call(model, p, (xn[None],))
        return F.cross_entropy(out, yn[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    gw = torch.cat([per_sample["0.weight"].reshape(6, 3, -1), per_sample["0.bias"][..., None]], 2)
    q_a, q_g = pre.layers["0"].inverse.eigenbasis
    ref = ((q_g.T @ gw @ q_a) ** 2).mean(0)
    got = pre.layers["0"].inverse.corrections.value()
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)


def test_token_loss_ekfac_stays_per_position():
    """A per-token loss under "expand": every position is a loss term (the current formula)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(2, 3, 4), torch.randint(0, 3, (2, 3))

    def run(m):
        return F.cross_entropy(m(x).reshape(-1, 3), y.reshape(-1), reduction="sum")

    xi, g = probe_layer(model[0], lambda: run(model))
    a_rows, g_rows = linear_rows(xi, g, True)
    pre = _pre(model, eigenvalue_correction=True)
    model.zero_grad()
    (run(model) / 6).backward()
    pre.step()
    q_a, q_g = pre.layers["0"].inverse.eigenbasis
    ref = ((g_rows @ q_g) ** 2).T @ (a_rows @ q_a) ** 2 / 6
    torch.testing.assert_close(pre.layers["0"].inverse.corrections.value(), ref, **TOL)


# 6. Coverage warning -----------------------------------------------------------------

def test_parameters_left_to_the_base_update_are_said_once():
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    with pytest.warns(KFACCoverageWarning) as caught:
        KFACPreconditioner(model, kl_clip=None, skip_layers=("^2$",))
    assert len(caught) == 1
    text = str(caught[0].message)
    assert "skipped by skip_layers: Linear x1 ('2')" in text and "LayerNorm x1 ('1')" in text
    assert "4 trainable parameter tensors" in text
    with pytest.warns(KFACCoverageWarning, match="preconditions no layer"):
        KFACPreconditioner(nn.LayerNorm(3), kl_clip=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KFACPreconditioner(nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3)), kl_clip=None)


def test_kfac_fisher_follows_the_registry():
    """fisher_metrics reads the same layers: a frozen bias has no column; the groups of a
    grouped convolution share their parameters, so KFACFisher lists them as skipped."""
    import fisher_metrics as fm

    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.Tanh(), nn.Flatten(),
                          nn.Linear(4 * 16, 3))
    model[3].bias.requires_grad_(False)
    pre = _pre(model)
    _step(model, pre, torch.randn(5, 2, 4, 4), torch.randint(0, 3, (5,)))
    rep = fm.KFACFisher.from_preconditioner(pre)
    assert rep.layers == ["3"] and rep.factors("3")["shape"] == (3, 64)
    assert set(rep.skipped_layers) == {"0.group0", "0.group1"}
    torch.testing.assert_close(rep.factors("3")["A"], pre.layers["3"].A, **TOL)
