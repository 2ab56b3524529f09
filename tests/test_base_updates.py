"""Base updates (``kfac_optim.base``) against torch.optim references, float64."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_optim import KFAC, KFACPreconditioner


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).double()


def _batches(n=4):
    gen = torch.Generator().manual_seed(2)
    return [(torch.randn(16, 4, generator=gen, dtype=torch.float64),
             torch.randint(0, 3, (16,), generator=gen)) for _ in range(n)]


KW = dict(damping=0.05, kl_clip=None, factor_update_steps=1, inv_update_steps=1)


def test_adamw_base_is_torch_adamw_on_the_preconditioned_gradient():
    model, ref = _net(), _net()
    opt = KFAC(model, lr=1e-2, base="adamw", weight_decay=0.1, betas=(0.8, 0.95), **KW)
    pre = KFACPreconditioner(ref, lr=1e-2, **KW)
    adamw = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95))
    for x, y in _batches():
        for m in (model, ref):
            m.zero_grad()
            F.cross_entropy(m(x), y).backward()
        opt.step()
        pre.step()
        adamw.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_grafting_has_kfac_direction_and_adam_length_per_layer():
    model, ref, plain = _net(), _net(), _net()
    opt = KFAC(model, lr=1e-2, base="grafting", weight_decay=0.0, **KW)
    pre = KFACPreconditioner(ref, lr=1e-2, **KW)
    adamw = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.0)
    for x, y in _batches(3):
        for m in (model, ref, plain):
            m.zero_grad()
            F.cross_entropy(m(x), y).backward()
        before = [p.detach().clone() for p in model.parameters()]
        adam_before = [p.detach().clone() for p in plain.parameters()]
        opt.step()
        pre.step()
        adamw.step()  # Adam's moments follow the raw gradient, as grafting's do
        steps = [b - p.detach() for b, p in zip(before, model.parameters(), strict=True)]
        adam_steps = [b - p.detach() for b, p in zip(adam_before, plain.parameters(),
                                                     strict=True)]
        directions = [p.grad for p in ref.parameters()]
        # layers 0 and 3 (weight, bias) are preconditioned; the LayerNorm gets plain AdamW
        for idx in ((0, 1), (4, 5)):
            step = torch.cat([steps[i].reshape(-1) for i in idx])
            adam = torch.cat([adam_steps[i].reshape(-1) for i in idx])
            d = torch.cat([directions[i].reshape(-1) for i in idx])
            torch.testing.assert_close(step.norm(), adam.norm(), rtol=1e-10, atol=0)
            torch.testing.assert_close(step / step.norm(), d / d.norm(), rtol=1e-9, atol=1e-12)
        for i in (2, 3):
            torch.testing.assert_close(steps[i], adam_steps[i], rtol=1e-10, atol=1e-14)
        with torch.no_grad():  # the next step starts from the same weights everywhere
            for p, q, r in zip(model.parameters(), plain.parameters(), ref.parameters(),
                               strict=True):
                q.copy_(p)
                r.copy_(p)


def test_adamw_base_is_the_default_and_bad_bases_are_refused():
    model = _net()
    assert KFAC(model, lr=0.1).param_groups[0]["base"] == "adamw"
    with pytest.raises(ValueError, match="base='adam' is not accepted.*'adamw'"):
        KFAC(model, lr=0.1, base="adam")
    with pytest.raises(ValueError, match="betas"):
        KFAC(model, lr=0.1, base="adamw", betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="eps"):
        KFAC(model, lr=0.1, base="adamw", eps=0.0)


def test_adam_state_resumes_exactly():
    data = _batches(4)
    model = _net()
    opt = KFAC(model, lr=1e-2, base="grafting", **KW)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    resumed = _net()
    opt2 = KFAC(resumed, lr=1e-2, base="grafting", **KW)
    for x, y in data[:2]:
        opt2.zero_grad()
        F.cross_entropy(resumed(x), y).backward()
        opt2.step()
    state = opt2.state_dict()
    fresh = _net()
    fresh.load_state_dict(resumed.state_dict())
    opt3 = KFAC(fresh, lr=1e-2, base="grafting", **KW)
    opt3.load_state_dict(state)
    for x, y in data[2:]:
        opt3.zero_grad()
        F.cross_entropy(fresh(x), y).backward()
        opt3.step()
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
