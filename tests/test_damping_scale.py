"""``damping_scale="relative"``: lambda = damping * (tr(A) / d) (tr(G) / o) per layer.

Checked against the explicit Kronecker solve (tests.kfac_reference) with that lambda, on every
policy and damping mode, and by its purpose: with the Adam base and relative damping the
optimizer's trajectory does not change when the loss is multiplied by a constant.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_optim import KFAC, KFACPreconditioner
from tests.kfac_reference import float64_default  # noqa: F401 (autouse fixture)
from tests.test_kfac_numerics import CASES, DAMPING, TOL, _run


@pytest.mark.parametrize("policy", ["eig", "woodbury"])
@pytest.mark.parametrize("damping_mode", ["exact", "factored"])
@pytest.mark.parametrize("name", ["linear_bias_last", "conv2d_stride_pad_dilation", "hf_conv1d",
                                  "embedding_padding", "sequence_padding_last"])
def test_relative_damping_matches_kron_reference(name, damping_mode, policy):
    torch.manual_seed(0)
    case = CASES[name]()
    got, ref = _run(case, damping_mode, damping_scale="relative", inverse_policy=policy)
    pre, lam = case.last_run
    assert abs(lam - DAMPING) > 0.1 * DAMPING, "case must make relative differ from absolute"
    torch.testing.assert_close(got, ref, **TOL)
    row = next(r for r in pre.describe() if r["layer"] == _name_of(case))
    assert row["damping"] == DAMPING
    assert row["layer_damping"] == pytest.approx(lam, rel=1e-10)


def _name_of(case) -> str:
    return next(n for n, m in case.model.named_modules() if m is case.layer)


def _train(scale: float, damping_scale: str, steps: int = 6) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = KFAC(model, lr=1e-2, eps=1e-30, damping=1e-2, damping_scale=damping_scale,
               factor_update_steps=1, inv_update_steps=2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(32, 6, generator=gen), torch.randint(0, 4, (32,), generator=gen)
        opt.zero_grad()
        (scale * F.cross_entropy(model(x), y)).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_relative_damping_makes_the_adam_base_invariant_to_loss_scale():
    """Loss x c scales G by c^2 and V by c: the relative lambda scales by c^2 too, so V_pre
    scales by 1/c, the KL clip's <V_pre, V> is unchanged and Adam undoes the scale."""
    base = _train(1.0, "relative")
    for got, ref in zip(_train(1000.0, "relative"), base, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    # absolute damping is not invariant: the check above can fail
    moved = max((a - b).abs().max().item()
                for a, b in zip(_train(1000.0, "absolute"), _train(1.0, "absolute"),
                                strict=True))
    assert moved > 1e-6


def test_damping_scale_is_validated():
    with pytest.raises(ValueError, match="damping_scale.*accepted values.*'absolute'"):
        KFACPreconditioner(nn.Linear(2, 2), damping_scale="trace")


def test_default_policy_keeps_a_large_head_low_rank():
    """A head with o >= hybrid_min_out (4096) under the defaults: its G stays U U^T with at
    most woodbury_rank (1024) columns after a factor update of 1030 rows, never the dense
    o x o matrix (a 50k-vocabulary head's would be 10 GB); smaller layers are dense."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4096)).float()
    opt = KFAC(model, factor_update_steps=1, inv_update_steps=1)
    for _ in range(1):
        x, y = torch.randn(1030, 8, dtype=torch.float32), torch.randint(0, 4096, (1030,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    head, body = opt.preconditioner.layers["2"], opt.preconditioner.layers["0"]
    assert head.low_rank and head.rank == 1024 and head.G_factor.shape == (4096, 1024)
    assert not body.low_rank and body.G.shape == (16, 16)
    usage = opt.preconditioner.memory_usage()["layers"]["2"]
    assert usage["total"] < 4096 * 1024 * 4 * 3  # U, its eigenbasis and A: O(o r), not o^2
    row = next(r for r in opt.preconditioner.describe() if r["layer"] == "2")
    assert row["policy"] == "woodbury" and 0 <= row["dropped_G"] < 1  # truncated (not None)
