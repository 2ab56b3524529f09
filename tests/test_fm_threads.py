"""The CLI's default thread count (``fisher_metrics.__main__.default_threads``).

Exact integer outcomes of the rule ``OMP_NUM_THREADS`` if set, else
``max(1, min(torch default, cores - busy))``, with the load information replaced by
fixed values; no timing.
"""

import os
import subprocess
import sys

import pytest
import torch

import fisher_metrics.__main__ as cli


@pytest.fixture
def four_threads(monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("busy", "expected"), [(0, 4), (1, 4), (2.4, 4), (3, 3), (5, 1), (40, 1)])
def test_default_threads_leaves_busy_cores_alone(four_threads, monkeypatch, busy, expected):
    monkeypatch.setattr(cli, "_busy_elsewhere", lambda: busy)
    assert cli.default_threads() == expected


def test_default_threads_without_load_information(four_threads, monkeypatch):
    monkeypatch.setattr(cli, "_busy_elsewhere", lambda: None)
    assert cli.default_threads() == 4


def test_default_threads_respects_omp_num_threads(four_threads, monkeypatch):
    monkeypatch.setattr(cli, "_busy_elsewhere", lambda: 40)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cli.default_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
    assert cli.default_threads() == 1


def test_busy_elsewhere_sees_a_busy_loop():
    if not os.path.exists("/proc/loadavg"):
        pytest.skip("no /proc/loadavg on this system")
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        seen = max(cli._busy_elsewhere() for _ in range(50))
    finally:
        loop.kill()
        loop.wait()
    assert seen >= 1


def test_threads_flag_is_checked(capsys):
    with pytest.raises(SystemExit):
        cli.main(["report", "--model", ".", "--threads", "0"])
    assert "--threads must be an integer >= 1; got 0" in capsys.readouterr().err
