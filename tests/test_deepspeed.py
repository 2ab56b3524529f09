"""DeepSpeed with K-FAC as the client optimizer: 2 real processes (gloo, DS_ACCELERATOR=cpu).

ZeRO stage 0 matches a single-process K-FAC given the same averaged gradients (float32:
DeepSpeed reduces float32/16 gradients only; tolerance 1e-5 after 3 steps). Stages 1-3 are
refused with an error naming what works.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
WORKER = Path(__file__).with_name("ds_worker.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "results.json"
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               DS_ACCELERATOR="cpu", PYTHONPATH=str(WORKER.parent.parent))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKER), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_zero_stage0_matches_single_process(results):
    assert results["stage0"]["max_param_diff"] < 1e-5


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_1_to_3_refused_with_what_works(results, stage):
    err = results[f"stage{stage}"]["error"]
    assert err is not None and "ZeRO stage 0" in err and "FSDP2" in err
