"""The post-hoc report: CLI and ``fm.report`` on a tiny saved GPT-2 with a real K-FAC state.

The model is ``GPT2LMHeadModel(n_layer=1, n_head=2, n_embd=16, vocab_size=257,
n_positions=32)`` after two real ``kfac_optim`` steps on the byte-level pydoc
corpus (its ``lm_head`` G is low-rank: Woodbury). Exact checks use small
Lanczos / SLQ budgets so the whole report takes a few seconds.
"""

import inspect
import json
import subprocess
import sys

import pytest
import torch

import fisher_metrics as fm
import kfac_optim
from fisher_metrics.__main__ import main
from fisher_metrics.data import EOS_ID, byte_tokens, corpus_tokens, lm_batches
from fisher_metrics.reporting import (
    FACTOR_EPS,
    PLOT_FILES,
    REPORT_FILES,
    SPECTRUM_FLOOR,
    TABLE_COLUMNS,
    build_report,
    default_data,
)
from tests.browser import Browser, find_browser
from tests.fm_reference import single_thread  # noqa: F401

FAST = dict(exact_max_iter=6, slq_probes=2, slq_steps=6, hessian_k=1, progress=False)
FAST_CLI = [
    "--exact-max-iter",
    "6",
    "--slq-probes",
    "2",
    "--slq-steps",
    "6",
    "--hessian-k",
    "1",
    "--seq-len",
    "16",
    "--num-sequences",
    "4",
    "--no-progress",
]


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=16,
        vocab_size=257,
        n_positions=32,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
    )
    return GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = tiny_gpt2()
    pre = kfac_optim.KFACPreconditioner(
        model, kl_clip=None, factor_update_steps=1, inverse_policy="hybrid", hybrid_min_out=200
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for batch in lm_batches(corpus_tokens(), seq_len=16, num_sequences=8, batch_size=4):
        opt.zero_grad()
        model(**batch).loss.backward()
        pre.step()
        opt.step()
    pre.remove()
    root = tmp_path_factory.mktemp("tiny_gpt2")
    model.save_pretrained(root / "model")
    torch.save(pre.state_dict(), root / "model" / "kfac_state.pt")
    return root, model.eval(), pre.state_dict()


@pytest.fixture(scope="module")
def cli_report(saved):
    """The report directory the CLI writes for the saved tiny GPT-2 (FAST budgets)."""
    root, _, _ = saved
    out = root / "report"
    assert main(["report", "--model", str(root / "model"), "--out", str(out), *FAST_CLI]) == 0
    return out


def test_cli_writes_report(cli_report):
    out = cli_report
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted([*REPORT_FILES, *PLOT_FILES.values()])
    result = json.loads((out / "report.json").read_text())
    table = result["table"]
    assert [row["layer"] for row in table][0] == "lm_head"
    for row in table:
        assert set(TABLE_COLUMNS) <= set(row)
        assert row["trace"] > 0 and row["top_eigenvalue"] > 0 and row["exact_top_eigenvalue"] > 0
        assert row["kfac_exact_ratio"] == pytest.approx(
            row["top_eigenvalue"] / row["exact_top_eigenvalue"]
        )
    head = table[0]
    assert head["low_rank_g"] and head["tied_with"] == ["transformer.wte.weight"]
    assert any(w.startswith("tied weight: shared with") for w in head["warnings"])
    assert result["slq"]["num_probes"] == 2 and len(result["slq"]["nodes"]) == 12
    assert result["comparison"]["hessian_top"] and result["comparison"]["kfac_top"]
    # wpe: a position table (ids shared by the batch), left to the base update on purpose
    assert set(result["meta"]["skipped_layers"]) == {"transformer.wpe"}
    assert result["meta"]["skipped_layers"]["transformer.wpe"].startswith("skipped by design (")
    uncovered = result["meta"]["uncovered_modules"]
    assert set(uncovered) == {"transformer.h.0.ln_1", "transformer.h.0.ln_2", "transformer.ln_f"}
    assert all(why.startswith("skipped by design (LayerNorm") for why in uncovered.values())
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and html.count("<table>") == 4
    assert "<pre>" not in html and "```" not in html and "|---" not in html and "`" not in html
    assert "never saw" not in html
    markdown = (out / "report.md").read_text()
    assert "| layer | type | shape | num params |" in markdown and "## Warnings" in markdown
    for name in PLOT_FILES.values():  # report.md shows the PNG files written beside it
        assert f"]({name})" in markdown and (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "skipped by design" in markdown and "never saw" not in markdown


def test_cli_finds_the_demo_layout(saved, tmp_path):
    root, model, state = saved
    demo = tmp_path / "demo"
    model.save_pretrained(demo / "kfac_model")
    torch.save(state, demo / "kfac_preconditioner.pt")
    out = tmp_path / "out"
    args = [
        "report",
        "--model",
        str(demo),
        "--out",
        str(out),
        "--no-exact",
        "--slq-probes",
        "0",
        "--hessian-k",
        "0",
        "--no-progress",
    ]
    assert main(args) == 0
    assert json.loads((out / "report.json").read_text())["table"][0]["exact_top_eigenvalue"] is None


def test_python_report_matches_kfac_fisher(saved, tmp_path):
    _, model, state = saved
    data = lm_batches(corpus_tokens(), seq_len=16, num_sequences=4, batch_size=4)
    table = fm.report(model, data, kfac=state, out=tmp_path, **FAST)
    rows = table.to_dict("records") if hasattr(table, "to_dict") else table
    rep = fm.KFACFisher.from_state_dict(state, model)
    assert [row["layer"] for row in rows] == rep.layers
    for row in rows:
        assert row["trace"] == pytest.approx(rep.trace(row["layer"]), rel=1e-12)
        assert row["top_eigenvalue"] == pytest.approx(
            float(rep.top_k(1, row["layer"]).values[0]), rel=1e-12
        )
        assert row["shape"] == list(rep.factors(row["layer"])["shape"])
    exact = fm.top_eigenvalues(model, data, k=1, params=rep.layer_params["lm_head"], max_iter=6)
    assert rows[0]["exact_top_eigenvalue"] == pytest.approx(exact["max_eigenvalue"], rel=1e-6)
    written = json.loads((tmp_path / "report.json").read_text())["table"]
    assert [row["layer"] for row in written] == rep.layers


def test_default_data_is_the_byte_level_pydoc_corpus(saved):
    _, model, _ = saved
    tokens = corpus_tokens()
    assert tokens.dtype == torch.int64 and int(tokens.max()) == EOS_ID and int(tokens.min()) >= 0
    assert torch.equal(byte_tokens("hé", eos_id=EOS_ID), torch.tensor([104, 195, 169, 256]))
    batches = default_data(model, num_sequences=5, batch_size=2)
    assert [b["input_ids"].shape for b in batches] == [(2, 32), (2, 32), (1, 32)]
    assert torch.equal(batches[0]["input_ids"][0], tokens[:32])
    assert torch.equal(batches[0]["labels"], batches[0]["input_ids"])


def test_bad_arguments(saved, tmp_path, capsys):
    root, model, state = saved
    with pytest.raises(ValueError, match="k must be"):
        build_report(model, kfac=state, k=0)
    with pytest.raises(ValueError, match="exact_curvature"):
        build_report(model, kfac=state, exact_curvature="hessian")
    with pytest.raises(TypeError, match="kfac must be"):
        build_report(model, kfac=3)
    with pytest.raises(ValueError, match="ratio_warn must be >= 1"):
        build_report(model, kfac=state, ratio_warn=0.5)
    with pytest.raises(TypeError, match="model must be"):
        fm.report("model", kfac=state)
    mlp = torch.nn.Sequential(torch.nn.Linear(3, 2))
    pre = kfac_optim.KFACPreconditioner(mlp, kl_clip=None, factor_update_steps=1)
    torch.nn.functional.cross_entropy(mlp(torch.randn(4, 3)), torch.tensor([0, 1, 0, 1])).backward()
    pre.step()
    with pytest.raises(ValueError, match="vocab_size"):
        fm.report(mlp, kfac=pre, progress=False)
    cases = [
        (["report", "--model", str(tmp_path / "missing")], "must be a directory"),
        (["report", "--model", str(tmp_path)], "no config.json"),
        (["report", "--model", str(root / "model"), "--kfac-state", "nope.pt"], "--kfac-state"),
        (["report", "--model", str(root / "model"), "--data", "nope.txt"], "--data must be"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as err:
            main(argv)
        assert err.value.code == 2 and message in capsys.readouterr().err
    # without a state the CLI fits the factors (tests/test_fm_fit.py); with one, there is
    # nothing fitted to save
    with pytest.raises(SystemExit):
        main(["report", "--model", str(root / "model"), "--save-factors", str(tmp_path / "f.pt")])
    assert "--save-factors applies to fitted factors" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", "--model", str(root / "model"), "--fisher", "empirical"])
    assert "--fisher applies to fitted factors" in capsys.readouterr().err
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / "config.json").write_text(json.dumps({"kind": "mlp", "hidden": 8}))
    with pytest.raises(SystemExit):
        main(["report", "--model", str(tmp_path / "digits")])
    assert "not a Hugging Face model" in capsys.readouterr().err


def test_module_entry_point_help():
    done = subprocess.run(
        [sys.executable, "-m", "fisher_metrics", "report", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "--kfac-state" in done.stdout
    help_text = " ".join(done.stdout.split())  # argparse wraps lines
    assert "(default: 10)" in help_text and "(default: pydoc)" in help_text  # --k, --data
    assert "(default: 20)" in help_text and "(default: fisher_report)" in help_text
    for markup in ("``", ":func:", ":class:"):  # plain text, not reST
        assert markup not in help_text


def _reference_condition(matrix):
    """(condition number or None when singular, rank) of a PSD factor, by dense float64 eigh."""
    values = torch.linalg.eigvalsh(matrix.double()).clamp_min(0).flip(0)
    rank = int((values > values.numel() * FACTOR_EPS * values[0]).sum())
    return (float(values[0] / values[-1]) if rank == values.numel() else None), rank


def test_factor_condition_numbers_match_dense_reference(cli_report, saved):
    _, model, state = saved
    rep = fm.KFACFisher.from_state_dict(state, model)
    table = json.loads((cli_report / "report.json").read_text())["table"]
    finite = 0
    for row in table:
        f = rep.factors(row["layer"])
        a = torch.diag(f["A"]) if f["A"].dim() == 1 else f["A"]
        g = f["U"] @ f["U"].T if f["low_rank"] else f["G"]  # dense o x o reference
        for side, matrix in (("A", a), ("G", g)):
            cond, rank = _reference_condition(matrix)
            assert row[f"rank_{side}"] == rank and row[f"dim_{side}"] == matrix.shape[0]
            if cond is None:
                assert row[f"cond_{side}"] is None
            else:
                assert row[f"cond_{side}"] == pytest.approx(cond, rel=1e-8)
                finite += 1
    assert finite >= 2  # healthy factors get a number, not inf
    md = (cli_report / "report.md").read_text()
    assert "inf" not in md.split("## Layers")[1].split("## Warnings")[0]
    singular = next(r for r in table if r["cond_G"] is None)
    assert f"singular (rank {singular['rank_G']} of {singular['dim_G']})" in md


def test_ill_conditioned_flag_is_relative_to_the_models_layers(cli_report):
    result = json.loads((cli_report / "report.json").read_text())
    conds = [row["condition_number"] for row in result["table"]]
    median = float(torch.tensor(conds).median())
    assert result["meta"]["median_condition_number"] == pytest.approx(median)
    flagged = [row["layer"] for row in result["table"] if "ill-conditioned" in row["flags"]]
    assert flagged == [row["layer"] for row in result["table"]
                       if row["condition_number"] > 10 * median]
    assert 0 < len(flagged) < len(conds)  # on this model the flag separates layers


def test_slq_density_is_non_negative_and_integrates_to_one(cli_report):
    from fisher_metrics.lanczos import gaussian_density
    from fisher_metrics.reporting import _psd_density

    s = json.loads((cli_report / "report.json").read_text())["slq"]
    grid, density = torch.tensor(s["grid"]), torch.tensor(s["density"])
    assert grid[0] == 0 and bool((density >= 0).all())
    assert float(torch.trapezoid(density, grid)) == pytest.approx(1.0, abs=1e-3)
    # reflection at 0: nodes far from 0 give the plain Gaussian mixture; a node at 0 twice it
    nodes, weights = torch.tensor([0.0, 5.0]), torch.tensor([0.5, 0.5])
    grid, phi, sigma = _psd_density(nodes, weights, num_points=2001)
    _, plain = gaussian_density(nodes, weights, grid=grid, sigma=sigma)
    assert sigma == pytest.approx(0.05)
    far = grid > 1.0
    assert torch.allclose(phi[far], plain[far], rtol=1e-12, atol=1e-12 * float(plain.max()))
    assert float(phi[0]) == pytest.approx(2 * float(plain[0]), rel=1e-12)
    assert float(torch.trapezoid(phi, grid)) == pytest.approx(1.0, abs=1e-6)


def test_spectra_table_counts_eigenvalues_above_the_floor(cli_report, saved):
    _, model, state = saved
    rep = fm.KFACFisher.from_state_dict(state, model)
    result = json.loads((cli_report / "report.json").read_text())
    floor = SPECTRUM_FLOOR * result["model"]["max_eigenvalue"]
    for row in result["spectra"]:
        s_a, s_g = rep.factor_eigenvalues(row["layer"])
        dense = torch.outer(s_a, s_g).reshape(-1)  # eigenvalues of A (x) G (Van Loan 2000)
        assert row["above_floor"] == int((dense >= floor).sum())
        top = torch.sort(dense, descending=True).values[:5]
        assert row["top_eigenvalues"] == pytest.approx(top.tolist(), rel=1e-12)


def test_html_escapes_text():
    from fisher_metrics.reporting import _html

    page = _html([("h2", "a <b> & 'c'"), ("table", ["x<y"], [["<script>"]])], {}, set())
    assert "&lt;b&gt; &amp; &#x27;c&#x27;" in page and "&lt;script&gt;" in page
    assert "<script>" not in page


def test_report_html_renders_in_headless_chromium(cli_report, tmp_path):
    """What a reader sees: tables, headings, no Markdown syntax, every image loaded."""
    executable = find_browser()
    if executable is None:
        pytest.skip("no Chromium executable (apt-get install chromium, or set $CHROMIUM)")
    with Browser(executable) as browser:
        browser.open(cli_report / "report.html")
        text = browser.evaluate("document.body.innerText")
        tables = browser.evaluate("document.querySelectorAll('table').length")
        cells = browser.evaluate("document.querySelectorAll('table td').length")
        headings = browser.evaluate(
            "[...document.querySelectorAll('h1, h2')].map(h => h.innerText)")
        images = browser.evaluate(
            "[...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
        )
        overflow = browser.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth")
        shot = browser.screenshot(tmp_path / "report.png")
    assert tables == 4 and cells > 50  # layers, whole model, Hessian vs GGN, spectra
    assert overflow <= 0  # the page fits the 1280 px window: no sideways scrolling
    assert headings[0] == "Curvature report" and "Layers" in headings and "Warnings" in headings
    assert "Whole model (K-FAC, block-diagonal)" in headings
    for markdown in ("```", "|---", "`", "## ", "**"):
        assert markdown not in text
    assert "lm_head" in text and "skipped by design" in text
    assert len(images) == len(PLOT_FILES)
    assert all(done and width > 0 and height > 0 for done, width, height in images)
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_reporting_module_and_report_function():
    import fisher_metrics.reporting as reporting

    assert inspect.ismodule(reporting) and callable(fm.report)
    assert fm.report is reporting.report and fm.build_report is reporting.build_report
