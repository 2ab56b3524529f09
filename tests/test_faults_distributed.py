"""Faults across ranks (issue 11): options or layers that differ between ranks, a rank out
of step, FSDP2 with a KFAC optimizer built before sharding and GPT-2's Conv1D, a process
group that is not one, and fisher_metrics given another model's or one owner rank's K-FAC.

One launch (tests/faults_worker.py, 2 gloo ranks, a 60 s group timeout) runs every
multi-process scenario; the rest are single-process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from kfac_optim import KFAC, KFACPreconditioner
from tests.launch import TORCHRUN_2, launch

WORKER = Path(__file__).with_name("faults_worker.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "results.json"
    return launch(TORCHRUN_2, WORKER, [str(out)], out, timeout=300)


@pytest.mark.parametrize("option", ["damping", "kl_clip", "damping_mode", "factor_decay",
                                    "inverse_policy", "factor_update_steps", "inverse_workers",
                                    "comm_dtype", "layers"])
def test_differing_options_refused_on_every_rank(results, option):
    from tests.faults_worker import DIFFERING

    messages = results["options"][option]
    assert messages[0] is not None and messages[0] == messages[1]  # every rank raises the same
    assert f"{option}: rank 0: " in messages[0] and ", rank 1: " in messages[0]
    if option in DIFFERING:
        a, b = DIFFERING[option]
        assert f"rank 0: {a!r}, rank 1: {b!r}" in messages[0]
    else:  # another model on rank 1: the shapes of both ranks are shown
        assert "('0', 'linear', 24, 5)" in messages[0] and "('0', 'linear', 25, 5)" in messages[0]
    assert results["options"]["same"] == [None, None]


@pytest.mark.parametrize("scenario", ["extra-step", "owner-extra-step"])
def test_extra_step_raises_on_every_rank(results, scenario):
    """One rank calls pre.step() once more: both fail at the next reduction, no hang."""
    for message in results[scenario]:
        assert message is not None and "out of step at step 1" in message
        assert "1 of 2 ranks captured statistics" in message and "extra step()" in message


def test_rank_resumed_at_another_step_raises(results):
    r0, r1 = results["load-ahead"]
    assert "rank 0 is at step 0, rank 1 is at step 1" in r0
    assert "rank 1 is at step 1, rank 0 is at step 0" in r1
    assert results["in-step"] == [None, None]


@pytest.mark.parametrize("when", ["after", "before"])
def test_fsdp2_gpt2_conv1d_kfac_matches_single_process(results, when):
    """KFAC built before fully_shard rebinds its groups to the sharded parameters; every
    Conv1D, sharded into an FSDPConv1D, is still preconditioned."""
    r = results[f"gpt2-fsdp-{when}"]
    assert r["sharded"]
    assert r["layers"] == r["ref_layers"]
    assert len([n for n in r["layers"] if ".c_" in n]) == 4  # c_attn, c_proj, c_fc, c_proj
    assert "FSDPConv1D" in r["types"]
    assert r["max_param_diff"] < 1e-10


def test_owner_mode_rank_state_refused_by_fisher_metrics(results):
    for rank, message in enumerate(results["owner-state"]):
        assert f"rank {rank}'s under inverse_workers='owner'" in message
        assert "owners {" in message and "gather" in message and "replicate" in message


# Single process ------------------------------------------------------------------------


def mlp(width=8):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 3))


@pytest.mark.parametrize("group", [123, "world", object()])
def test_process_group_not_a_group(group):
    with pytest.raises((TypeError, ValueError), match="process_group=.*'auto'.*None.*"
                                                      "ProcessGroup"):
        KFACPreconditioner(mlp(), kl_clip=None, process_group=group)
    with pytest.raises((TypeError, ValueError), match="process_group"):
        KFAC(mlp(), process_group=group)


def test_conv1d_subclass_is_supported():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    from kfac_optim.layers import layer_kind

    sharded_like = type("FSDPConv1D", (Conv1D,), {"__module__": "torch.distributed.fsdp"})
    assert layer_kind(sharded_like(6, 4)) == "conv1d"
    assert layer_kind(nn.Module()) is None


def trained(model):
    pre = KFACPreconditioner(model, kl_clip=None, factor_update_steps=1, inv_update_steps=1)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    model(x).square().sum().backward()
    pre.step()
    return pre


def test_report_refuses_another_models_preconditioner():
    fm = pytest.importorskip("fisher_metrics")
    pre = trained(mlp())
    other = mlp()  # same architecture, another object
    with pytest.raises(ValueError, match="preconditioner of another model"):
        fm.report(other, kfac=pre, progress=False)  # refused before any computation


def test_report_refuses_factors_that_do_not_fit():
    import fisher_metrics as fm
    from fisher_metrics import KFACFisher

    fisher = KFACFisher.from_preconditioner(trained(mlp()))
    with pytest.raises(ValueError, match=r"do not fit the model: parameter '0.weight' \(shape "
                                         r"\(8, 4\) in K-FAC\) is shape \(9, 4\)"):
        fm.report(mlp(width=9), kfac=fisher, progress=False)
    with pytest.raises(ValueError, match="layer '0'"):  # a state: the shapes are checked
        fm.report(mlp(width=9), kfac=trained(mlp()).state_dict(), progress=False)


def test_simulated_owner_state_refused():
    from fisher_metrics import KFACFisher

    model = mlp()
    state = trained(model).state_dict()
    state["owners"] = {"rank": 0, "layers": {"0": 0, "2": 1}}
    with pytest.raises(ValueError, match=r"rank 0's under inverse_workers='owner' \(owners "
                                         r"\{'0': 0, '2': 1\}\)"):
        KFACFisher.from_state_dict(state, model)
