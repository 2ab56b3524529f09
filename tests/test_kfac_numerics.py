"""Preconditioned gradients vs dense float64 Kronecker references, per layer type.

Tolerance: float64 everywhere; eigendecomposition vs explicit ``kron`` solve agree to
round-off, asserted with rtol=1e-7, atol=1e-9 (relative to O(1) gradients).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from kfac_optim import KFACPreconditioner
from tests.kfac_reference import (
    conv_rows,
    factors,
    float64_default,  # noqa: F401 (autouse fixture)
    grad_matrix,
    kron_exact,
    kron_factored,
    linear_rows,
    probe_layer,
)

DAMPING = 3e-2
TOL = dict(rtol=1e-7, atol=1e-9)


@dataclass
class Case:
    """A model, the layer under test, a batch, and how the test builds reference rows."""

    model: nn.Module
    layer: nn.Module
    loss: Callable[[str], torch.Tensor]        # reduction -> loss
    rows: Callable[[torch.Tensor, torch.Tensor], tuple]  # (x, g) -> (a_rows, g_rows, T, N)
    grad: Callable[[], torch.Tensor]
    mask: torch.Tensor | None = None
    num_loss_rows: int | None = None
    last_run: tuple | None = None  # (preconditioner, reference lambda) of the last _run


def _ce(logits, y, mask, reduction):
    per_row = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                              reduction="none")
    if mask is not None:
        per_row = per_row * mask.reshape(-1)
    total = per_row.sum()
    if reduction == "sum":
        return total
    return total / (per_row.numel() if mask is None else mask.sum())


def mlp_case(bias: bool, which: int) -> Case:
    model = nn.Sequential(nn.Linear(5, 6, bias=bias), nn.Tanh(), nn.Linear(6, 3, bias=bias))
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    layer = model[which]
    return Case(model, layer, lambda r: _ce(model(x), y, None, r),
                lambda xi, g: (*linear_rows(xi, g, bias), 8, 8),
                lambda: grad_matrix(layer.weight, layer.bias))


def _seq_mask():
    mask = torch.ones(3, 4)
    mask[0, 3] = 0
    mask[2, 1:] = 0
    return mask


def sequence_case(which: int) -> Case:
    """3-D Linear with padding, per-token loss averaged over valid tokens."""
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y, mask = torch.randn(3, 4, 4), torch.randint(0, 3, (3, 4)), _seq_mask()
    layer = model[which]
    valid = mask.bool()
    t = int(mask.sum())

    def rows(xi, g):
        return (*linear_rows(xi[valid], g[valid], True), t, t)

    return Case(model, layer, lambda r: _ce(model(x), y, mask, r), rows,
                lambda: grad_matrix(layer.weight, layer.bias), mask=mask)


def conv_case() -> Case:
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=2)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(27, 4))
    x, y = torch.randn(3, 2, 7, 7), torch.randint(0, 4, (3,))
    return Case(model, conv, lambda r: _ce(model(x), y, None, r),
                lambda xi, g: (*conv_rows(xi, g, conv), 3 * 9, 3),
                lambda: grad_matrix(conv.weight, conv.bias))


def conv1d_case() -> Case:
    c1d = Conv1D(5, 4)  # nf=5 outputs, nx=4 inputs; weight (4, 5)
    nn.init.normal_(c1d.weight)
    nn.init.normal_(c1d.bias)
    model = nn.Sequential(c1d, nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(2, 3, 4), torch.randint(0, 3, (2, 3))
    return Case(model, c1d, lambda r: _ce(model(x), y, None, r),
                lambda xi, g: (*linear_rows(xi, g, True), 6, 6),
                lambda: grad_matrix(c1d.weight, c1d.bias, transpose=True))


def embedding_case() -> Case:
    emb = nn.Embedding(7, 4)
    model = nn.Sequential(emb, nn.Tanh(), nn.Linear(4, 3))
    ids, y, mask = torch.randint(0, 7, (3, 4)), torch.randint(0, 3, (3, 4)), _seq_mask()
    valid = mask.bool()
    t = int(mask.sum())

    def rows(xi, g):
        return F.one_hot(xi[valid], 7).to(torch.float64), g[valid], t, t

    return Case(model, emb, lambda r: _ce(model(ids), y, mask, r), rows,
                lambda: grad_matrix(emb.weight, None, transpose=True), mask=mask)


class _PoolClassifier(nn.Module):
    """Token Linear -> tanh -> masked mean pool -> Linear: one loss per sequence."""

    def __init__(self, mask):
        super().__init__()
        self.tok, self.head, self.mask = nn.Linear(4, 5), nn.Linear(5, 3), mask

    def forward(self, x):
        h = torch.tanh(self.tok(x)) * self.mask.unsqueeze(-1)
        return self.head(h.sum(1) / self.mask.sum(1, keepdim=True))


def pooled_case(approx: str) -> Case:
    """Weight sharing with a per-sequence loss: expand has T = tokens, N = sequences;
    reduce has one row per sequence (mean of a over valid positions, sum of g)."""
    mask = _seq_mask()
    model = _PoolClassifier(mask)
    x, y = torch.randn(3, 4, 4), torch.randint(0, 3, (3,))
    valid = mask.bool()

    def rows(xi, g):
        a, gr = linear_rows(xi, g * mask.unsqueeze(-1), True)
        if approx == "expand":
            return a[valid.reshape(-1)], gr[valid.reshape(-1)], int(mask.sum()), 3
        m = mask.unsqueeze(-1)
        a_n = torch.cat([(xi * m).sum(1) / m.sum(1), torch.ones(3, 1)], 1)
        return a_n, (g * m).sum(1), 3, 3

    return Case(model, model.tok, lambda r: _ce(model(x), y, None, r), rows,
                lambda: grad_matrix(model.tok.weight, model.tok.bias), mask=mask,
                num_loss_rows=3)


CASES = {
    "linear_bias_first": lambda: mlp_case(True, 0),
    "linear_bias_last": lambda: mlp_case(True, 2),
    "linear_nobias": lambda: mlp_case(False, 0),
    "sequence_padding_first": lambda: sequence_case(0),
    "sequence_padding_last": lambda: sequence_case(2),
    "conv2d_stride_pad_dilation": conv_case,
    "hf_conv1d": conv1d_case,
    "embedding_padding": embedding_case,
    "shared_positions_expand": lambda: pooled_case("expand"),
}


def _run(case: Case, damping_mode: str, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(K-FAC's preconditioned gradient, the explicit Kronecker solve) on ``case``; under
    ``damping_scale="relative"`` the reference lambda is DAMPING (tr(A)/d)(tr(G)/o)."""
    x, g = probe_layer(case.layer, lambda: case.loss("sum"))
    a_rows, g_rows, t, n = case.rows(x, g)
    a, gg = factors(a_rows, g_rows, t, n)
    lam = DAMPING
    if kwargs.get("damping_scale") == "relative":
        lam = DAMPING * (torch.trace(a) / a.shape[0] * torch.trace(gg) / gg.shape[0]).item()
    pre = KFACPreconditioner(case.model, damping=DAMPING, damping_mode=damping_mode,
                             factor_update_steps=1, inv_update_steps=1, kl_clip=None, **kwargs)
    case.model.zero_grad()
    if case.mask is not None:
        pre.set_token_mask(case.mask, num_loss_rows=case.num_loss_rows)
    case.loss("mean").backward()
    v = case.grad()
    pre.step()
    ref = (kron_exact if damping_mode == "exact" else kron_factored)(v, a, gg, lam)
    case.last_run = (pre, lam)
    return case.grad(), ref


