"""Issue 11: attention layers.

fisher_metrics: the GGN, empirical and Monte-Carlo Fisher products on stock attention
modules (the eval-mode fast path has no forward-mode AD), against the dense float64
references of ``tests.fm_reference`` (explicit ``jacrev`` Jacobians and output Hessians).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fisher_metrics.operators import make_operator
from tests.fm_reference import DTYPE, Problem, single_thread  # noqa: F401

E, HEADS, CLASSES = 4, 2, 3


class Encoder(nn.Module):
    """A tiny ``nn.TransformerEncoderLayer`` (batch first: the fast path) and a linear head."""

    def __init__(self, norm_first: bool = False):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(E, HEADS, dim_feedforward=6, dropout=0.0,
                                              batch_first=True, norm_first=norm_first)
        self.head = nn.Linear(E, CLASSES)

    def forward(self, x):
        return self.head(self.enc(x))


class Attention(nn.Module):
    """Causal self-attention through a bare ``nn.MultiheadAttention`` (no weights returned)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, E)
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.head = nn.Linear(E, CLASSES)

    def forward(self, x):
        h = self.embed(x)
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
        out, _ = self.attn(h, h, h, attn_mask=mask, need_weights=False)
        return self.head(out)


def _batch(model: nn.Module, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    features = 3 if isinstance(model, Attention) else E
    x = torch.randn(2, 5, features, generator=generator, dtype=model.head.weight.dtype)
    y = torch.randint(0, CLASSES, (2, 5), generator=generator)
    return x, y


# --------------------------------------------------------------------------- fisher_metrics


CASES = {"encoder": Encoder, "encoder_norm_first": lambda: Encoder(norm_first=True),
         "mha_causal": Attention}


@pytest.mark.parametrize("curvature", ["ggn", "empirical_fisher", "fisher_mc"])
@pytest.mark.parametrize("case", list(CASES))
def test_curvature_products_on_attention_match_dense_reference(case, curvature):
    torch.manual_seed(0)
    model = CASES[case]().to(DTYPE)
    batch = _batch(model)
    names = [name for name, _ in model.named_parameters()]
    op = make_operator(model, [batch], curvature, mc_samples=2, seed=3)
    assert model.training and torch.backends.mha.get_fastpath_enabled()  # restored
    # the reference runs in training mode (dropout 0): never the fast path
    dense = Problem(model, names, [batch], "ce").dense(curvature, op)
    got = op.to_dense()
    assert float((got - dense).norm() / dense.norm()) < 1e-8
    torch.testing.assert_close(got, dense, rtol=1e-8, atol=1e-12)
