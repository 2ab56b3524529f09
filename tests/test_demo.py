"""Smoke tests of ``python -m kfac_optim.demo`` (in-process, tiny settings) and its data."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from kfac_optim import KFACPreconditioner
from kfac_optim.demo import (
    build_lm_model,
    load_digits_model,
    main,
    parse_args,
    reach,
    timing_reliability,
    val_loss_at_step,
    val_loss_at_time,
)
from kfac_optim.demo.data import (
    EOS_ID,
    VOCAB_SIZE,
    lm_batches,
    lm_eval_chunks,
    load_digits_data,
    load_lm_data,
    load_text_tokens,
)
from kfac_optim.options import KFACOptions

RUN_KEYS = {"final_train_loss", "final_val_loss", "wall_s", "ms_per_step", "train_loss_curve",
            "val_curve", "hparams", "steps"}
BASE_OPTIMIZER_KEYS = {"lr", "momentum", "weight_decay", "nesterov"}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models are overhead-bound; one thread also avoids OpenMP spin-waiting when
    the machine is shared (measured: several-fold slowdowns with 2 threads under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _fresh_preconditioner(model, hparams: dict) -> KFACPreconditioner:
    """A preconditioner with the demo's K-FAC options (the base-update ones dropped)."""
    fields = {f.name for f in dataclasses.fields(KFACOptions)}
    kwargs = {k: v for k, v in hparams.items() if k in fields and k not in BASE_OPTIMIZER_KEYS}
    return KFACPreconditioner(model, lr=hparams["lr"], **kwargs)


