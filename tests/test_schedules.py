"""Callable schedules for factor_decay, factor_update_steps and inv_update_steps.

The reference is built here in float64 from explicit per-step statistics
(``tests.kfac_reference``): the bias-corrected EMA ``ema <- d ema + (1 - d) batch``,
``w <- d w + (1 - d)`` with the scheduled decay ``d``, captured at the scheduled steps, and
the explicit Kronecker solve with the factors of the last scheduled inverse update.
Tolerance: float64 round-off (1e-10 relative).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_optim import KFAC, KFACOptions, KFACPreconditioner
from kfac_optim.placement.plan import fingerprint
from tests.kfac_reference import factors, float64_default, kron_exact, linear_rows, probe_layer

__all__ = ["float64_default"]  # the autouse fixture, imported for its effect

TOL = dict(rtol=1e-10, atol=1e-12)
DAMPING = 1e-2


def decay(step: int) -> float:
    return 0.5 if step < 3 else 0.9


def factor_steps(step: int) -> int:
    return 1 if step < 4 else 2


def inv_steps(step: int) -> int:
    return 1 if step < 2 else 3


SCHEDULES = dict(factor_decay=decay, factor_update_steps=factor_steps,
                 inv_update_steps=inv_steps)


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)


def layer() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(4, 3)


def test_schedule_matches_explicit_reference():
    """Eight steps: captures at 0, 1, 2, 3, 4, 6 (k = 1 then 2), decays 0.5 then 0.9,
    inverses at 0, 1, 3, 6 (k = 1 then 3); the factors and the preconditioned gradient of
    every step equal the dense reference."""
    lin = layer()
    pre = KFACPreconditioner(lin, damping_mode="exact", damping=DAMPING, kl_clip=None, **SCHEDULES)
    ema_a = ema_g = None
    weight = 0.0
    inv = None
    captured, inverted = [], []
    for s in range(8):
        x, y = data(s)
        capture = s % factor_steps(s) == 0
        assert pre.capturing == capture
        lin.zero_grad()
        if capture:
            pre.capture_enabled = False  # the reference's own pass is not K-FAC's
            xs, gs = probe_layer(lin, lambda x=x, y=y: F.cross_entropy(lin(x), y, reduction="sum"))
            a, g = factors(*linear_rows(xs, gs, bias=True), t=6, n=6)
            d = decay(s)
            ema_a = a * (1 - d) if ema_a is None else d * ema_a + (1 - d) * a
            ema_g = g * (1 - d) if ema_g is None else d * ema_g + (1 - d) * g
            weight = d * weight + (1 - d)
            captured.append(s)
            pre.capture_enabled = True
            lin.zero_grad()
        F.cross_entropy(lin(x), y).backward()
        v = torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1)
        if s % inv_steps(s) == 0:
            inv = (ema_a / weight, ema_g / weight)
            inverted.append(s)
        pre.step()
        torch.testing.assert_close(pre.layers[""].A, ema_a / weight, **TOL)
        torch.testing.assert_close(pre.layers[""].G, ema_g / weight, **TOL)
        got = torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1)
        torch.testing.assert_close(got, kron_exact(v, *inv, DAMPING), **TOL)
        assert pre.last_step.factor_decay == decay(s)
        assert pre.last_step.inv_update_steps == inv_steps(s)
    assert captured == [0, 1, 2, 3, 4, 6] and inverted == [0, 1, 3, 6]


def test_schedule_equals_a_run_with_the_values_set_by_hand():
    """The same run with plain values written into the options before each step."""
    scheduled, manual = layer(), layer()
    pre = KFACPreconditioner(scheduled, damping=DAMPING, kl_clip=None, **SCHEDULES)
    ref = KFACPreconditioner(manual, damping=DAMPING, kl_clip=None)
    for s in range(8):
        for name, fn in SCHEDULES.items():
            setattr(ref.options, name, fn(s))
        x, y = data(s)
        for model, p in ((scheduled, pre), (manual, ref)):
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            p.step()
        assert torch.equal(scheduled.weight.grad, manual.weight.grad)
        assert torch.equal(pre.layers[""].A, ref.layers[""].A)


@pytest.mark.parametrize("name, fn, error, match", [
    ("factor_decay", lambda s: 1.5, ValueError, r"factor_decay: .* returned 1.5 at step 0"),
    ("factor_update_steps", lambda s: 0, ValueError,
     r"factor_update_steps: .* returned 0 at step 0.*int >= 1"),
    ("inv_update_steps", lambda s: 2.0, TypeError, r"inv_update_steps: .* returned 2.0"),
    ("factor_decay", lambda s: 1 / s, ValueError,
     r"factor_decay: the schedule .* raised ZeroDivisionError at step 0"),
])
def test_bad_schedule_refused_at_construction(name, fn, error, match):
    with pytest.raises(error, match=match):
        KFACOptions(**{name: fn})


def test_bad_schedule_value_refused_at_its_step():
    lin = layer()
    pre = KFACPreconditioner(lin, kl_clip=None, factor_decay=lambda s: 0.9 if s < 2 else -0.1)
    for s in range(2):
        x, y = data(s)
        lin.zero_grad()
        F.cross_entropy(lin(x), y).backward()
        pre.step()
    with pytest.raises(ValueError, match=r"factor_decay: .* returned -0.1 at step 2"):
        pre.step()


def _plain(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (torch.Tensor, bool, int, float, str))


def test_state_dict_round_trip_with_schedules():
    """The state holds plain values only; loaded into a new optimizer given the schedules
    again, it continues as the uninterrupted run (bit for bit)."""
    def build(model):
        return KFAC(model, lr=0.1, damping=DAMPING, kl_clip=None, **SCHEDULES)

    def run(model, opt, steps):
        for s in steps:
            x, y = data(s)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    whole = layer()
    run(whole, build(whole), range(9))
    first = layer()
    opt = build(first)
    run(first, opt, range(5))
    state = copy.deepcopy(opt.state_dict())
    assert _plain(state)
    second = layer()
    second.load_state_dict(first.state_dict())
    resumed = build(second)
    resumed.load_state_dict(state)
    run(second, resumed, range(5, 9))
    assert torch.equal(whole.weight, second.weight) and torch.equal(whole.bias, second.bias)


def test_fingerprint_uses_the_values_not_the_callable():
    """Ranks compare repr of the resolved values: two equal schedules (distinct function
    objects, as in two processes) agree; different values at step 0 do not."""
    lin = layer()
    pre = KFACPreconditioner(lin, kl_clip=None)
    layers = pre._layers
    one = fingerprint(KFACOptions(factor_decay=lambda s: 0.9), layers)
    two = fingerprint(KFACOptions(factor_decay=lambda s: 0.9), layers)
    assert one == two and one["factor_decay"] == "0.9"
    assert fingerprint(KFACOptions(factor_decay=lambda s: 0.8), layers) != one
