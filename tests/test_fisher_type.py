"""fisher_type "mc" and "type2" (docs/design.md, "Fisher type for G"; kfac_optim.fisher).

References, built here in float64: the type-2 G of a layer is
(1/N) sum_rows J_row^T H_row J_row, with J_row the Jacobian (torch.func) of the row's logits
with respect to the layer output and H_row = diag(p) - p p^T (softmax cross-entropy) or I
(0.5 ||f - y||^2); for a Hugging Face causal LM the same through torch.func.vjp with explicit
per-token Hessian square roots. Tolerances: float64 round-off (rtol 1e-10) for exact paths;
the Monte-Carlo mean within 5 standard errors (estimated from the draws) per entry.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev, vjp

from kfac_optim import KFACPreconditioner
from kfac_optim.fisher import TYPE2_MAX_OUTPUTS, output_vectors, sample_targets
from tests.launch import TORCHRUN_2, launch

WORKER = Path(__file__).with_name("fisher_worker.py")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _type2_g_reference(model, x):
    """Type-2 G of both Linear layers of ``_mlp`` for inputs ``x`` (N, 4): explicit
    Jacobians of the logits with respect to each layer's output, row by row."""
    w1, b1, w2, b2 = (p.detach() for p in model.parameters())
    gs = [torch.zeros(5, 5, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64)]
    for row in x:
        h1 = row @ w1.T + b1
        logits = torch.tanh(h1) @ w2.T + b2
        p = torch.softmax(logits, -1)
        hess = torch.diag(p) - torch.outer(p, p)
        j1 = jacrev(lambda h: torch.tanh(h) @ w2.T + b2)(h1)  # (3, 5)
        gs[0] += j1.T @ hess @ j1
        gs[1] += hess  # the last layer's output is the logits
    return [g / x.shape[0] for g in gs]


def _run(model, x, fisher_type, *, mask=None, generator=None, **kw):
    """One factor update (decay 0: the running G is this batch's G); returns the Gs."""
    pre = KFACPreconditioner(model, fisher_type=fisher_type, factor_update_steps=1,
                             factor_decay=0.0, kl_clip=None, **kw)
    out = model(x)
    assert pre.fisher_backward(out, "categorical", mask=mask, generator=generator)
    F.cross_entropy(out, torch.zeros(x.shape[0], dtype=torch.long)).backward()
    pre.step()
    gs = [layer.G.clone() for layer in pre.layers.values()]
    for h in pre._handles:
        h.remove()
    model.zero_grad()
    return gs


def test_type2_g_equals_explicit_jacobian_reference():
    model = _mlp()
    x = torch.randn(7, 4, dtype=torch.float64)
    for got, ref in zip(_run(model, x, "type2"), _type2_g_reference(model, x), strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-13)


def test_mc_mean_over_draws_equals_type2_within_standard_error():
    # 2000 independent draws (one factor update each, decay 0) on the same 6 rows: the mean
    # of the sampled G is within 5 standard errors of the type-2 G, entry by entry
    model = _mlp()
    x = torch.randn(6, 4, dtype=torch.float64)
    ref = _type2_g_reference(model, x)
    gen = torch.Generator().manual_seed(1)
    pre = KFACPreconditioner(model, fisher_type="mc", factor_update_steps=1, factor_decay=0.0,
                             kl_clip=None, inv_update_steps=10**6)
    draws = [[], []]
    for _ in range(2000):
        out = model(x)
        assert pre.fisher_backward(out, generator=gen)
        pre.step()
        for d, layer in zip(draws, pre.layers.values(), strict=True):
            d.append(layer.G.clone())
    for d, r in zip(draws, ref, strict=True):
        d = torch.stack(d)
        mean, se = d.mean(0), d.std(0) / len(d) ** 0.5
        assert (se > 0).all()
        assert ((mean - r).abs() <= 5 * se).all(), ((mean - r).abs() / se).max()
        assert (mean - r).abs().max() < 0.1 * r.abs().max()  # and close in absolute terms


