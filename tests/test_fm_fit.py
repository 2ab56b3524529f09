"""``fisher_metrics.fit_factors`` and the report of a model without a saved K-FAC state.

References are written out here: ``A`` and ``G`` as explicit float64 sums of ``a a^T`` and
``g g^T`` with per-sample output gradients from ``torch.func``, the type-2 ``G`` from
explicit Jacobians and softmax Hessians, and a direct ``KFACPreconditioner`` capture (a
training-style backward and ``step()``) on Hugging Face models with padding.
"""

import json

import pytest
import torch
from torch import nn
from torch.func import grad, jacrev, vmap

import fisher_metrics as fm
import kfac_optim
from fisher_metrics.__main__ import main
from tests.fm_reference import DTYPE, dense_factors, mlp, mlp_batches, single_thread  # noqa: F401
from tests.fm_reference import tiny_gpt2 as tiny_gpt2_batch

FAST_CLI = ["--exact-max-iter", "4", "--slq-probes", "1", "--slq-steps", "4", "--hessian-k",
            "1", "--seq-len", "12", "--num-sequences", "4", "--batch-size", "2", "--no-progress"]


def _bias_column(x):
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def mlp_reference(model, batches):
    """Explicit factors of the 6-5-3 tanh MLP: A_l = (1/T) sum a a^T, G_l = (1/N) sum g g^T
    with g = d l_r / d z_l per sample (torch.func), and per-row z, Jacobians, probabilities."""
    (w1, b1), (w2, b2) = (model[0].weight, model[0].bias), (model[2].weight, model[2].bias)
    x = torch.cat([b[0] for b in batches]).detach()
    y = torch.cat([b[1] for b in batches])
    z1 = (x @ w1.T + b1).detach()

    def head(z):  # (5,) -> (3,)
        return torch.tanh(z) @ w2.T + b2

    def row_loss(z, label):
        return nn.functional.cross_entropy(head(z)[None], label[None])

    g1 = vmap(grad(row_loss))(z1, y)
    z2 = vmap(head)(z1).detach()
    g2 = torch.softmax(z2, -1) - nn.functional.one_hot(y, 3).to(DTYPE)
    a1, a2 = _bias_column(x), _bias_column(torch.tanh(z1))
    n = x.shape[0]
    return {
        "0": (a1.T @ a1 / n, g1.T @ g1 / n),
        "2": (a2.T @ a2 / n, g2.T @ g2 / n),
        "z1": z1, "z2": z2, "jac": vmap(jacrev(head))(z1).detach(),  # (R, 3, 5)
    }


def test_empirical_fit_equals_explicit_sums_and_a_direct_capture():
    model, batches = mlp(), mlp_batches("ce")
    before = [p.detach().clone() for p in model.parameters()]
    state = fm.fit_factors(model, batches, fisher="empirical")
    ref = mlp_reference(model, batches)
    rep = fm.KFACFisher.from_state_dict(state, model)
    for layer in ("0", "2"):
        A, G = ref[layer]
        factors = rep.factors(layer)
        torch.testing.assert_close(factors["A"], A, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(factors["G"], G, rtol=1e-12, atol=1e-14)
    # a training-style capture: mean loss over both batches, backward, step
    direct = mlp().train()  # the hooks capture in training mode
    pre = kfac_optim.KFACPreconditioner(direct, kl_clip=None, factor_update_steps=1)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    nn.functional.cross_entropy(direct(x), y).backward()
    pre.step()
    for layer in ("0", "2"):
        torch.testing.assert_close(rep.factors(layer)["A"], pre.layers[layer].A, rtol=1e-12,
                                   atol=1e-14)
        torch.testing.assert_close(rep.factors(layer)["G"], pre.layers[layer].G, rtol=1e-12,
                                   atol=1e-14)
    # capture only: parameters, .grad and the training flag untouched
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters()) and not model.training
    assert state["steps"] == 0 and state["fit"]["num_rows"] == 10
    assert state["fit"]["fisher"] == "empirical" and state["fit"]["num_batches"] == 2
    assert rep.provenance["source"] == "fitted"


