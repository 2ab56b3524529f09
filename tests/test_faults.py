"""Issue 11, single process: inputs that used to train wrongly without a word now train
correctly (checked against an independent float64 reference) or are refused clearly."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_optim import KFAC, KFACPreconditioner

from .kfac_reference import grad_matrix, kron_exact


def _two_layers(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def _batch(dtype=torch.float64, n=16):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=gen, dtype=dtype), torch.randint(0, 3, (n,), generator=gen)


def _backward(model, dtype=torch.float64):
    x, y = _batch(dtype)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()


def test_kfac_on_a_subset_leaves_the_other_gradients_alone():
    model = _two_layers()
    opt = KFAC(model, lr=0.1, params=model[0].parameters(), factor_update_steps=1,
               inv_update_steps=1)
    assert opt.preconditioner.layer_names == ["0"]
    other = torch.optim.SGD(model[2].parameters(), lr=0.1)
    _backward(model)
    raw = [p.grad.clone() for p in model[2].parameters()]
    opt.step()
    for p, g in zip(model[2].parameters(), raw, strict=True):
        assert torch.equal(p.grad, g)  # the second optimizer steps with its own gradients
    other.step()


def test_subset_with_weight_but_not_its_trainable_bias_is_refused():
    model = _two_layers()
    with pytest.raises(ValueError, match="layer '0'.*bias"):
        KFAC(model, lr=0.1, params=[model[0].weight])


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e20), (torch.float16, 100.0)])
def test_kl_clip_does_not_depend_on_the_gradient_scale(dtype, scale):
    """nu = min(1, sqrt(kl_clip / (lr^2 <V_pre, V>))) makes the clipped step invariant to a
    rescaled gradient; <V_pre, V> used to overflow the gradient's dtype (NaN: no clip; inf:
    a zero step)."""
    model = _two_layers(dtype)
    pre = KFACPreconditioner(model, lr=1.0, kl_clip=1e-3, damping=0.1, factor_update_steps=1,
                             inv_update_steps=1)
    _backward(model, dtype)
    raw = [p.grad.clone() for p in model.parameters()]
    pre.step()
    unscaled = [p.grad.double().clone() for p in model.parameters()]
    for p, g in zip(model.parameters(), raw, strict=True):
        p.grad = g * scale  # same factors, gradient times scale
    pre.step()
    for p, want in zip(model.parameters(), unscaled, strict=True):
        assert torch.isfinite(p.grad).all()
        torch.testing.assert_close(p.grad.double(), want, rtol=2e-2 if dtype == torch.float16
                                   else 1e-5, atol=1e-6)
    assert float(torch.cat([w.reshape(-1) for w in unscaled]).norm()) > 0


def test_zero_damping_is_refused_everywhere():
    model = _two_layers()
    for make in (lambda: KFACPreconditioner(model, lr=0.1, damping=0),
                 lambda: KFAC(model, lr=0.1, damping=0.0)):
        with pytest.raises(ValueError, match="damping must be > 0"):
            make()
    opt = KFAC(model, lr=0.1, factor_update_steps=1)
    _backward(model)
    with pytest.raises(ValueError, match="damping must be > 0"):
        opt.preconditioner.step(damping=0)
    opt.param_groups[0]["damping"] = 0  # a schedule that reaches 0
    with pytest.raises(ValueError, match="damping must be > 0"):
        opt.step()


class _TokenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 10)

    def forward(self, ids):
        return self.fc(self.emb(ids))


@pytest.mark.parametrize("shape", ["bs1", "flat", "transposed"])
def test_token_mask_of_the_wrong_shape_is_refused(shape):
    torch.manual_seed(0)
    model = _TokenNet().double()
    pre = KFACPreconditioner(model, lr=0.1, factor_update_steps=1)
    ids = torch.randint(0, 10, (3, 5))
    mask = torch.ones(3, 5)
    mask[:, -2:] = 0
    bad = {"bs1": mask[..., None], "flat": mask.reshape(-1), "transposed": mask.t()}[shape]
    pre.set_token_mask(bad)
    with pytest.raises(ValueError, match=r"applies to no K-FAC layer.*\(3, 5\)"):
        model(ids)
    pre.set_token_mask(mask)  # the right shape applies
    model(ids).sum().backward()
    assert pre.layers["fc"].pending


def test_second_step_on_the_same_gradients_is_a_noop_with_a_warning():
    model = _two_layers()
    pre = KFACPreconditioner(model, lr=0.1, kl_clip=None, damping=1e-3, damping_mode="exact",
                             factor_update_steps=1, inv_update_steps=1)
    _backward(model)
    v = grad_matrix(model[0].weight, model[0].bias)
    pre.step()
    once = [p.grad.clone() for p in model.parameters()]
    view = pre.layers["0"]
    torch.testing.assert_close(grad_matrix(model[0].weight, model[0].bias),
                               kron_exact(v, view.A, view.G, 1e-3), rtol=1e-9, atol=1e-12)
    with pytest.warns(UserWarning, match="called again on gradients it already preconditioned"):
        pre.step()
    for p, g in zip(model.parameters(), once, strict=True):
        assert torch.equal(p.grad, g)
    _backward(model)  # a new backward: preconditioned again, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pre.step()


@pytest.mark.parametrize("cls", [KFAC, KFACPreconditioner])
def test_parameters_instead_of_the_model_say_what_to_pass(cls):
    with pytest.raises(TypeError, match=rf"takes the model, not its parameters.*{cls.__name__}\("):
        cls(_two_layers().parameters(), lr=0.1)


def test_loading_the_wrong_kind_of_state_says_what_it_got():
    model = _two_layers()
    opt = KFAC(model, lr=0.1)
    adamw = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="not a KFAC optimizer state.*'param_groups', 'state'"):
        opt.load_state_dict(adamw.state_dict())
    with pytest.raises(TypeError, match="KFACPreconditioner.state_dict"):
        opt.preconditioner.load_state_dict(model.state_dict())
    with pytest.raises(TypeError, match="KFACPreconditioner.state_dict"):
        opt.preconditioner.load_state_dict(None)


def test_nan_in_a_loaded_factor_is_refused_naming_the_layer():
    model = _two_layers()
    opt = KFAC(model, lr=0.1, factor_update_steps=1)
    _backward(model)
    opt.step()
    state = opt.state_dict()
    state["kfac"]["layers"]["2"]["G"]["ema"] = state["kfac"]["layers"]["2"]["G"]["ema"].clone()
    state["kfac"]["layers"]["2"]["G"]["ema"][0, 1] = float("nan")
    fresh = KFAC(_two_layers(), lr=0.1, factor_update_steps=1)
    with pytest.raises(ValueError, match="layer '2': factor G holds NaN"):
        fresh.load_state_dict(state)


def test_report_into_an_existing_file_is_refused_before_computing(tmp_path):
    import fisher_metrics as fm

    model = _two_layers()
    pre = KFACPreconditioner(model, lr=0.1, factor_update_steps=1)
    _backward(model)
    pre.step()
    target = tmp_path / "report.html"
    target.write_text("keep me")
    with pytest.raises(NotADirectoryError, match="existing file"):
        fm.report(model, [_batch()], kfac=pre, out=target, progress=False)
    assert target.read_text() == "keep me"