def test_sample_targets_follow_the_predictive_distribution():
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 0.0, -1.0]], dtype=torch.float64).expand(40000, 3)
    y = sample_targets(logits, "categorical", gen)
    assert y.shape == (40000,) and y.dtype == torch.long
    freq = torch.bincount(y, minlength=3).double() / 40000
    p = torch.softmax(logits[0], -1)
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / 40000).sqrt()).all()
    z = sample_targets(logits, "gaussian", gen)
    assert z.shape == logits.shape
    noise = z - logits  # N(0, 1): mean within 5 / sqrt(40000), variance within 0.05
    assert noise.mean(0).abs().max() < 5 / 200 and (noise.var(0) - 1).abs().max() < 0.05


def test_type2_vectors_are_a_square_root_of_the_output_hessian():
    logits = torch.randn(2, 3, 5, dtype=torch.float64)
    v = torch.stack(list(output_vectors(logits, "categorical", "type2")))  # (5, 2, 3, 5)
    p = torch.softmax(logits, -1)
    hess = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    torch.testing.assert_close(torch.einsum("kbti,kbtj->btij", v, v), hess, rtol=1e-12,
                               atol=1e-14)
    g = torch.stack(list(output_vectors(logits, "gaussian", "type2")))
    torch.testing.assert_close(torch.einsum("kbti,kbtj->btij", g, g),
                               torch.eye(5, dtype=torch.float64).expand(2, 3, 5, 5))


def _gpt2(vocab=11):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=8, n_embd=8, n_layer=1,
                                  n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).double().train()


def _lm_batch(vocab=11):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (2, 6), generator=g)
    attention = torch.ones(2, 6, dtype=torch.long)
    attention[1, 4:] = 0  # right padding
    labels = ids.clone()
    labels[attention == 0] = -100
    labels[0, 2] = -100  # an ignored label inside the sequence
    return ids, attention, labels


def test_type2_causal_lm_equals_per_token_hessian_square_root_reference():
    """type2 backpropagates C vectors, vector k holding column k of every loss term's S_t
    (S_t S_t^T = H_t = diag(p_t) - p_t p_t^T): G = (1/N) sum_k sum_rows g_k g_k^T. For a
    layer whose output rows each reach one loss term (lm_head, the last block's MLP) this is
    (1/N) sum_t sum_k of the per-term rows, the expectation of the "mc" G; for a layer
    mixed across positions by attention (c_attn) it also holds the cross terms
    J_t^T S_t S_t'^T J_t' between loss terms t != t' (docs/design.md, "Fisher type for G")."""
    model = _gpt2()
    ids, attention, labels = _lm_batch()
    names = ["lm_head", "transformer.h.0.mlp.c_fc", "transformer.h.0.attn.c_attn"]
    modules = dict(model.named_modules())
    valid = labels[:, 1:] != -100  # logits at t predict label t + 1
    n = int(valid.sum())
    rows = attention.bool()  # padding rows do not count
    combined, per_term = {}, {}
    for name in names:
        module = modules[name]
        captured = []
        h = module.register_forward_hook(lambda m, i, o, out=captured: out.append(o.detach()))
        model(input_ids=ids, attention_mask=attention)
        h.remove()

        def logits_of(out, module=module):
            handle = module.register_forward_hook(lambda m, i, o: out)
            try:
                return model(input_ids=ids, attention_mask=attention).logits
            finally:
                handle.remove()

        logits, pullback = vjp(logits_of, captured[0])
        p = torch.softmax(logits.detach(), -1)
        c, o = p.shape[-1], captured[0].shape[-1]
        roots = {(b, t): torch.diag(p[b, t].sqrt()) - torch.outer(p[b, t], p[b, t].sqrt())
                 for b, t in valid.nonzero().tolist()}
        g_comb = torch.zeros(o, o, dtype=torch.float64)
        g_term = torch.zeros(o, o, dtype=torch.float64)
        for k in range(c):
            vec = torch.zeros_like(logits)
            for (b, t), s in roots.items():
                one = torch.zeros_like(logits)
                one[b, t] = s[:, k]
                vec += one
                (grad,) = pullback(one)
                g_term += grad[rows].T @ grad[rows]
            (grad,) = pullback(vec)
            g_comb += grad[rows].T @ grad[rows]
        combined[name], per_term[name] = g_comb / n, g_term / n
    empirical = copy.deepcopy(model)
    pre = KFACPreconditioner(model, fisher_type="type2", factor_update_steps=1, kl_clip=None)
    pre_emp = KFACPreconditioner(empirical, factor_update_steps=1, kl_clip=None)
    for m, p_ in ((model, pre), (empirical, pre_emp)):
        m(input_ids=ids, attention_mask=attention, labels=labels).loss.backward()  # automatic
        p_.step()
    for name in names:
        torch.testing.assert_close(pre.layers[name].G, combined[name], rtol=1e-10, atol=1e-14)
        # A is the forward's, unchanged by the Fisher type
        torch.testing.assert_close(pre.layers[name].A, pre_emp.layers[name].A, rtol=0, atol=0)
        assert not torch.allclose(pre.layers[name].G, pre_emp.layers[name].G)
    for name in names[:2]:
        torch.testing.assert_close(combined[name], per_term[name], rtol=1e-10, atol=1e-14)
    assert not torch.allclose(combined[names[2]], per_term[names[2]], rtol=1e-3)