def _check_results(out, task: str, steps: int) -> dict:
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == task
    assert set(results["runs"]) == {"kfac", "adamw", "sgd"}
    for name, run in results["runs"].items():
        assert RUN_KEYS <= set(run), name
        assert run["steps"] == steps and len(run["train_loss_curve"]) == steps
        for key in ("final_train_loss", "final_val_loss", "wall_s", "ms_per_step"):
            assert math.isfinite(run[key]) and run[key] >= 0, (name, key, run[key])
        assert all(math.isfinite(v) for _, _, v in run["val_curve"])
        assert run["val_curve"][0][0] == 0 and run["val_curve"][-1][0] == steps
    assert results["env"]["torch"] == torch.__version__
    png = out / results["plot"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return results


def test_lm_demo_smoke(tmp_path, capsys):
    from transformers import GPT2LMHeadModel

    steps = 4
    out = tmp_path / "lm"
    main(["--task", "lm", "--steps", str(steps), "--eval-every", "2", "--n-layer", "1",
          "--n-embd", "32", "--n-head", "2", "--seq-len", "16", "--batch-size", "4",
          "--eval-chunks", "4", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert "val loss" in printed and "kfac" in printed and "ms/step" in printed
    results = _check_results(out, "lm", steps)
    assert results["config"]["n_embd"] == 32

    # Equal time comes from the interleaved ratios: 3 rounds of K-FAC's inv_update_steps.
    timing = results["step_time"]
    assert results["step_time_config"] == {"steps": 20, "rounds": 3, "spread_limit": 0.25}
    assert set(timing) == {"kfac", "adamw", "sgd"} and timing["adamw"]["round_ratios"] == [1.0] * 3
    for t in timing.values():
        assert len(t["samples_ms"]) == 3 and all(ms > 0 for ms in t["samples_ms"])
        assert t["ratio_to_adamw"] == sorted(t["round_ratios"])[1]
    assert results["timing_reliable"] == (not results["timing_unreliable"])
    env = results["env"]
    assert "load average (1 min) at start" in printed and env["loadavg_end"] is not None
    ratio = timing["kfac"]["ratio_to_adamw"]
    k_steps, a_steps = (steps / ratio, steps) if ratio >= 1 else (steps, steps * ratio)
    kv = val_loss_at_step(results["runs"]["kfac"]["val_curve"], k_steps)
    av = val_loss_at_step(results["runs"]["adamw"]["val_curve"], a_steps)
    line = next(x for x in printed.splitlines() if "equal wall time" in x)
    assert f"{kv:.4f}" in line and f"{av:.4f}" in line and f"{ratio:.2f} x" in line
    assert line.startswith("UNRELIABLE: ") == (not results["timing_reliable"])

    model = GPT2LMHeadModel.from_pretrained(out / "kfac_model")
    assert model.config.vocab_size == VOCAB_SIZE and model.config.n_embd == 32
    ids = torch.randint(0, VOCAB_SIZE, (2, 16))
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids, labels=ids).loss)

    state = torch.load(out / "kfac_preconditioner.pt", weights_only=False)
    pre = _fresh_preconditioner(model, results["runs"]["kfac"]["hparams"])
    pre.load_state_dict(state)
    assert pre.state_dict()["steps"] == steps
    assert "lm_head" in pre.layer_names  # the tied wte/lm_head matrix, with lm_head factors


def test_lm_demo_bpe_head_runs_on_truncated_woodbury(tmp_path):
    """--vocab bpe: a 512-id BPE head (o=512) under auto, 60 tokens per factor update,
    truncated to 32 columns: the head stays on Woodbury and bits per byte are reported."""
    out = tmp_path / "bpe"
    main(["--vocab", "bpe", "--bpe-vocab-size", "512", "--steps", "4", "--eval-every", "0",
          "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--seq-len", "16",
          "--batch-size", "4", "--eval-chunks", "4", "--woodbury-rank", "32",
          "--factor-update-steps", "1", "--inv-update-steps", "2", "--out", str(out),
          "--no-progress"])
    results = _check_results(out, "lm", 4)
    assert results["config"]["vocab"] == "bpe" and results["config"]["vocab_size"] == 512
    kfac = results["runs"]["kfac"]
    assert kfac["hparams"]["inverse_policy"] == "auto"
    head = {row["layer"]: row for row in kfac["kfac_layers"]}["lm_head"]
    assert head["policy"] == "woodbury" and head["rank"] == 32 and head["dropped_G"] > 0
    for run in results["runs"].values():  # BPE ids carry several bytes each
        assert 0 < run["final_val_bpb"] < run["final_val_loss"] / math.log(2)

    # The saved model carries its vocabulary: fisher_metrics' default report data uses it.
    from transformers import GPT2LMHeadModel

    from fisher_metrics.data import tokenizer_corpus_tokens
    from fisher_metrics.reporting import default_data

    model = GPT2LMHeadModel.from_pretrained(out / "kfac_model")
    tokens = tokenizer_corpus_tokens(out / "kfac_model" / "tokenizer.json")
    assert int(tokens.max()) < 512 and len(tokens) < 0.5 * len(load_text_tokens())
    batches = default_data(model, num_sequences=2, batch_size=2)
    window = batches[0]["input_ids"][0]
    starts = [i for i in range(len(tokens) - 15) if torch.equal(tokens[i:i + 16], window)]
    assert starts, "default data windows must come from the BPE-encoded corpus"


def test_bpe_split_is_deterministic_and_counts_bytes():
    from pydoc_data.topics import topics

    from kfac_optim.demo.data import BPE_EOS

    a, b = load_lm_data(vocab="bpe", bpe_vocab_size=1024), load_lm_data(vocab="bpe",
                                                                         bpe_vocab_size=1024)
    assert a.vocab_size == 1024 and torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert int(torch.cat([a.train, a.val]).max()) < 1024
    text = "".join(topics[k] + BPE_EOS for k in sorted(topics))
    val_text = text[int(round(0.9 * len(text))):]
    # Every id's byte count adds up to the held-out text's UTF-8 size (EOS counts 1).
    assert int(a.token_bytes[a.val].sum()) == len(val_text.replace(BPE_EOS, "\0").encode())
    with pytest.raises(ValueError, match="vocab"):
        load_lm_data(vocab="word")
    with pytest.raises(ValueError, match="bpe_vocab_size"):
        load_lm_data(vocab="bpe", bpe_vocab_size=100)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_digits_demo_smoke(tmp_path, kind):
    steps = 5
    out = tmp_path / kind
    main(["--task", "digits", "--model", kind, "--hidden", "16", "--steps", str(steps),
          "--eval-every", "2", "--out", str(out), "--no-progress"])
    results = _check_results(out, "digits", steps)
    for run in results["runs"].values():
        assert 0.0 <= run["final_val_acc"] <= 1.0 and 0.0 <= run["final_train_acc"] <= 1.0

    model = load_digits_model(out / "kfac_model")
    assert model(torch.zeros(3, 64)).shape == (3, 10)
    pre = _fresh_preconditioner(model, results["runs"]["kfac"]["hparams"])
    pre.load_state_dict(torch.load(out / "kfac_preconditioner.pt", weights_only=False))
    assert pre.state_dict()["steps"] == steps


def test_digits_unit_scale_is_the_same_split_in_0_1():
    std, unit = load_digits_data(seed=0), load_digits_data(seed=0, scale="unit")
    assert torch.equal(std.y_val, unit.y_val) and torch.equal(std.y_train, unit.y_train)
    assert float(unit.x_train.min()) == 0.0 and float(unit.x_train.max()) == 1.0
    with pytest.raises(ValueError, match="scale"):
        load_digits_data(scale="minmax")


def test_lm_split_is_deterministic_and_disjoint():
    tokens = load_text_tokens()
    a, b = load_lm_data(), load_lm_data()
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    # A contiguous partition of the stream: the held-out tail shares no position with
    # the training head, and nothing is lost.
    assert torch.equal(torch.cat([a.train, a.val]), tokens)
    assert len(a.val) == pytest.approx(0.1 * len(tokens), abs=1)
    assert 400_000 < len(tokens) < 600_000
    assert int(tokens.min()) >= 0 and int(tokens.max()) == EOS_ID

    # Training windows come from the head only, and are reproducible from the seed.
    first = next(lm_batches(a.train, 8, 32, seed=3))
    assert torch.equal(first, next(lm_batches(a.train, 8, 32, seed=3)))
    assert not torch.equal(first, next(lm_batches(a.train, 8, 32, seed=4)))
    chunks = lm_eval_chunks(a.val, 64)
    assert torch.equal(chunks.reshape(-1), a.val[: chunks.numel()])
    assert len(lm_eval_chunks(a.val, 64, max_chunks=10)) == 10


def test_same_seed_same_initial_model():
    torch.manual_seed(0)
    m1 = build_lm_model(n_layer=1, n_embd=16, n_head=2, seq_len=8)
    torch.manual_seed(0)
    m2 = build_lm_model(n_layer=1, n_embd=16, n_head=2, seq_len=8)
    assert m1.lm_head.weight is m1.transformer.wte.weight
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p1, p2)


