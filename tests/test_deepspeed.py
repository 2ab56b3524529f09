"""DeepSpeed with K-FAC as the client optimizer: 2 real processes (gloo, DS_ACCELERATOR=cpu).

ZeRO stage 0 matches a single-process K-FAC given the same averaged gradients (float32:
DeepSpeed reduces float32/16 gradients only; tolerance 1e-5 after 3 steps). Stages 1-3 are
refused with an error naming what works.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.launch import TORCHRUN_2, launch

pytest.importorskip("deepspeed")
WORKER = Path(__file__).with_name("ds_worker.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "results.json"
    return launch(TORCHRUN_2, WORKER, [str(out)], out, env={"DS_ACCELERATOR": "cpu"})


def test_zero_stage0_matches_single_process(results):
    assert results["stage0"]["max_param_diff"] < 1e-5


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_1_to_3_refused_with_what_works(results, stage):
    err = results[f"stage{stage}"]["error"]
    assert err is not None and "ZeRO stage 0" in err and "FSDP2" in err
