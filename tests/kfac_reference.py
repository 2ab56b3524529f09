"""Dense float64 K-FAC references, built independently of kfac_optim.

Activations come from a plain forward hook; per-row output gradients of the *summed*
loss come from an additive zero probe ``s + eps`` differentiated with
``torch.autograd.grad``; conv patches are cut out by explicit loops (no ``unfold``);
embedding rows are explicit one-hot vectors; preconditioning solves the explicit
Kronecker system ``(A (x) G + lambda I) vec(X) = vec(V)``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn


@pytest.fixture(autouse=True)
def float64_default():
    """float64 as the default dtype for the test (autouse where a test module imports it)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def probe_layer(module: nn.Module, loss_sum_fn) -> tuple[Tensor, Tensor]:
    """Input of ``module`` and d(sum loss)/d(module output), from one call of ``loss_sum_fn``.

    Every call of the module in the forward is recorded: returns lists stacked along a
    new leading dim when the module is called more than once.
    """
    xs, eps = [], []

    def hook(mod, inputs, output):
        e = torch.zeros_like(output, requires_grad=True)
        xs.append(inputs[0].detach())
        eps.append(e)
        return output + e

    handle = module.register_forward_hook(hook)
    try:
        loss = loss_sum_fn()
    finally:
        handle.remove()
    grads = torch.autograd.grad(loss, eps)
    assert len(xs) == 1, "reference helper expects one call per forward"
    return xs[0], grads[0]


def linear_rows(x: Tensor, g: Tensor, bias: bool) -> tuple[Tensor, Tensor]:
    """(..., d), (..., o) -> rows (T, d [+1]), (T, o)."""
    a = x.reshape(-1, x.shape[-1])
    if bias:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
    return a, g.reshape(-1, g.shape[-1])


def conv_rows(x: Tensor, g: Tensor, conv: nn.Conv2d) -> tuple[Tensor, Tensor]:
    """Explicit im2col by loops over output positions: rows (B * L, C kh kw [+1]), (B * L, o)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, \
        conv.dilation
    xp = F.pad(x, (pw, pw, ph, ph))
    b, _, ho, wo = g.shape
    a_rows, g_rows = [], []
    for n in range(b):
        for i in range(ho):
            for j in range(wo):
                patch = xp[n, :, i * sh: i * sh + dh * (kh - 1) + 1: dh,
                           j * sw: j * sw + dw * (kw - 1) + 1: dw]
                row = patch.reshape(-1)
                if conv.bias is not None:
                    row = torch.cat([row, torch.ones(1, dtype=row.dtype)])
                a_rows.append(row)
                g_rows.append(g[n, :, i, j])
    return torch.stack(a_rows), torch.stack(g_rows)


def factors(a: Tensor, g: Tensor, t: float, n: float) -> tuple[Tensor, Tensor]:
    """A = (1/T) sum a a^T, G = (1/N) sum g g^T (rows already masked / selected)."""
    return a.T @ a / t, g.T @ g / n


def kron_exact(v: Tensor, a: Tensor, g: Tensor, damping: float) -> Tensor:
    """mat((A (x) G + lambda I)^{-1} vec(V)) with column-major vec, V: (o, d)."""
    o, d = v.shape
    m = torch.kron(a, g) + damping * torch.eye(o * d, dtype=v.dtype)
    x = torch.linalg.solve(m, v.T.reshape(-1))
    return x.reshape(d, o).T


def kron_factored(v: Tensor, a: Tensor, g: Tensor, damping: float) -> Tensor:
    """(G + lambda_G I)^{-1} V (A + lambda_A I)^{-1}, pi-split of Martens & Grosse (2015)."""
    o, d = v.shape
    pi = math.sqrt((torch.trace(a).item() / d) / (torch.trace(g).item() / o))
    lam_a, lam_g = pi * math.sqrt(damping), math.sqrt(damping) / pi
    left = torch.linalg.solve(g + lam_g * torch.eye(o, dtype=v.dtype), v)
    return torch.linalg.solve(a + lam_a * torch.eye(d, dtype=v.dtype), left.T).T


def grad_matrix(weight: Tensor, bias: Tensor | None, transpose: bool = False) -> Tensor:
    """Gradient as (o, d [+1]) from ``.grad`` (weight reshaped to (o, -1); HF Conv1D and
    Embedding weights are stored transposed)."""
    w = weight.grad.T if transpose else weight.grad.reshape(weight.shape[0], -1)
    if bias is None:
        return w.clone()
    return torch.cat([w, bias.grad.unsqueeze(1)], 1)
