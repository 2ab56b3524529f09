"""Capture rules, state, schedulers, closures, errors, Hugging Face path, non-finite guards."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kfac_optim import KFAC, KFACPreconditioner
from tests.kfac_reference import factors, grad_matrix, kron_exact, linear_rows, probe_layer

TOL = dict(rtol=1e-7, atol=1e-9)


def _mlp():
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _batch(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,),
                                                                                generator=g)


def _factor_state(pre):
    return {name: (s["A"]["ema"], s["G"]["ema"]) for name, s in
            pre.state_dict()["layers"].items()}


def _assert_same_state(s1, s2):
    assert s1.keys() == s2.keys()
    for k in s1:
        for x, y in zip(s1[k], s2[k], strict=True):
            if x is None or y is None:
                assert x is None and y is None
            else:
                torch.testing.assert_close(x, y, rtol=0, atol=0)


def _train_step(model, pre, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    pre.step()


# Capture rules ------------------------------------------------------------------

def test_eval_and_no_grad_passes_leave_factors_untouched():
    torch.manual_seed(0)
    model = _mlp()
    ref_model = _mlp()
    ref_model.load_state_dict(model.state_dict())
    kw = dict(factor_update_steps=1, inv_update_steps=1, kl_clip=None)
    pre, ref_pre = KFACPreconditioner(model, **kw), KFACPreconditioner(ref_model, **kw)
    x, y = _batch()
    xe, ye = _batch(1)
    model.zero_grad()
    loss = F.cross_entropy(model(x), y)
    with torch.no_grad():  # evaluation in training mode, grad disabled
        model(xe)
    model.eval()  # evaluation in eval mode with grad enabled, even with a backward
    F.cross_entropy(model(xe), ye).backward(retain_graph=False)
    model.train()
    model.zero_grad()
    loss.backward()
    pre.step()
    _train_step(ref_model, ref_pre, x, y)
    _assert_same_state(_factor_state(pre), _factor_state(ref_pre))
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


def test_no_capture_on_non_update_steps_and_after_remove():
    torch.manual_seed(0)
    model = _mlp()
    pre = KFACPreconditioner(model, factor_update_steps=2, inv_update_steps=2, kl_clip=None)
    x, y = _batch()
    _train_step(model, pre, x, y)
    after_first = _factor_state(pre)
    _train_step(model, pre, x, y)  # step 1: not a factor-update step
    _assert_same_state(after_first, _factor_state(pre))
    pre.remove()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert all(not layer.pending for layer in pre.layers.values())


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_does_not_double_count(use_reentrant):
    class Block(nn.Module):
        def __init__(self, ckpt):
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh())
            self.head = nn.Linear(6, 3)
            self.ckpt = ckpt

        def forward(self, x):
            if self.ckpt:
                h = checkpoint(self.inner, x, use_reentrant=use_reentrant)
            else:
                h = self.inner(x)
            return self.head(h)

    torch.manual_seed(0)
    plain, ckpt = Block(False).double(), Block(True).double()
    ckpt.load_state_dict(plain.state_dict())
    x, y = _batch()
    x.requires_grad_(use_reentrant)  # reentrant checkpoint needs an input that requires grad
    kw = dict(factor_update_steps=1, inv_update_steps=1, kl_clip=None)
    pres = [KFACPreconditioner(m, **kw) for m in (plain, ckpt)]
    for m, pre in zip((plain, ckpt), pres, strict=True):
        _train_step(m, pre, x, y)
    _assert_same_state(*[_factor_state(p) for p in pres])
    for p, q in zip(plain.parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, **TOL)


# Optimizer contract --------------------------------------------------------------

def _only_plain_values(obj):
    if isinstance(obj, dict):
        return all(_only_plain_values(k) and _only_plain_values(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_only_plain_values(v) for v in obj)
    return obj is None or isinstance(obj, (torch.Tensor, int, float, str, bool))


def test_state_dict_plain_and_roundtrips_right_after_construction():
    model = _mlp()
    opt = KFAC(model, lr=0.1)
    sd = opt.state_dict()
    assert _only_plain_values(sd)
    opt.load_state_dict(sd)  # what accelerate does at prepare()
    pre = KFACPreconditioner(model, kl_clip=None)
    pre.load_state_dict(pre.state_dict())


def test_resume_reproduces_uninterrupted_run():
    torch.manual_seed(0)
    batches = [_batch(i) for i in range(8)]
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, damping=1e-2, factor_update_steps=2,
              inv_update_steps=3, factor_decay=0.8)

    def run(model, opt, bs):
        for x, y in bs:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    model = _mlp()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = KFAC(model, **kw)
    run(model, opt, batches)

    model2 = _mlp()
    model2.load_state_dict(init)
    opt2 = KFAC(model2, **kw)
    run(model2, opt2, batches[:5])
    buf = io.BytesIO()
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model3 = _mlp()
    model3.load_state_dict(ckpt["model"])
    opt3 = KFAC(model3, **kw)
    opt3.load_state_dict(ckpt["opt"])
    run(model3, opt3, batches[5:])
    for p, q in zip(model.parameters(), model3.parameters(), strict=True):
        assert torch.equal(p, q)


def test_lr_scheduler_and_damping_schedule_act_on_param_groups():
    torch.manual_seed(0)
    model = _mlp()
    opt = KFAC(model, lr=0.1, momentum=0.0, base="sgd", kl_clip=None, factor_update_steps=1,
               inv_update_steps=1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    for step in range(3):
        x, y = _batch(step)
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()  # p.grad now holds the preconditioned gradient
        lr = 0.1 * 0.5**step
        for p, b in zip(model.parameters(), before, strict=True):
            torch.testing.assert_close(p.detach(), b - lr * p.grad, **TOL)
        sched.step()

    # damping read from param_groups[0] at each step
    x, y = _batch(7)
    xi, g = probe_layer(model[0], lambda: F.cross_entropy(model(x), y, reduction="sum"))
    a, gg = factors(*linear_rows(xi, g, True), 8, 8)
    opt2 = KFAC(model, damping_mode="exact", lr=0.1, kl_clip=None, factor_update_steps=1,
                inv_update_steps=1)
    opt2.param_groups[0]["damping"] = 0.25
    opt2.zero_grad()
    F.cross_entropy(model(x), y).backward()
    v = grad_matrix(model[0].weight, model[0].bias)
    opt2.preconditioner.step(damping=opt2.param_groups[0]["damping"])
    torch.testing.assert_close(grad_matrix(model[0].weight, model[0].bias),
                               kron_exact(v, a, gg, 0.25), **TOL)


def test_step_with_closure_matches_plain_step():
    torch.manual_seed(0)
    m1 = _mlp()
    m2 = _mlp()
    m2.load_state_dict(m1.state_dict())
    o1, o2 = KFAC(m1, lr=0.1), KFAC(m2, lr=0.1)
    x, y = _batch()

    def closure():
        o2.zero_grad()
        loss = F.cross_entropy(m2(x), y)
        loss.backward()
        return loss

    o1.zero_grad()
    ref_loss = F.cross_entropy(m1(x), y)
    ref_loss.backward()
    o1.step()
    loss = o2.step(closure)
    assert loss.item() == pytest.approx(ref_loss.item())
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q)


# Errors --------------------------------------------------------------------------

PRE_ERRORS = [
    (dict(damping=-1.0), ValueError, "damping"),
    (dict(damping="big"), TypeError, "damping"),
    (dict(damping_mode="diag"), ValueError, "damping_mode"),
    (dict(factor_decay=1.0), ValueError, "factor_decay"),
    (dict(factor_update_steps=0), ValueError, "factor_update_steps"),
    (dict(factor_update_steps=1.5), TypeError, "factor_update_steps"),
    (dict(inv_update_steps=0), ValueError, "inv_update_steps"),
    (dict(kl_clip=0.0), ValueError, "kl_clip"),
    (dict(kl_clip=1e-3), ValueError, "lr"),  # a KL clip needs the learning rate
    (dict(inverse_policy="cholesky"), ValueError, "inverse_policy"),
    (dict(loss_reduction="avg"), ValueError, "loss_reduction"),
    (dict(kfac_approx="both"), ValueError, "kfac_approx"),
    (dict(skip_layers=[3]), TypeError, "skip_layers"),
    (dict(skip_layers=["("]), ValueError, "skip_layers"),
    (dict(factor_dtype=torch.int32), ValueError, "factor_dtype"),
    (dict(inv_dtype="float64"), ValueError, "inv_dtype"),
    (dict(lr=-1.0), ValueError, "lr"),
    (dict(inverse_workers="all"), ValueError, "inverse_workers"),
    (dict(comm_bucket_mb=0), ValueError, "comm_bucket_mb"),
    (dict(comm_bucket_mb="4"), ValueError, "comm_bucket_mb"),
    (dict(eigenvalue_correction=True, inverse_workers="owner"), ValueError,
     "inverse_workers='owner'"),
]


@pytest.mark.parametrize("kwargs,exc,name", PRE_ERRORS)
def test_preconditioner_bad_arguments(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        KFACPreconditioner(_mlp(), **kwargs)


KFAC_ERRORS = [
    (dict(lr=0.0), ValueError, "lr"),
    (dict(lr=-0.1), ValueError, "lr"),
    (dict(momentum=1.0), ValueError, "momentum"),
    (dict(weight_decay=-1.0), ValueError, "weight_decay"),
    (dict(nesterov=True, momentum=0.0), ValueError, "nesterov"),
    (dict(kl_clip=-1.0), ValueError, "kl_clip"),
    (dict(damping_mode="x"), ValueError, "damping_mode"),
]


@pytest.mark.parametrize("kwargs,exc,name", KFAC_ERRORS)
def test_kfac_bad_arguments(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        KFAC(_mlp(), **kwargs)


def test_other_bad_inputs():
    with pytest.raises(TypeError, match="model"):
        KFAC([torch.zeros(2)], lr=0.1)
    with pytest.raises(TypeError, match="foo"):
        KFACPreconditioner(_mlp(), foo=1)
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten())
    # grouped convolutions are one K-FAC block per group (tests/test_faults_layers.py)
    assert KFACPreconditioner(grouped, kl_clip=None).layer_names == ["0.group0", "0.group1"]
    KFACPreconditioner(grouped, kl_clip=None, skip_layers=(nn.Conv2d,))
    pre = KFACPreconditioner(_mlp(), kl_clip=None)
    with pytest.raises(ValueError, match="damping"):
        pre.step(damping=-1.0)
    with pytest.raises(ValueError, match="kl_clip"):
        pre.step(kl_clip=0.0)
    with pytest.raises(TypeError, match="mask"):
        pre.set_token_mask([[1, 0]])
    other = KFACPreconditioner(nn.Sequential(nn.Linear(5, 6, bias=False), nn.Tanh(),
                                             nn.Linear(6, 3)).double(), kl_clip=None,
                               factor_update_steps=1)
    model = _mlp()
    trained = KFACPreconditioner(model, kl_clip=None, factor_update_steps=1)
    _train_step(model, trained, *_batch())
    with pytest.raises(RuntimeError, match=r"'0'.*bias.*checkpoint mismatch"):
        other.load_state_dict(trained.state_dict())


# Skipping, tied weights, unused layers -------------------------------------------

def test_skip_layers_and_unused_layers_keep_base_gradient():
    torch.manual_seed(0)

    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.unused = _mlp(), nn.Linear(3, 3).double()

        def forward(self, x):
            return self.body(x)

    model = WithUnused()
    pre = KFACPreconditioner(model, kl_clip=None, factor_update_steps=1, inv_update_steps=1,
                             skip_layers=(r"body\.2",))
    assert pre.layer_names == ["body.0", "unused"]
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    skipped = model.body[2].weight.grad.clone()
    pre.step()
    assert torch.equal(model.body[2].weight.grad, skipped)
    assert model.unused.weight.grad is None


# Non-finite guards ----------------------------------------------------------------

def test_nan_batch_never_reaches_weights():
    torch.manual_seed(0)
    model = _mlp()
    opt = KFAC(model, lr=0.1, factor_update_steps=1, inv_update_steps=1)
    x, y = _batch()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    bad = x.clone()
    bad[0, 0] = float("nan")
    opt.zero_grad()
    F.cross_entropy(model(bad), y).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    assert any("non-finite" in str(w.message) for w in caught)
    assert opt.skipped_steps == 1
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
    assert sum(layer.nonfinite_skips for layer in opt.preconditioner.layers.values()) > 0
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()  # the last good inverse is still there
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


# Hugging Face GPT-2 ----------------------------------------------------------------

def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg).double()


def _gpt2_batch(pad_id):
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, pad_id, pad_id, pad_id]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def test_gpt2_tied_head_and_conv1d_layers_registered():
    pre = KFACPreconditioner(_tiny_gpt2(), kl_clip=None)
    names = pre.layer_names
    assert "lm_head" in names and "transformer.wte" not in names
    assert "transformer.h.0.attn.c_attn" in names and "transformer.h.0.mlp.c_fc" in names


def test_gpt2_padding_excluded_automatically_against_reference():
    """HF path without user code: T counts attention_mask==1 rows, N counts shifted valid
    labels; checked on an MLP Conv1D against the dense reference, and padding token ids do
    not change any factor."""
    model = _tiny_gpt2()
    ids, mask, labels = _gpt2_batch(pad_id=0)
    n_loss = int((labels[:, 1:] != -100).sum())
    layer = model.transformer.h[0].mlp.c_fc
    valid = mask.bool()

    xi, g = probe_layer(layer, lambda: model(input_ids=ids, attention_mask=mask,
                                             labels=labels).loss * n_loss)
    a, gg = factors(*linear_rows(xi[valid], g[valid], True), int(mask.sum()), n_loss)
    pre = KFACPreconditioner(model, damping_mode="exact", damping=1e-2, kl_clip=None,
                             factor_update_steps=1, inv_update_steps=1)
    model.zero_grad()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    v = grad_matrix(layer.weight, layer.bias, transpose=True)
    pre.step()
    # transformers' ForCausalLMLoss computes in float32 (logits.float()), so the gradients
    # of this float64 model carry float32 round-off: float32-level tolerance here.
    torch.testing.assert_close(grad_matrix(layer.weight, layer.bias, transpose=True),
                               kron_exact(v, a, gg, 1e-2), rtol=1e-5, atol=1e-7)

    states = []
    for pad in (0, 10):
        m = _tiny_gpt2()
        p = KFACPreconditioner(m, kl_clip=None, factor_update_steps=1, inv_update_steps=1)
        i, am, lab = _gpt2_batch(pad)
        m(input_ids=i, attention_mask=am, labels=lab).loss.backward()
        p.step()
        states.append(_factor_state(p))
    for name in states[0]:
        for x, y in zip(states[0][name], states[1][name], strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
