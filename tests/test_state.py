"""Saved states: the version-1 schema and the conversion of release 0.1.0 checkpoints.

``fixtures/v0_states.pt`` was written by release 0.1.0 (``fixtures/make_v0_states.py`` at
commit 1492ed7): per policy case, the model's initial weights, the ``KFAC`` state after 3
steps and the weights after 2 more steps on the same batches. Loading the old state into
today's ``KFAC`` must continue that run exactly (float64).
"""

from pathlib import Path

import pytest
import torch

from kfac_optim import KFAC
from kfac_optim.policies import INVERSES
from kfac_optim.state import STATE_VERSION, upgrade_state

from .fixtures.make_v0_states import Net, batches, train

FIXTURE = Path(__file__).parent / "fixtures" / "v0_states.pt"
CASES = torch.load(FIXTURE, weights_only=False)


# 0.1.0's defaults where they differ from today's (the fixture passed only "kwargs")
V0_DEFAULTS = dict(damping_mode="exact", inverse_policy="eig", woodbury_rank=None)


@pytest.mark.parametrize("case", sorted(CASES))
def test_release_0_1_0_state_continues_the_run(case):
    saved = CASES[case]
    kwargs = dict(V0_DEFAULTS, **saved["kwargs"])
    model = Net().double()
    model.load_state_dict(saved["init"])
    opt = KFAC(model, lr=0.05, damping=0.01, factor_update_steps=1, inv_update_steps=2,
               kl_clip=None, base="sgd", **kwargs)  # 0.1.0 had only SGD-momentum
    data = batches(5)
    train(model, opt, data[:3])  # the same weights as when the state was saved
    fresh = Net().double()
    fresh.load_state_dict(model.state_dict())
    opt2 = KFAC(fresh, lr=0.05, damping=0.01, factor_update_steps=1, inv_update_steps=2,
                kl_clip=None, **kwargs)  # the state's groups carry base="sgd"
    opt2.load_state_dict(saved["optimizer"])
    assert opt2.state_dict()["kfac"]["version"] == STATE_VERSION
    train(fresh, opt2, data[3:])
    for name, want in saved["final"].items():
        torch.testing.assert_close(fresh.state_dict()[name], want, rtol=1e-12, atol=1e-14)


def test_upgraded_inverses_are_tagged_with_registered_kinds():
    kinds = set()
    for saved in CASES.values():
        state = upgrade_state(saved["optimizer"]["kfac"])
        assert state["version"] == STATE_VERSION
        for entry in state["layers"].values():
            assert set(entry) == {"A", "G", "G_low_rank", "inv", "nonfinite_skips",
                                  "positional"}
            kinds.add(entry["inv"]["kind"])
    assert kinds == {"eig", "woodbury"} and kinds <= set(INVERSES)


def test_state_of_another_version_or_kind_is_refused():
    state = CASES["eig_factored"]["optimizer"]["kfac"]
    with pytest.raises(ValueError, match="version 7.*accepted"):
        upgrade_state({**state, "version": 7})
    with pytest.raises(TypeError, match="KFACPreconditioner.state_dict"):
        upgrade_state({"state": {}, "param_groups": []})
    new = upgrade_state(state)
    new["layers"]["fc"]["inv"]["kind"] = "shampoo"
    model = Net().double()
    opt = KFAC(model, lr=0.05, kl_clip=None)
    with pytest.raises(ValueError, match="kind 'shampoo'; accepted kinds"):
        opt.preconditioner.load_state_dict(new)