def test_bad_optimizer_list_is_refused():
    with pytest.raises(SystemExit):
        parse_args(["--optimizers", "kfac,lbfgs"])
    assert parse_args(["--optimizers", "adamw, sgd"]).optimizers == ["adamw", "sgd"]


def test_val_loss_at_time_interpolates_inside_the_curve_only():
    curve = [[0, 0.0, 5.0], [10, 2.0, 3.0], [20, 4.0, 2.0]]
    assert val_loss_at_time(curve, 1.0) == pytest.approx(4.0)
    assert val_loss_at_time(curve, 4.0) == pytest.approx(2.0)
    assert val_loss_at_time(curve, 4.5) is None


def test_val_loss_at_step_and_reach_interpolate():
    curve = [[0, 0.0, 5.0], [10, 2.0, 3.0], [20, 4.0, 2.0]]
    assert val_loss_at_step(curve, 5) == pytest.approx(4.0)
    assert val_loss_at_step(curve, 20) == pytest.approx(2.0)
    assert val_loss_at_step(curve, 21) is None
    assert reach(curve, 2.5) == pytest.approx((15.0, 3.0))
    assert reach(curve, 5.0) == (0.0, 0.0) and reach(curve, 1.0) is None


def test_timing_reliability_names_every_reason():
    def t(ratios):
        med = sorted(ratios)[len(ratios) // 2]
        return {"round_ratios": ratios, "ratio_spread": (max(ratios) - min(ratios)) / med}

    steady = {"adamw": t([1.0, 1.0, 1.0]), "kfac": t([2.0, 2.1, 1.95])}
    assert timing_reliability(steady, (1.0, 1.5), cores=2) == []
    reasons = timing_reliability(steady, (1.0, 2.5), cores=2)
    assert reasons == ["load average 2.50 > 2 cores"]
    noisy = dict(steady, sgd=t([0.5, 0.9, 0.6]))
    (reason,) = timing_reliability(noisy, (0.5, 0.5), cores=2)
    assert reason.startswith("sgd: step-time ratio varies 67%")
    one = {"adamw": t([1.0]), "kfac": t([2.0])}
    assert timing_reliability(one, (None, None), cores=2) == ["1 timing round: no spread to judge"]


def _heldout_loss_reference(model, chunks) -> float:
    """Token-weighted mean next-byte cross-entropy, from the logits (not the model's loss)."""
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=chunks).logits.double()
    return float(torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), chunks[:, 1:].reshape(-1)))


