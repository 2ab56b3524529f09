"""Cheaper steps (docs/design.md, "Cheaper steps"): subsampled factor statistics
(``factor_row_limit``), batched eigendecompositions of same-shape factors, and the first
inverse at the first factor update.

References are dense float64 quantities built here from the layer's own inputs and output
gradients (``tests.kfac_reference``); the subsample is checked statistically with its exact
sampling variance (sampling without replacement), at 5 standard errors per entry.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfac_optim.layer as layer_module
from kfac_optim import KFACPreconditioner
from kfac_optim.inverse import eigh_psd, eigh_psd_many
from tests.kfac_reference import grad_matrix, kron_exact, linear_rows, probe_layer

B, S, D_IN, O = 4, 16, 3, 4  # T = 64 rows, A (4, 4) with the bias column, G (4, 4)


class Tok(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D_IN, O)

    def forward(self, x):
        return self.lin(x)


def _data(seed=0, pad=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, D_IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, O, (B, S), generator=g)
    mask = torch.ones(B, S)
    if pad:
        mask[:, S - pad:] = 0
        x[:, S - pad:] = 1e3  # padding rows: would dominate any factor they entered
    return x, y, mask


def _loss_sum(model, x, y, mask):
    ce = F.cross_entropy(model(x).reshape(-1, O), y.reshape(-1), reduction="none")
    return (ce * mask.reshape(-1)).sum()


def _pre(model, **kw):
    return KFACPreconditioner(model, damping=0.1, kl_clip=None, factor_decay=0.0,
                              loss_reduction="sum", factor_update_steps=1,
                              inv_update_steps=10**6, **kw)


def _draw(pre, model, x, y, mask, num_loss_rows=None):
    """One factor update on the same batch; returns the batch factors (A, G)."""
    model.zero_grad()
    pre.set_token_mask(mask, num_loss_rows)
    _loss_sum(model, x, y, mask).backward()
    pre.step()
    view = pre.layers["lin"]
    return view.A.clone(), view.G.clone()


def _full_rows(model, x, y, mask):
    """Valid rows (T, d) of a and (T, o) of g, from the layer's recorded input and output
    gradient."""
    xs, gs = probe_layer(model.lin, lambda: _loss_sum(model, x, y, mask))
    a, g = linear_rows(xs, gs, bias=True)
    keep = mask.reshape(-1).bool()
    return a[keep], g[keep]


def _within_sampling_error(draws, rows, m, sigmas=5.0):
    """mean over ``draws`` of (1/m) sum_{t in S} x_t x_t^T against (1/T) sum_t x_t x_t^T,
    elementwise within ``sigmas`` standard errors of sampling m of T without replacement."""
    t = rows.shape[0]
    y = rows[:, :, None] * rows[:, None, :]  # (T, n, n) per-row outer products
    full = y.mean(0)
    var = y.var(0, unbiased=False) / m * (t - m) / (t - 1)
    mean = torch.stack(draws).mean(0)
    bound = sigmas * (var / len(draws)).sqrt() + 1e-12
    assert ((mean - full).abs() <= bound).all(), ((mean - full).abs() / bound).max()
    return full


@pytest.mark.parametrize("pad", [0, 6])
def test_subsampled_factors_are_unbiased_and_skip_padding(pad):
    torch.manual_seed(0)
    model = Tok().double()
    x, y, mask = _data(pad=pad)
    a_rows, g_rows = _full_rows(model, x, y, mask)
    t = a_rows.shape[0]
    limit = 6  # max(6, d = 4) = 6 of T rows, for A and for G (o = 4)
    pre = _pre(model, factor_row_limit=limit)
    model.zero_grad()
    pre.set_token_mask(mask)
    _loss_sum(model, x, y, mask).backward()
    layer = pre._layers["lin"]
    # the count the reduction across ranks sums is the full valid row count, not m
    assert float(layer.a.pending_count) == t and float(layer.g.pending_count) == t
    pre.step()
    draws_a, draws_g = [], []
    y_a = a_rows[:, :, None] * a_rows[:, None, :]
    lo, hi = y_a.min(0).values, y_a.max(0).values
    for _ in range(1500):
        a, g = _draw(pre, model, x, y, mask)
        # a mean of valid rows' outer products: a padding row (1e3) would leave this range
        assert ((a >= lo - 1e-12) & (a <= hi + 1e-12)).all()
        draws_a.append(a)
        draws_g.append(g)
    full_a = _within_sampling_error(draws_a, a_rows, limit)
    _within_sampling_error(draws_g, g_rows, limit)
    assert (draws_a[0] - full_a).abs().max() > 1e-3  # a draw is a subsample, not the full A


def test_subsampled_reduce_rows_skip_empty_sequences():
    """``kfac_approx="reduce"``: a row per sample (mean input, summed output gradient); the
    draw is over samples with a valid position, T their count."""
    torch.manual_seed(0)
    model = Tok().double()
    gen = torch.Generator().manual_seed(2)
    b = 24
    x = torch.randn(b, S, D_IN, generator=gen, dtype=torch.float64)
    y = torch.randint(0, O, (b, S), generator=gen)
    mask = torch.ones(b, S)
    mask[:4] = 0  # four empty sequences
    x[:4] = 1e3
    mask[4:, S - 3:] = 0
    xs, gs = probe_layer(model.lin, lambda: _loss_sum(model, x, y, mask))
    a, g = linear_rows(xs, gs, bias=True)
    m3 = mask.reshape(b, S, 1)
    a_red = (a.reshape(b, S, -1) * m3).sum(1)[4:] / m3.sum(1)[4:]
    g_red = (g.reshape(b, S, -1) * m3).sum(1)[4:]
    pre = _pre(model, factor_row_limit=6, kfac_approx="reduce")
    model.zero_grad()
    pre.set_token_mask(mask, num_loss_rows=b - 4)  # one loss term per (valid) sequence
    _loss_sum(model, x, y, mask).backward()
    assert float(pre._layers["lin"].a.pending_count) == b - 4
    pre.step()
    draws = [_draw(pre, model, x, y, mask, b - 4) for _ in range(1500)]
    _within_sampling_error([d[0] for d in draws], a_red, 6)
    _within_sampling_error([d[1] for d in draws], g_red, 6)


def test_row_limit_at_least_the_rows_is_exact():
    x, y, mask = _data(pad=6)
    out = {}
    for limit in (None, B * (S - 6), 10**6):  # T valid rows exactly, and more
        torch.manual_seed(0)
        model = Tok().double()
        out[limit] = _draw(_pre(model, factor_row_limit=limit), model, x, y, mask)
    for limit in (B * (S - 6), 10**6):
        assert torch.equal(out[limit][0], out[None][0])
        assert torch.equal(out[limit][1], out[None][1])


def test_row_limit_below_the_dimension_uses_the_dimension():
    """m = max(limit, n): a limit below the factor's dimension samples n rows (here all T
    when T <= n): with 3 rows per call and n = 4, nothing changes."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(1, 3, D_IN, generator=g, dtype=torch.float64), torch.randint(0, O, (1, 3))
    mask = torch.ones(1, 3)
    out = {}
    for limit in (None, 1):
        torch.manual_seed(0)
        model = Tok().double()
        out[limit] = _draw(_pre(model, factor_row_limit=limit), model, x, y, mask)
    assert torch.equal(out[1][0], out[None][0]) and torch.equal(out[1][1], out[None][1])


