"""Options: typed and visible signatures, close-match suggestions, per-step settings."""

import dataclasses
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_optim import KFAC, KFACOptions, KFACPreconditioner

FIELDS = [f.name for f in dataclasses.fields(KFACOptions)]


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def test_signatures_name_every_option_with_its_default():
    for cls, skip in ((KFACPreconditioner, set()), (KFAC, {"lr"})):
        params = inspect.signature(cls).parameters
        for f in dataclasses.fields(KFACOptions):
            if f.name in skip:
                continue
            assert params[f.name].kind is inspect.Parameter.KEYWORD_ONLY, (cls, f.name)
            assert params[f.name].default == f.default, (cls, f.name)
            assert f.metadata["doc"] and f.name in cls.__doc__, (cls, f.name)
    assert inspect.signature(KFAC).parameters["lr"].default == 1e-3


@pytest.mark.parametrize("cls", [KFACPreconditioner, KFAC])
def test_unknown_keyword_gets_close_matches(cls):
    with pytest.raises(TypeError, match="'dampng'; did you mean 'damping'"):
        cls(_net(), lr=0.1, dampng=0.1)
    with pytest.raises(TypeError, match="accepted options: damping,"):
        cls(_net(), lr=0.1, zzzz=1)


def test_options_object_and_keywords_combine():
    base = KFACOptions(damping=0.3, factor_update_steps=2, kl_clip=None)
    pre = KFACPreconditioner(_net(), options=base, damping=0.2)
    assert pre.options.damping == 0.2 and pre.options.factor_update_steps == 2
    assert base.damping == 0.3  # not modified
    with pytest.raises(TypeError, match="options must be a KFACOptions"):
        KFACPreconditioner(_net(), options={"damping": 0.1})


def _one_step(damping, schedule_damping, caplog=None):
    model = _net()
    opt = KFAC(model, lr=0.1, damping=damping, factor_update_steps=1, inv_update_steps=1)
    torch.manual_seed(5)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    assert {row["damping"] for row in opt.preconditioner.describe()} == {damping}
    for group in opt.param_groups:
        group["damping"] = schedule_damping  # what a damping schedule does
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return opt, [p.detach().clone() for p in model.parameters()]


def test_describe_and_log_report_the_damping_a_schedule_set(caplog):
    with caplog.at_level("INFO", logger="kfac_optim"):
        opt, scheduled = _one_step(1e-3, 0.5)
    assert opt.preconditioner.last_step.damping == 0.5
    assert {row["damping"] for row in opt.preconditioner.describe()} == {0.5}
    logged = [r.getMessage() for r in caplog.records if "inverse update" in r.getMessage()]
    assert len(logged) == 2 and all("damping=0.5" in line for line in logged)
    # the 0.5 was used: the same step as with damping 0.5 from the start, not 1e-3
    _, built = _one_step(0.5, 0.5)
    _, unscheduled = _one_step(1e-3, 1e-3)
    for p, q, r in zip(scheduled, built, unscheduled, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        assert not torch.equal(p, r)


def test_layer_view_is_read_only_and_public():
    model = _net()
    pre = KFACPreconditioner(model, lr=0.1, factor_update_steps=1, inv_update_steps=1)
    F.cross_entropy(model(torch.randn(8, 4, dtype=torch.float64)),
                    torch.randint(0, 3, (8,))).backward()
    pre.step()
    view = pre.layers["0"]
    assert view.kind == "linear" and view.shape == (6, 5) and view.A.shape == (5, 5)
    assert view.inverse.kind == "eig" and view.diagnostics["layer"] == "0"
    with pytest.raises(TypeError):
        pre.layers["0"] = view
    with pytest.raises(AttributeError):
        view.inverse = None