@pytest.mark.parametrize("fisher_type", ["mc", "type2"])
def test_extra_backward_leaves_grads_and_runs_only_at_factor_updates(fisher_type):
    model = _gpt2()
    twin = copy.deepcopy(model)
    ids, attention, labels = _lm_batch()
    pre = KFACPreconditioner(model, fisher_type=fisher_type, factor_update_steps=3,
                             kl_clip=None, fisher_seed=0)
    ref = KFACPreconditioner(twin, factor_update_steps=3, kl_clip=None)
    for step in range(6):
        model.zero_grad()
        twin.zero_grad()
        rng = torch.get_rng_state()
        model(input_ids=ids, attention_mask=attention, labels=labels).loss.backward()
        # the global RNG is untouched (fisher_seed's generator samples), at every step
        assert torch.equal(rng, torch.get_rng_state())
        twin(input_ids=ids, attention_mask=attention, labels=labels).loss.backward()
        for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad), name  # bit-identical: the user's gradients
        before = pre.describe()[0]["factor_updates"]
        pre.step()
        ref.step()
        updated = pre.describe()[0]["factor_updates"] - before
        assert updated == (1 if step % 3 == 0 else 0)


def test_explicit_call_runs_only_at_factor_update_steps():
    model = _mlp()
    x = torch.randn(4, 4, dtype=torch.float64)
    pre = KFACPreconditioner(model, fisher_type="mc", factor_update_steps=2, kl_clip=None)
    for step in range(5):
        out = model(x)
        rng = torch.get_rng_state()
        assert pre.fisher_backward(out) == (step % 2 == 0)  # global RNG (no fisher_seed)
        assert torch.equal(rng, torch.get_rng_state()) == (step % 2 == 1)
        F.cross_entropy(out, torch.zeros(4, dtype=torch.long)).backward()
        pre.step()
        model.zero_grad()
    assert pre.describe()[0]["factor_updates"] == 3


def test_mc_global_rng_without_seed_and_sequence_classifier_automatic():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                                  num_labels=3, pad_token_id=0, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2ForSequenceClassification(cfg).double().train()
    pre = KFACPreconditioner(model, fisher_type="mc", factor_update_steps=1, kl_clip=None)
    ids = torch.randint(1, 11, (4, 5))
    rng = torch.get_rng_state()
    model(input_ids=ids, labels=torch.tensor([0, 2, 1, 1])).loss.backward()
    assert not torch.equal(rng, torch.get_rng_state())  # sampled from the global RNG
    pre.step()
    assert pre.layers["score"].G is not None and pre.layers["score"].G.norm() > 0


def test_missing_fisher_backward_is_refused_at_step():
    model = _mlp()
    pre = KFACPreconditioner(model, fisher_type="mc", factor_update_steps=1, kl_clip=None)
    F.cross_entropy(model(torch.randn(3, 4, dtype=torch.float64)),
                    torch.tensor([0, 1, 2])).backward()
    with pytest.raises(RuntimeError, match="fisher_backward"):
        pre.step()