def test_woodbury_g_keeps_every_row():
    """A low-rank G's columns are its rows: never subsampled (A still is)."""
    x, y, mask = _data(pad=6)
    views = {}
    for limit in (None, 6):
        torch.manual_seed(0)
        model = Tok().double()
        pre = _pre(model, factor_row_limit=limit, inverse_policy="woodbury")
        a, _ = _draw(pre, model, x, y, mask)
        views[limit] = (a, pre.layers["lin"].G_factor.clone())
    assert views[6][1].shape[1] == B * (S - 6)
    assert torch.equal(views[6][1], views[None][1])
    assert not torch.equal(views[6][0], views[None][0])


@pytest.mark.parametrize("value, exc", [(0, ValueError), (-3, ValueError), ("8", TypeError),
                                        (2.5, TypeError), (True, TypeError)])
def test_row_limit_rejects_bad_values(value, exc):
    with pytest.raises(exc, match="factor_row_limit"):
        _pre(Tok(), factor_row_limit=value)


# Batched eigendecompositions ------------------------------------------------------
def _psd(n, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, 2 * n, generator=g, dtype=torch.float64)
    return m @ m.T / (2 * n)


def _rebuild(eig):
    s, q = eig
    return q @ torch.diag(s) @ q.T, s


def test_eigh_psd_many_equals_one_by_one_and_isolates_nan():
    mats = [_psd(5, 0), _psd(7, 1), _psd(5, 2), _psd(4, 3), _psd(5, 4), _psd(7, 5),
            _psd(5, 6).float()]
    mats[2] = mats[2].clone()
    mats[2][1, 3] = mats[2][3, 1] = float("nan")
    many = eigh_psd_many(mats)
    assert many[2] is None and eigh_psd(mats[2]) is None
    for i, (m, eig) in enumerate(zip(mats, many, strict=True)):
        if i == 2:
            continue
        one = eigh_psd(m)
        assert eig[0].dtype == m.dtype and eig[1].shape == m.shape
        tol = dict(rtol=1e-10, atol=1e-12) if m.dtype == torch.float64 else {}
        torch.testing.assert_close(_rebuild(eig)[0], _rebuild(one)[0], **tol)
        torch.testing.assert_close(eig[0], one[0], **tol)
        torch.testing.assert_close(_rebuild(eig)[0], m, **(tol or dict(rtol=1e-4, atol=1e-5)))
        assert eig[1]._base is None  # its own storage, not a view of the batch