def test_mc_fit_approaches_the_type2_g_within_its_sampling_error():
    """G_mc over M draws per row vs G_2 = (1/R) sum_r J_r^T H_r J_r, H_r = diag(p) - p p^T.

    Each row's draw gives X_r(y) = J_r^T (p_r - e_y)(p_r - e_y)^T J_r, E_y X_r = J_r^T H_r J_r;
    the estimate's exact standard deviation is sqrt(sum_r Var_y X_r / (M R^2)) per entry
    (the variance enumerated over the 3 classes). Seeded: deterministic.
    """
    model, batches = mlp(), mlp_batches("ce", sizes=(6,))
    draws = 300
    state = fm.fit_factors(model, batches * draws, fisher="mc", seed=3)
    ref = mlp_reference(model, batches)
    p = torch.softmax(ref["z2"], -1)  # (R, 3)
    rows = p.shape[0]
    eye = torch.eye(3, dtype=DTYPE)
    residual = p[:, None, :] - eye[None]  # (R, y, 3): p_r - e_y
    for layer, jac in (("2", eye.expand(rows, 3, 3)), ("0", ref["jac"])):
        g = torch.einsum("ryc,rcj->ryj", residual, jac)  # output gradients per row and label
        x = g[..., :, None] * g[..., None, :]  # (R, y, o, o)
        mean = torch.einsum("ry,ryij->rij", p, x)
        var = torch.einsum("ry,ryij->rij", p, x**2) - mean**2
        g2 = mean.mean(0)
        hess = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        torch.testing.assert_close(g2, torch.einsum("rci,rcd,rdj->ij", jac, hess, jac) / rows)
        sd = (var.sum(0) / (draws * rows**2)).sqrt()
        fitted = fm.KFACFisher.from_state_dict(state, model).factors(layer)["G"]
        z = (fitted - g2) / (sd + 1e-300)
        assert z.abs().max() < 4.5, z
        assert 0.2 < float((z**2).mean()) < 3.0  # the stated error is the actual one
        torch.testing.assert_close(fm.KFACFisher.from_state_dict(state, model).factors(layer)["A"],
                                   mlp_reference(model, batches)[layer][0])


def test_mc_fit_of_a_squared_error_head_approaches_the_identity():
    """0.5 ||f - y||^2 with y ~ N(f, I): g = f - y = -eps, so the last layer's type-2 G is I;
    entry (i, j) of the mean of M R draws of eps eps^T has variance (1 + [i = j]) / (M R)."""
    model, batches = mlp(), mlp_batches("mse", sizes=(5,))
    draws = 200
    state = fm.fit_factors(model, batches * draws, seed=4)  # float targets: loss "mse"
    assert state["fit"]["loss"] == "mse"
    G = fm.KFACFisher.from_state_dict(state, model).factors("2")["G"]
    sd = ((1 + torch.eye(3, dtype=DTYPE)) / (draws * 5)).sqrt()
    z = (G - torch.eye(3, dtype=DTYPE)) / sd
    assert z.abs().max() < 4.5 and 0.1 < float((z**2).mean()) < 3.0


def test_hf_fit_equals_a_preconditioner_capture_with_padding():
    """GPT-2 with a padded position (attention_mask 0, label -100): the empirical fit equals
    KFACPreconditioner's capture of ``model(**batch).loss.backward()``."""
    model, batch = tiny_gpt2_batch()
    state = fm.fit_factors(model, [batch], fisher="empirical", inverse_policy="eig")
    model.train()  # dropout probabilities are 0.1: compare with dropout off
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    pre = kfac_optim.KFACPreconditioner(model, kl_clip=None, factor_update_steps=1)
    model(**batch).loss.backward()
    pre.step()
    direct = pre.state_dict()
    assert set(state["layers"]) == set(direct["layers"])
    compared = 0
    for name, entry in direct["layers"].items():
        if entry["A"]["ema"] is None:
            continue  # wpe: ids shared across the batch, never a K-FAC block
        for ours, theirs in zip(dense_factors(state["layers"][name]), dense_factors(entry),
                                strict=True):
            # transformers' loss casts the logits to float32: the direct capture's g carries
            # float32 rounding (the fit's loss stays float64)
            torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=1e-9)
        compared += 1
    assert compared == 5
    assert state["fit"]["num_rows"] == 5  # 2 x 3 shifted labels, one of them padding


