"""The library boundary (docs/design.md, "Must hold" 8): the core imports and trains with
torch alone, and every feature that needs an extra says which one when it is missing.

The proof runs in a fresh interpreter whose first ``sys.meta_path`` finder refuses the
optional packages (``ModuleNotFoundError``), so an import of any of them anywhere, at
module level or lazily, fails there as it would on a machine without them.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fisher_metrics
import kfac_optim
from kfac_optim._extras import EXTRAS, require

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("transformers", "accelerate", "tokenizers", "matplotlib", "sklearn", "tqdm",
           "deepspeed", "numpy")

CHILD = r'''
import importlib.abc
import json
import sys

BLOCKED = set(sys.argv[1].split(","))
attempts = []


probes = []


class Blocker(importlib.abc.MetaPathFinder):
    """Refuses the optional packages and their submodules, as if not installed: an import
    raises ModuleNotFoundError; a probe through importlib.util.find_spec (torch._dynamo
    probes its skip list so) gets None, the answer for a package that is not there."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] not in BLOCKED:
            return None
        if sys._getframe(2).f_code.co_filename.endswith("importlib.util>"):
            probes.append(name)
            return None
        attempts.append(name)
        raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)


sys.meta_path.insert(0, Blocker())
import torch  # torch itself may probe for numpy: not the packages' doing

torch_attempts, attempts[:] = list(attempts), []
import fisher_metrics
import kfac_optim
import kfac_optim.demo  # importable; its features need the demo extra

import_attempts = list(attempts)
from torch import nn

import fisher_metrics.reporting

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
x = torch.randn(64, 6)
y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 0.5).long()
loss_fn = nn.CrossEntropyLoss()
opt = kfac_optim.KFAC(model, lr=0.1, factor_update_steps=1, inv_update_steps=1)
losses = []
for _ in range(8):
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    losses.append(float(loss.detach()))
with torch.no_grad():
    final = float(loss_fn(model(x), y))

rep = fisher_metrics.KFACFisher.from_preconditioner(opt)
traces = {layer: rep.trace(layer) for layer in rep.layers}
top = rep.top_k(3)
# The report's numbers (K-FAC and exact Lanczos) need no extra without plots or bars.
table = fisher_metrics.report(model, (x, y), kfac=opt, progress=False, slq_probes=2,
                              slq_steps=5, hessian_k=1, exact_max_iter=5)

errors = {}
blocked_ok = []
for module in BLOCKED:
    try:
        __import__(module)
    except ModuleNotFoundError:
        blocked_ok.append(module)


def expect_import_error(key, fn):
    try:
        fn()
    except ImportError as exc:
        errors[key] = str(exc)
    else:
        errors[key] = None


expect_import_error("report_out", lambda: fisher_metrics.report(
    model, (x, y), kfac=opt, out=sys.argv[2], progress=False))
expect_import_error("report_progress", lambda: fisher_metrics.report(model, (x, y), kfac=opt))
expect_import_error("write_report", lambda: fisher_metrics.reporting.write_report(
    {"table": []}, sys.argv[2], rep))
expect_import_error("demo_main", lambda: kfac_optim.demo.main(
    ["--steps", "1", "--out", sys.argv[2], "--no-progress"]))
expect_import_error("demo_digits", lambda: kfac_optim.demo.main(
    ["--task", "digits", "--steps", "1", "--out", sys.argv[2], "--no-progress"]))
expect_import_error("demo_lm_model", lambda: kfac_optim.demo.build_lm_model())
expect_import_error("trainer", lambda: __import__("kfac_optim.integrations.transformers"))
expect_import_error("tokenizer_data", lambda: fisher_metrics.data.tokenizer_corpus_tokens(
    sys.argv[2] + "/tokenizer.json"))

