"""K-FAC-expand is exact for deep linear networks in the expand setting (Eschenhagen et al.
2023, Dangel et al. 2025): with type-2 statistics (backpropagating the columns of the
output-Hessian square root, here MSE with H = I) each layer's A (x) G equals that layer's
block of the GGN of the mean loss. Checked through the exactly-damped preconditioned
gradient against (GGN_block + lambda I)^{-1} vec(V), the GGN built with torch.func.jacrev.
Tolerance: float64 round-off, rtol=1e-7.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import jacrev

from kfac_optim import KFACPreconditioner

DAMPING = 1e-3


def _forward(wbs, x):
    h = x
    for wb in wbs:
        h = h @ wb[:, :-1].T + wb[:, -1]
    return h


@pytest.mark.parametrize("layer_index", [0, 1, 2])
def test_type2_kfac_expand_equals_ggn_block_of_deep_linear_network(layer_index):
    torch.manual_seed(0)
    dims = [4, 5, 3, 2]
    model = nn.Sequential(*[nn.Linear(i, o) for i, o in zip(dims, dims[1:], strict=False)]
                          ).double()
    x = torch.randn(3, 4, dims[0], dtype=torch.float64)   # 3 sequences x 4 tokens
    y = torch.randn(3, 4, dims[-1], dtype=torch.float64)
    rows = 12  # the loss is the mean over tokens of 0.5 ||f - y||^2

    wbs = [torch.cat([m.weight, m.bias[:, None]], 1).detach() for m in model]

    def f_of(wb):
        ws = list(wbs)
        ws[layer_index] = wb
        return _forward(ws, x)

    jac = jacrev(f_of)(wbs[layer_index])                 # (3, 4, C, o, d+1)
    o, d1 = wbs[layer_index].shape
    jac = jac.reshape(-1, o * d1)
    ggn = jac.T @ jac / rows                              # row-major vec of [W | b]

    pre = KFACPreconditioner(model, damping=DAMPING, factor_update_steps=1,
                             inv_update_steps=1, kl_clip=None, loss_reduction="sum")
    out = model(x)
    for c in range(dims[-1]):  # type-2: backprop each column of H^{1/2} = I, summed loss
        out[..., c].sum().backward(retain_graph=c < dims[-1] - 1)
    pre.capture_enabled = False
    model.zero_grad()
    (0.5 * ((model(x) - y) ** 2).sum() / rows).backward()
    layer = model[layer_index]
    v = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
    pre.step()
    got = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
    ref = torch.linalg.solve(ggn + DAMPING * torch.eye(o * d1, dtype=torch.float64),
                             v.reshape(-1)).reshape(o, d1)
    torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-9)
