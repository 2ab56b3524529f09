"""K-FAC-expand is exact for deep linear networks (Eschenhagen et al. 2023, Dangel et al.
2025) with type-2 statistics (``fisher_type="type2"``: the columns of the output-Hessian
square root backpropagated by the preconditioner): each layer's A (x) G equals that
layer's block of the GGN of the mean loss.

- MSE (H = I, ``likelihood="gaussian"``): the Jacobian of the output with respect to a
  layer's output is the same matrix for every row of a deep linear network, so this holds
  for any batch, here 3 sequences x 4 tokens (the expand setting: a loss per token).
- Softmax cross-entropy (H = diag(p) - p p^T depends on the row): exact with one row, the
  known exact case (a Kronecker product of sums is not a sum of Kronecker products).

Checked through the exactly-damped preconditioned gradient against
(GGN_block + lambda I)^{-1} vec(V), the GGN J^T H J built with torch.func.jacrev.
Tolerance: float64 round-off, rtol=1e-7.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev

from kfac_optim import KFACPreconditioner

DAMPING = 1e-3


def _forward(wbs, x):
    h = x
    for wb in wbs:
        h = h @ wb[:, :-1].T + wb[:, -1]
    return h


def _loss(out, y, likelihood, rows):
    if likelihood == "gaussian":  # the mean over rows of 0.5 ||f - y||^2
        return 0.5 * ((out - y) ** 2).sum() / rows
    return F.cross_entropy(out.reshape(rows, -1), y.reshape(-1))


@pytest.mark.parametrize("likelihood", ["gaussian", "categorical"])
@pytest.mark.parametrize("layer_index", [0, 1, 2])
def test_type2_kfac_expand_equals_ggn_block_of_deep_linear_network(layer_index, likelihood):
    torch.manual_seed(0)
    dims = [4, 5, 3, 2] if likelihood == "gaussian" else [4, 5, 3, 4]
    model = nn.Sequential(*[nn.Linear(i, o) for i, o in zip(dims, dims[1:], strict=False)]
                          ).double()
    shape = (3, 4) if likelihood == "gaussian" else (1,)  # rows: tokens, or a single row
    rows = int(torch.Size(shape).numel())
    x = torch.randn(*shape, dims[0], dtype=torch.float64)
    y = (torch.randn(*shape, dims[-1], dtype=torch.float64) if likelihood == "gaussian"
         else torch.randint(0, dims[-1], shape))

    wbs = [torch.cat([m.weight, m.bias[:, None]], 1).detach() for m in model]

    def f_of(wb):
        ws = list(wbs)
        ws[layer_index] = wb
        return _forward(ws, x)

    jac = jacrev(f_of)(wbs[layer_index])                 # (*shape, C, o, d+1)
    o, d1 = wbs[layer_index].shape
    jac = jac.reshape(rows, dims[-1], o * d1)
    if likelihood == "gaussian":
        hess = torch.eye(dims[-1], dtype=torch.float64).expand(rows, -1, -1)
    else:
        p = torch.softmax(_forward(wbs, x), -1).reshape(rows, -1)
        hess = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    ggn = torch.einsum("rci,rcd,rdj->ij", jac, hess, jac) / rows  # row-major vec of [W | b]

    pre = KFACPreconditioner(model, damping_mode="exact", damping=DAMPING, factor_update_steps=1,
                             inv_update_steps=1, kl_clip=None, fisher_type="type2")
    out = model(x)
    assert pre.fisher_backward(out, likelihood)
    _loss(out, y, likelihood, rows).backward()
    layer = model[layer_index]
    v = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
    pre.step()
    got = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
    ref = torch.linalg.solve(ggn + DAMPING * torch.eye(o * d1, dtype=torch.float64),
                             v.reshape(-1)).reshape(o, d1)
    torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-9)