print(json.dumps({
    "losses": losses, "final": final, "traces": traces, "total_trace": rep.trace(),
    "top": top.values.tolist(), "table_layers": [row["layer"] for row in table],
    "exact_top": [row["exact_top_eigenvalue"] for row in table],
    "errors": errors, "blocked_ok": sorted(blocked_ok), "import_attempts": import_attempts,
    "torch_attempts": torch_attempts, "probes": probes,
    "loaded": sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED),
    "package_files": [kfac_optim.__file__, fisher_metrics.__file__],
    "files": sorted(str(p) for p in __import__("pathlib").Path(sys.argv[2]).rglob("*")),
}))
'''


@pytest.fixture(scope="module")
def torch_alone(tmp_path_factory) -> dict:
    """The child's report: training, metrics and the refused features, torch alone."""
    out = tmp_path_factory.mktemp("boundary_out")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, ",".join(BLOCKED), str(out)], env=env, cwd=ROOT,
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_imports_without_optional_packages(torch_alone):
    assert torch_alone["blocked_ok"] == sorted(BLOCKED)  # the blocker works
    assert all(Path(f).is_relative_to(ROOT) for f in torch_alone["package_files"])
    # Neither package even tries one of them at import (no module-level optional import).
    assert torch_alone["import_attempts"] == []
    assert torch_alone["loaded"] == []


def test_trains_with_torch_alone(torch_alone):
    losses = torch_alone["losses"]
    assert all(v == v for v in losses)
    assert torch_alone["final"] < 0.8 * losses[0], losses


def test_fisher_metrics_with_torch_alone(torch_alone):
    traces = torch_alone["traces"]
    assert set(traces) == {"0", "2"}
    assert all(t > 0 for t in traces.values())
    assert torch_alone["total_trace"] == pytest.approx(sum(traces.values()), rel=1e-12)
    top = torch_alone["top"]
    assert top == sorted(top, reverse=True) and top[0] > 0
    assert torch_alone["table_layers"] == ["0", "2"]
    assert all(v is not None and v > 0 for v in torch_alone["exact_top"])


@pytest.mark.parametrize("key, package, extra, feature", [
    ("report_out", "matplotlib", "report", "fisher_metrics.report (HTML plots)"),
    ("report_progress", "tqdm", "report", "fisher_metrics.report (progress=True)"),
    ("write_report", "matplotlib", "report", "fisher_metrics.report (HTML plots)"),
    ("demo_main", "tqdm", "demo", "python -m kfac_optim.demo"),
    ("demo_digits", "tqdm", "demo", "python -m kfac_optim.demo"),
    ("demo_lm_model", "transformers", "demo", "kfac_optim.demo.build_lm_model"),
    ("trainer", "transformers", "hf", "kfac_optim.integrations.transformers"),
    ("tokenizer_data", "tokenizers", "hf", "fisher_metrics.data.tokenizer_corpus_tokens"),
])
def test_features_name_their_extra(torch_alone, key, package, extra, feature):
    message = torch_alone["errors"][key]
    assert message is not None, f"{key}: no ImportError without {package}"
    assert message.startswith(f"{feature}") and f" needs {package}: " in message, message
    assert f"pip install 'kfac-optim[{extra}]'" in message, message


def test_refused_features_write_nothing(torch_alone):
    # The report checks matplotlib before computing; the demo checks its extra before
    # creating its output directory.
    assert torch_alone["files"] == []


def test_versions_are_the_distribution_version():
    version = importlib.metadata.version("kfac-optim")
    assert kfac_optim.__version__ == version
    assert fisher_metrics.__version__ == version


def test_require_names_feature_package_and_extra():
    assert require("json", "report", "x") is json
    with pytest.raises(ImportError, match=re.escape(
            "feature X needs kfac_no_such_module: pip install 'kfac-optim[demo]'")):
        require("kfac_no_such_module.sub", "demo", "feature X")
    with pytest.raises(ValueError, match="extra='nope'"):
        require("json", "nope", "x")


def test_pyproject_extras():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["dependencies"] == ["torch>=2.4"]
    extras = project["project"]["optional-dependencies"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0] for r in requirements}

    for extra, packages in EXTRAS.items():
        assert names(extras[extra]) == set(packages), extra
    # The test suite needs every feature's packages.
    assert set().union(*EXTRAS.values()) <= names(extras["test"])
    assert {"pytest", "pytest-timeout", "ruff"} <= names(extras["test"])
    assert "deepspeed" in extras
    package_data = project["tool"]["setuptools"]["package-data"]
    for package in ("kfac_optim", "fisher_metrics"):
        assert package_data[package] == ["py.typed"]
        assert (ROOT / package / "py.typed").is_file()