@pytest.mark.parametrize("damping_mode", ["exact", "factored"])
@pytest.mark.parametrize("name", list(CASES))
def test_preconditioned_gradient_matches_kron_reference(name, damping_mode):
    torch.manual_seed(0)
    got, ref = _run(CASES[name](), damping_mode)
    torch.testing.assert_close(got, ref, **TOL)


@pytest.mark.parametrize("damping_mode", ["exact", "factored"])
def test_reduce_approximation_matches_reference(damping_mode):
    torch.manual_seed(1)
    got, ref = _run(pooled_case("reduce"), damping_mode, kfac_approx="reduce")
    torch.testing.assert_close(got, ref, **TOL)


def test_sum_reduction_uses_gradients_as_given():
    torch.manual_seed(2)
    case = mlp_case(True, 0)
    x, g = probe_layer(case.layer, lambda: case.loss("sum"))
    a, gg = factors(*linear_rows(x, g, True), 8, 8)
    pre = KFACPreconditioner(case.model, damping_mode="exact", damping=DAMPING,
                             factor_update_steps=1,
                             inv_update_steps=1, kl_clip=None, loss_reduction="sum")
    case.model.zero_grad()
    case.loss("sum").backward()
    v = case.grad()
    pre.step()
    torch.testing.assert_close(case.grad(), kron_exact(v, a, gg, DAMPING), **TOL)