def test_code_data_is_split_by_file_and_deterministic():
    from kfac_optim.demo.data import load_code_data, stdlib_source_files

    files = stdlib_source_files()
    a, b = load_code_data(), load_code_data()
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert not set(a.train_files) & set(a.val_files)
    assert sorted(a.train_files + a.val_files) == sorted(f.name for f in files)
    assert a.val_files == tuple(f.name for f in files[9::10])
    # The held-out stream is exactly the held-out files' bytes, each followed by EOS.
    root = files[0].parent
    want = []
    for name in a.val_files:
        want.extend((root / name).read_bytes())
        want.append(EOS_ID)
    assert torch.equal(a.val, torch.tensor(want))
    assert int(a.train.max()) == EOS_ID and int(a.train.min()) >= 0
    with pytest.raises(ValueError, match="val_every"):
        load_code_data(val_every=1)


def test_finetune_task_end_to_end(tmp_path, capsys):
    """--task finetune on a tiny model: pretrain (3 AdamW steps, cached), fine-tune with a
    2-lr AdamW grid and K-FAC at the best lr; the held-out evaluation is checked against
    a loss computed here from the logits of the cached pretrained model and of the saved
    K-FAC-fine-tuned model."""
    from transformers import GPT2LMHeadModel

    from kfac_optim.demo.data import load_code_data

    cache, steps = tmp_path / "cache", 4
    argv = ["--task", "finetune", "--steps", str(steps), "--pretrain-steps", "3",
            "--eval-every", "2", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
            "--seq-len", "16", "--batch-size", "4", "--eval-chunks", "8",
            "--finetune-lrs", "1e-4,1e-3", "--cache-dir", str(cache), "--no-progress"]
    res = main([*argv, "--out", str(tmp_path / "a")])
    printed = capsys.readouterr().out
    assert not res["pretrain"]["cached"]
    (saved,) = cache.iterdir()
    assert saved.name == f"pretrained-{res['pretrain']['key']}"

    # Held-out loss at step 0 is the pretrained model's, on windows of the held-out files.
    code = load_code_data()
    chunks = lm_eval_chunks(code.val, 16, 8)
    pretrained = GPT2LMHeadModel.from_pretrained(saved)
    assert res["pretrained_val_loss"] == pytest.approx(
        _heldout_loss_reference(pretrained, chunks), rel=1e-5)
    assert res["config"]["val_files"] == list(code.val_files)
    runs = res["runs"]
    assert set(runs) == {"adamw lr=0.0001", "adamw lr=0.001", "kfac"}
    for run in runs.values():
        assert run["val_curve"][0][2] == res["pretrained_val_loss"]
        assert [row[0] for row in run["val_curve"]] == [0, 2, 4] and run["steps"] == steps
    best = min((1e-4, 1e-3), key=lambda lr: runs[f"adamw lr={lr:g}"]["final_val_loss"])
    assert res["best_adamw_lr"] == best
    assert res["target_val_loss"] == runs[f"adamw lr={best:g}"]["final_val_loss"]
    assert runs["kfac"]["hparams"] == {"lr": best, "weight_decay": 0.0}  # the swap-in
    kfac_vals = [v for _, _, v in runs["kfac"]["val_curve"]]
    assert res["kfac_never_above_pretrained"] == (max(kfac_vals) <= kfac_vals[0])
    for name, run in runs.items():
        hit = reach(run["val_curve"], res["target_val_loss"])
        assert res["steps_to_target"][name] == (hit and hit[0])
    tuned = GPT2LMHeadModel.from_pretrained(tmp_path / "a" / "kfac_model")
    assert runs["kfac"]["final_val_loss"] == pytest.approx(
        _heldout_loss_reference(tuned, chunks), rel=1e-5)
    assert "pretrained model's held-out loss on the sources (step 0)" in printed
    assert "check: K-FAC's held-out loss never above the pretrained model's" in printed

    # A rerun with the same settings loads the cached weights: same step-0 loss.
    again = main([*argv, "--out", str(tmp_path / "b")])
    assert again["pretrain"]["cached"] and again["pretrain"]["key"] == res["pretrain"]["key"]
    assert again["pretrained_val_loss"] == res["pretrained_val_loss"]
    for bad in (["--task", "lm", "--pretrain-steps", "3"],
                ["--task", "finetune", "--damping", "0.1"],
                ["--task", "finetune", "--optimizers", "kfac"],
                ["--task", "finetune", "--finetune-lrs", "0,1e-3"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