def test_gaussian_likelihood_and_mask():
    # masked rows add nothing; the Gaussian type-2 G of the last layer is (rows kept) / N
    model = _mlp()
    x = torch.randn(5, 4, dtype=torch.float64)
    mask = torch.tensor([1, 1, 0, 1, 0])
    pre = KFACPreconditioner(model, fisher_type="type2", factor_update_steps=1,
                             factor_decay=0.0, kl_clip=None)
    pre.set_token_mask(None, num_loss_rows=3)
    out = model(x)
    pre.fisher_backward(out, "gaussian", mask=mask)
    pre.step()
    torch.testing.assert_close(pre.layers["2"].G, torch.eye(3, dtype=torch.float64),
                               rtol=1e-12, atol=1e-14)


def test_bad_values_are_refused():
    model = _mlp()
    with pytest.raises(ValueError, match="fisher_type='foo'.*'empirical', 'mc', 'type2'"):
        KFACPreconditioner(model, fisher_type="foo")
    with pytest.raises(ValueError, match="fisher_seed"):
        KFACPreconditioner(model, fisher_type="mc", fisher_seed=-1)
    pre = KFACPreconditioner(model, fisher_type="mc", factor_update_steps=1, kl_clip=None)
    with pytest.raises(ValueError, match="likelihood='poisson'.*'categorical', 'gaussian'"):
        pre.fisher_backward(model(torch.randn(2, 4, dtype=torch.float64)), "poisson")
    wide = nn.Linear(3, TYPE2_MAX_OUTPUTS + 1).double()
    pre = KFACPreconditioner(wide, fisher_type="type2", factor_update_steps=1, kl_clip=None)
    with pytest.raises(ValueError, match="fisher_type='type2'.*1025.*fisher_type='mc'"):
        pre.fisher_backward(wide(torch.randn(2, 3, dtype=torch.float64)))


def test_two_ranks_equal_single_process(tmp_path):
    r = launch(TORCHRUN_2, WORKER, [str(tmp_path / "out.json")], tmp_path / "out.json")
    for kind in ("type2", "mc"):
        assert r[kind]["G_norm"] > 1e-3
        assert r[kind]["factors"] < 1e-12 and r[kind]["grads"] < 1e-10, (kind, r[kind])
    assert r["mc-swapped-seeds"]["factors"] > 1e-4  # the per-rank seeds matter


def test_type2_ignores_loss_scaling_accumulation_and_grad_scaler():
    # the extra backward is of the summed per-row loss, unscaled: two micro-batches
    # (accumulation_steps=2, a mean loss divided by 2, a GradScaler at 2**10) give the G of
    # one forward on the whole batch; A is unchanged too
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    whole = _mlp()
    ref = _run(whole, x, "type2")
    model = _mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    pre = KFACPreconditioner(model, fisher_type="type2", factor_update_steps=1,
                             factor_decay=0.0, kl_clip=None, accumulation_steps=2,
                             grad_scaler=scaler)
    for half in (slice(0, 3), slice(3, 6)):
        out = model(x[half])
        assert pre.fisher_backward(out)
        scaler.scale(F.cross_entropy(out, y[half]) / 2).backward()
    scaler.unscale_(torch.optim.SGD(model.parameters(), lr=0.0))
    pre.step()
    for got, r in zip([layer.G for layer in pre.layers.values()], ref, strict=True):
        torch.testing.assert_close(got, r, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(pre.layers["0"].A, _a_of(x), rtol=1e-12, atol=1e-14)


def _a_of(x):
    rows = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    return rows.T @ rows / x.shape[0]


def test_activation_checkpointing_gives_the_same_g():
    # a recomputed forward (inside the backward) is not a new capture: the G of the first
    # forward's outputs, equal to the run without checkpointing; no missed-pass error
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self, mlp):
            super().__init__()
            self.mlp = mlp

        def forward(self, x):
            h = checkpoint(lambda z: self.mlp[1](self.mlp[0](z)), x, use_reentrant=False)
            return self.mlp[2](h)

    x = torch.randn(6, 4, dtype=torch.float64)
    ref = _run(_mlp(), x, "type2")
    got = _run(Checkpointed(_mlp()), x, "type2")
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-14)
