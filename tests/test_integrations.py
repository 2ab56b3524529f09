"""Hugging Face Trainer recipe (KFACTrainer), single process."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from kfac_optim import KFAC, KFACPreconditioner

transformers = pytest.importorskip("transformers")


def _model():
    cfg = transformers.GPT2Config(vocab_size=20, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def _examples():
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(8):
        ids = torch.randint(1, 20, (10,), generator=g)
        mask = torch.ones(10, dtype=torch.long)
        mask[10 - (i % 4) * 2:] = 0  # 0, 2, 4 or 6 padding tokens
        rows.append({"input_ids": ids, "attention_mask": mask,
                     "labels": ids.masked_fill(mask == 0, -100)})
    return rows


def _factors(pre):
    return {n: (layer.A, layer.G) for n, layer in pre.layers.items()}


def test_trainer_accumulation_matches_one_batch_and_eval_leaves_factors(tmp_path):
    from kfac_optim.integrations.transformers import KFACTrainer

    model = _model()
    ref_model = copy.deepcopy(model)
    data = _examples()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
        max_steps=1, learning_rate=0.05, report_to=[], save_strategy="no", use_cpu=True,
        logging_strategy="no", per_device_eval_batch_size=4, seed=0)
    kfac_kwargs = dict(factor_update_steps=1, inv_update_steps=1, damping=1e-2, kl_clip=1e-2)
    trainer = KFACTrainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                          kfac_kwargs=kfac_kwargs)
    trainer.train()
    wrapped = trainer.optimizer  # Trainer prepares it: accelerate's AcceleratedOptimizer
    opt = wrapped.optimizer
    assert isinstance(opt, KFAC)

    ref = KFACPreconditioner(ref_model, factor_update_steps=1, inv_update_steps=1,
                             kl_clip=None)
    batch = {k: torch.stack([r[k] for r in data]) for k in data[0]}
    ref_model(**batch).loss.backward()
    ref.step()
    got, want = _factors(opt.preconditioner), _factors(ref)
    assert set(got) == set(want)
    # GPT-2's position table is looked up with ids shared by the batch: base update only
    assert got.pop("transformer.wpe") == (None, None) == want.pop("transformer.wpe")
    for name in want:
        for g, w in zip(got[name], want[name], strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)

    before = copy.deepcopy(opt.preconditioner.state_dict())
    trainer.evaluate()  # Trainer calls optimizer.eval() through the wrapper
    assert not opt.preconditioner.capture_enabled
    after = opt.preconditioner.state_dict()
    for name, layer in before["layers"].items():
        if layer["A"]["ema"] is not None:
            assert torch.equal(layer["A"]["ema"], after["layers"][name]["A"]["ema"])
    wrapped.train()
    assert opt.preconditioner.capture_enabled


def test_trainer_refuses_second_optimizer(tmp_path):
    from kfac_optim.integrations.transformers import KFACTrainer

    model = _model()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="kfac_kwargs"):
        KFACTrainer(model=model, args=args, train_dataset=_examples(), optimizers=(sgd, None))


def test_trainer_lr_and_adam_settings_come_from_the_arguments(tmp_path):
    from kfac_optim.integrations.transformers import KFACTrainer

    assert transformers.TrainingArguments(output_dir=str(tmp_path)).learning_rate == 5e-5
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = KFACTrainer(model=_model(), args=args, train_dataset=_examples(),
                          kfac_kwargs=dict(base="sgd"))
    with pytest.warns(UserWarning, match="default learning_rate"):  # sgd wants its own lr
        trainer.create_optimizer()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                          adam_beta1=0.8, adam_epsilon=1e-6, weight_decay=0.01)
    trainer = KFACTrainer(model=_model(), args=args, train_dataset=_examples(),
                          kfac_kwargs=dict(base="adamw"))
    group = trainer.create_optimizer().param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (
        5e-5, (0.8, 0.999), 1e-6, 0.01)


@pytest.mark.parametrize("base", [None, "sgd", "adamw", "grafting"])
def test_trainer_warns_on_default_lr_exactly_for_bases_that_need_another_scale(tmp_path, base):
    """A real Trainer from a GPT-2 config at Trainer's default learning_rate: the warning
    fires for the SGD-momentum base only (None: KFAC's default base, whatever it is), and
    never once the lr is set, through TrainingArguments or kfac_kwargs."""
    import inspect
    import warnings

    from kfac_optim.base import BASES
    from kfac_optim.integrations.transformers import (
        LR_MEANING,
        KFACTrainer,
        trainer_default_lr,
    )

    assert set(LR_MEANING) == set(BASES)  # a new base must say what an lr means for it
    assert trainer_default_lr() == 5e-5
    resolved = base or inspect.signature(KFAC.__init__).parameters["base"].default
    kfac_kwargs = {} if base is None else dict(base=base)

    def messages(learning_rate=None, **extra):
        kw = {} if learning_rate is None else dict(learning_rate=learning_rate)
        args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[],
                                              use_cpu=True, **kw)
        trainer = KFACTrainer(model=_model(), args=args, train_dataset=_examples(),
                              kfac_kwargs=dict(kfac_kwargs, **extra))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt = trainer.create_optimizer()
        assert opt.param_groups[0]["lr"] == extra.get("lr", learning_rate or 5e-5)
        assert opt.param_groups[0]["base"] == resolved
        return [str(w.message) for w in caught if "default learning_rate" in str(w.message)]

    got = messages()
    if resolved == "sgd":
        (msg,) = got
        assert "base='sgd'" in msg and "0.1-1" in msg
    else:
        assert got == []
    assert messages(learning_rate=0.3) == []
    assert messages(lr=5e-5) == []  # set explicitly through kfac_kwargs


def _launch(cmd, tmp_path, extra):
    from tests.launch import ROOT, launch

    args = ["--cpu", "--steps", "6", "--resume-check", "--out", str(tmp_path),
            "--batch-size", "4", "--seq-len", "32", "--n-embd", "32", *extra]
    return launch(cmd, ROOT / "examples" / "accelerate_train.py", args,
                  tmp_path / "accelerate_result.json", timeout=300)


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_accelerate_example_two_processes_resumes_exactly(launcher, tmp_path):
    """examples/accelerate_train.py on the demo LM under 2 real processes (gloo): DDP via
    accelerator.prepare(model, kfac), accumulate(), save_state/load_state resume exactly."""
    if launcher == "accelerate":
        cmd = ["accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        extra = []
    else:  # and gradient accumulation through accelerator.accumulate
        from tests.launch import TORCHRUN_2 as cmd
        extra = ["--grad-accum", "2"]
    result = _launch(cmd, tmp_path, extra)
    assert result["world_size"] == 2
    assert result["resume_max_param_diff"] == 0.0
    assert 0 < result["final_train_loss"] < 5.6  # below ln(257): it learns


def test_trainer_ddp_two_processes_matches_single_process(tmp_path):
    """KFACTrainer under DDP (torchrun, 2 gloo processes, CPU), gradient accumulation 2,
    ranks holding uneven valid tokens (tests/trainer_worker.py): factors and parameters after
    3 K-FAC steps equal a single-process KFAC run on each step's concatenated 8 examples, in
    float64 (measured 7e-15 / 3e-15; 1e-12 allowed). Dropping the x R loss correction moves
    the factors by 1.0, so the check is sharp. Trainer's optimizer.eval() stops capture
    during the evaluations run after every step."""
    from tests.launch import TORCHRUN_2, launch

    out = tmp_path / "trainer_ddp.json"
    results = launch(TORCHRUN_2, Path(__file__).with_name("trainer_worker.py"), [str(out)], out)
    for r in results:
        assert r["world_size"] == 2 and r["loss_divisor_ranks"] == 2
        assert r["factor_updates"] == 3  # one factor update per optimizer step, not per micro
        assert r["factors"] < 1e-12
        assert r["params"] < 1e-12
        assert r["moved"] > 0.1
        assert r["capture_during_eval"] == [False]
        assert not r["capturing_after_evaluate"] and r["pending_after_eval"] == 0
        # average_tokens_across_devices=False: per-rank token counts, no x R correction
        assert r["per_rank_items"]["loss_divisor_ranks"] == 1
        assert r["per_rank_items"]["factors"] < 1e-12
    rank0, rank1 = (r["micro_batch_tokens"] for r in results)
    assert sum(rank0) != sum(rank1) and len(set(rank0)) > 1  # uneven across ranks and micros
