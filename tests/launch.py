"""Launching real multi-process runs from tests: torchrun (or accelerate) on 127.0.0.1, gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def launch(launcher: list[str], script: Path, args: list[str], result: Path,
           env: dict | None = None, timeout: int = 400) -> dict:
    """Run ``python -m <launcher...> script args``; return the JSON rank 0 wrote to ``result``.

    Raises:
        AssertionError: the launch failed (its output tail is in the message).
    """
    full_env = dict(os.environ, MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo",
                    OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env or {}))
    proc = subprocess.run([sys.executable, "-m", *launcher, str(script), *args], env=full_env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(result.read_text())


TORCHRUN_2 = ["torch.distributed.run", "--standalone", "--nproc_per_node=2"]