class Stack(nn.Module):
    """Three 6 -> 6 layers (A and G of equal shapes across layers) and a 6 -> 3 head."""

    def __init__(self):
        super().__init__()
        self.l0, self.l1, self.l2 = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        for lin in (self.l0, self.l1, self.l2):
            x = torch.tanh(lin(x))
        return self.head(x)


def _stack_run(steps=4, corrupt=None, **kw):
    """Gradients after each step; ``corrupt``: a layer whose A turns NaN before the last
    step (the inverse update there must keep its last good inverse)."""
    torch.manual_seed(0)
    model = Stack().double()
    pre = KFACPreconditioner(model, damping=0.05, kl_clip=None, factor_update_steps=1,
                             inv_update_steps=2, factor_decay=0.8, **kw)
    g = torch.Generator().manual_seed(3)
    out = []
    for step in range(steps):
        x = torch.randn(32, 6, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (32,), generator=g)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if corrupt is not None and step == steps - 2:  # inverse update at steps - 2 (even)
            pre.state_dict()["layers"][corrupt]["A"]["ema"][0, 0] = float("nan")
        raw = {n: grad_matrix(m.weight, m.bias) for n, m in model.named_children()}
        kept = None if corrupt is None else pre.layers[corrupt].inverse
        pre.step()
        out.append((raw, {n: grad_matrix(m.weight, m.bias) for n, m in model.named_children()},
                    kept))
    return out, pre


def _one_by_one(mats, **kw):
    return [eigh_psd(m, **kw) for m in mats]


@pytest.mark.parametrize("kw", [dict(), dict(damping_mode="factored"),
                                dict(max_condition_number=50.0),
                                dict(eigenvalue_correction=True)])
def test_batched_inverses_equal_per_layer(monkeypatch, kw):
    batched, _ = _stack_run(**kw)
    monkeypatch.setattr(layer_module, "eigh_psd_many", _one_by_one)
    single, _ = _stack_run(**kw)
    for (_, got, _), (_, want, _) in zip(batched, single, strict=True):
        for name in got:
            torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-13)


def test_batched_inverse_matches_dense_reference_at_inverse_steps():
    torch.manual_seed(0)
    model = Stack().double()
    pre = KFACPreconditioner(model, damping_mode="exact", damping=0.05, kl_clip=None,
                             factor_update_steps=1, inv_update_steps=1, factor_decay=0.8)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        x = torch.randn(32, 6, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (32,), generator=g)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        raw = {n: grad_matrix(m.weight, m.bias) for n, m in model.named_children()}
        pre.step()
        for name, m in model.named_children():
            view = pre.layers[name]
            want = kron_exact(raw[name], view.A, view.G, 0.05)
            torch.testing.assert_close(grad_matrix(m.weight, m.bias), want,
                                       rtol=1e-9, atol=1e-12)


def test_nan_factor_in_a_batch_keeps_its_inverse_and_spares_the_others(monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="kfac_optim"):
        batched, pre = _stack_run(corrupt="l1")
    assert "K-FAC layer 'l1': eigendecomposition failed in float64; keeping the last good " \
        "inverse" in caplog.text
    raw, got, kept = batched[-2]  # the inverse-update step with l1's A NaN
    assert pre.layers["l1"].inverse is kept  # the last good inverse, unchanged
    assert torch.isfinite(got["l1"]).all()
    monkeypatch.setattr(layer_module, "eigh_psd_many", _one_by_one)
    clean, _ = _stack_run()
    single, _ = _stack_run(corrupt="l1")
    for name in ("l0", "l2", "head"):
        torch.testing.assert_close(got[name], single[-2][1][name], rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(got[name], clean[-2][1][name], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(got["l1"], single[-2][1]["l1"], rtol=1e-10, atol=1e-13)


# No cold start ------------------------------------------------------------------
@pytest.mark.parametrize("schedule", [(1, 10), (10, 100), (3, 7)])
def test_first_inverse_at_the_first_factor_update(schedule):
    """Step 0 captures, updates the factors and computes the inverse: its gradient is
    already preconditioned (not left raw until the first multiple of inv_update_steps)."""
    f, i = schedule
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    pre = KFACPreconditioner(model, damping_mode="exact", damping=0.1, kl_clip=None,
                             factor_update_steps=f, inv_update_steps=i)
    x = torch.randn(16, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    F.cross_entropy(model(x), y).backward()
    v = grad_matrix(model.weight, model.bias)
    pre.step()
    view = pre.layers[""] if "" in pre.layers else next(iter(pre.layers.values()))
    assert view.inverse is not None and view.factor_updates == 1
    want = kron_exact(v, view.A, view.G, 0.1)
    torch.testing.assert_close(grad_matrix(model.weight, model.bias), want,
                               rtol=1e-9, atol=1e-12)
    assert math.isfinite(view.diagnostics["cond_A"])