def _gpt2_dir(path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=257, n_positions=32,
                               bos_token_id=256, eos_token_id=256)).save_pretrained(path)
    return path


def _llama_dir(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=260,
                         max_position_embeddings=32, tie_word_embeddings=True,
                         bos_token_id=256, eos_token_id=256)
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("build", [_gpt2_dir, _llama_dir], ids=["gpt2", "llama_gqa_tied"])
def test_cli_fits_factors_without_a_state_and_saves_them(build, tmp_path):
    model_dir = build(tmp_path / "model")
    out, saved = tmp_path / "report", tmp_path / "factors.pt"
    argv = ["report", "--model", str(model_dir), "--out", str(out), *FAST_CLI]
    assert main([*argv, "--save-factors", str(saved)]) == 0
    result = json.loads((out / "report.json").read_text())
    assert result["meta"]["factors"]["source"] == "fitted"
    assert result["meta"]["factors"]["fisher"] == "mc"
    assert result["meta"]["factors"]["num_batches"] == 2
    assert "Factors: fitted" in (out / "report.md").read_text()
    head = result["table"][0]
    assert head["layer"] == "lm_head" and head["trace"] > 0 and head["exact_top_eigenvalue"] > 0
    assert head["tied_with"]  # wte / embed_tokens share the head's weight
    # the saved factors round-trip: a later report and a preconditioner read them
    state = torch.load(saved, map_location="cpu", weights_only=True)
    again = tmp_path / "again"
    assert main([*argv[:3], "--out", str(again), "--kfac-state", str(saved), *FAST_CLI]) == 0
    second = json.loads((again / "report.json").read_text())
    assert [r["trace"] for r in second["table"]] == [r["trace"] for r in result["table"]]
    assert second["meta"]["factors"]["source"] == "fitted"  # the saved provenance
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    pre = kfac_optim.KFACPreconditioner(model, inverse_policy="hybrid", kl_clip=None)
    pre.load_state_dict(state)
    rep = fm.KFACFisher.from_state_dict(state, model)
    for name in rep.layers:
        torch.testing.assert_close(pre.layers[name].A.double(), rep.factors(name)["A"])


def test_cli_empirical_fit_of_a_sequence_classifier(tmp_path, capsys):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=16, num_labels=3)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "bert")
    ids = torch.randint(0, 50, (6, 10))
    mask = torch.ones(6, 10, dtype=torch.long)
    mask[1, 7:] = 0
    data = {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (6,))}
    torch.save(data, tmp_path / "data.pt")
    out = tmp_path / "report"
    argv = ["report", "--model", str(tmp_path / "bert"), "--data", str(tmp_path / "data.pt"),
            "--out", str(out), "--fisher", "empirical", *FAST_CLI]
    assert main(argv) == 0
    result = json.loads((out / "report.json").read_text())
    assert result["meta"]["model"] == "BertForSequenceClassification"
    assert result["meta"]["factors"] == {**result["meta"]["factors"], "source": "fitted",
                                         "fisher": "empirical", "num_rows": 6, "num_batches": 3}
    layers = {row["layer"]: row for row in result["table"]}
    assert "classifier" in layers and layers["classifier"]["shape"] == [3, 17]
    with pytest.raises(SystemExit):  # text data makes causal-LM batches
        main(["report", "--model", str(tmp_path / "bert"), "--out", str(out)])
    assert "gives causal-LM text batches" in capsys.readouterr().err


def test_fit_factors_refuses_bad_input():
    model, batches = mlp(), mlp_batches("ce")
    with pytest.raises(ValueError, match="fisher must be one of"):
        fm.fit_factors(model, batches, fisher="true")
    with pytest.raises(ValueError, match="fisher='mc' samples targets"):
        fm.fit_factors(model, batches, loss=lambda out, y: (out**2).sum(-1))
    with pytest.raises(ValueError, match="fixed by fit_factors"):
        fm.fit_factors(model, batches, loss_reduction="mean")
    with pytest.raises(TypeError, match="model must be"):
        fm.fit_factors("model", batches)
    with pytest.raises(ValueError, match="captures no layer"):
        fm.fit_factors(nn.Sequential(nn.Linear(6, 3)).double().requires_grad_(False)
                       .append(nn.LayerNorm(3).double()), batches)