def test_kl_clip_scale():
    """nu = min(1, sqrt(kl_clip / (lr^2 sum_layers <V_pre, V>))) (Ba et al. 2017)."""
    torch.manual_seed(3)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    layers = [model[0], model[2]]
    refs, vs = [], []
    for layer in layers:
        xi, g = probe_layer(layer, lambda: _ce(model(x), y, None, "sum"))
        a, gg = factors(*linear_rows(xi, g, True), 8, 8)
        refs.append(a), vs.append(gg)
    lr, kl_clip = 0.5, 1e-4
    pre = KFACPreconditioner(model, damping_mode="exact", damping=DAMPING, factor_update_steps=1,
                             inv_update_steps=1, kl_clip=kl_clip, lr=lr)
    _ce(model(x), y, None, "mean").backward()
    grads = [grad_matrix(m.weight, m.bias) for m in layers]
    pres = [kron_exact(v, a, gg, DAMPING) for v, a, gg in zip(grads, refs, vs, strict=True)]
    vfv = sum((p * v).sum() for p, v in zip(pres, grads, strict=True)) * lr**2
    nu = min(1.0, (kl_clip / vfv).sqrt().item())
    assert nu < 0.5, "test must exercise clipping"
    pre.step()
    for m, p in zip(layers, pres, strict=True):
        torch.testing.assert_close(grad_matrix(m.weight, m.bias), nu * p, **TOL)


def test_ema_bias_correction_over_steps():
    """Two factor updates with decay 0.5: A_hat = (d (1-d) A1 + (1-d) A2) / (1 - d^2)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    batches = [(torch.randn(8, 5), torch.randint(0, 3, (8,))) for _ in range(2)]
    decay = 0.5
    stats = []
    for x, y in batches:
        xi, g = probe_layer(model[0], lambda x=x, y=y: _ce(model(x), y, None, "sum"))
        stats.append(factors(*linear_rows(xi, g, True), 8, 8))
    w = (decay * (1 - decay), 1 - decay)
    a = (w[0] * stats[0][0] + w[1] * stats[1][0]) / (1 - decay**2)
    gg = (w[0] * stats[0][1] + w[1] * stats[1][1]) / (1 - decay**2)
    pre = KFACPreconditioner(model, damping_mode="exact", damping=DAMPING, factor_decay=decay,
                             factor_update_steps=1, inv_update_steps=1, kl_clip=None)
    for i, (x, y) in enumerate(batches):
        model.zero_grad()
        _ce(model(x), y, None, "mean").backward()
        v = grad_matrix(model[0].weight, model[0].bias)
        pre.step()
        if i == 0:  # first step uses exactly the first batch's factors
            torch.testing.assert_close(grad_matrix(model[0].weight, model[0].bias),
                                       kron_exact(v, *stats[0], DAMPING), **TOL)
    torch.testing.assert_close(grad_matrix(model[0].weight, model[0].bias),
                               kron_exact(v, a, gg, DAMPING), **TOL)


def test_module_called_twice_counts_rows_twice_and_loss_terms_once():
    """A Linear applied twice per forward: both calls' rows enter A (T = 2B) and G sums both
    calls' g g^T over the N = B loss terms (KFAC-expand over the two uses)."""
    torch.manual_seed(5)
    lin = nn.Linear(4, 4)
    head = nn.Linear(4, 3)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.head = lin, head

        def forward(self, x):
            return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))

    model = Twice()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    xs, eps = [], []

    def hook(mod, inputs, output):
        e = torch.zeros_like(output, requires_grad=True)
        xs.append(inputs[0].detach()), eps.append(e)
        return output + e

    h = lin.register_forward_hook(hook)
    gs = torch.autograd.grad(_ce(model(x), y, None, "sum"), eps)
    h.remove()
    a_rows = torch.cat([linear_rows(xi, g, True)[0] for xi, g in zip(xs, gs, strict=True)])
    g_rows = torch.cat(gs)
    a, gg = factors(a_rows, g_rows, 12, 6)
    pre = KFACPreconditioner(model, damping_mode="exact", damping=DAMPING, factor_update_steps=1,
                             inv_update_steps=1, kl_clip=None, skip_layers=("head",))
    _ce(model(x), y, None, "mean").backward()
    v = grad_matrix(lin.weight, lin.bias)
    pre.step()
    torch.testing.assert_close(grad_matrix(lin.weight, lin.bias), kron_exact(v, a, gg, DAMPING),
                               **TOL)
