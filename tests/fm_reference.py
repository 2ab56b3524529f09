"""Dense float64 curvature references and shared models for the fisher_metrics tests.

Built independently of ``fisher_metrics.operators``: the loss, the valid-row
selection and every matrix are written out here with ``torch.func.jacrev`` /
``torch.func.hessian`` over a flat parameter vector. Only the sampled labels of
the Monte-Carlo Fisher are read from the operator (they are data, not products).
Also here: the small models of several test files (MLP, GPT-2, LLaMA), random
symmetric matrices, and a few real ``kfac_optim`` steps with the dense factors
of their state.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel

DTYPE = torch.float64


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The test models are tiny: one thread avoids OpenMP overhead on busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- models


def mlp(seed: int = 0) -> nn.Module:
    """The 6-5-3 tanh MLP of the tests, float64, eval mode (53 parameters)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE).eval()


def mlp_batches(kind: str, sizes=(3, 7), seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of unequal size: ``kind="ce"`` (labels in 0..2) or ``"mse"`` (3 targets)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for size in sizes:
        x = torch.randn(size, 6, generator=generator, dtype=DTYPE)
        if kind == "ce":
            y = torch.randint(0, 3, (size,), generator=generator)
        else:
            y = torch.randn(size, 3, generator=generator, dtype=DTYPE)
        batches.append((x, y))
    return batches


def tiny_gpt2(seed: int = 0):
    """GPT-2 (1 layer, 2 heads, width 8, vocab 11) and a 2x4 dict batch with one -100 label."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=8,
        vocab_size=11,
        n_positions=8,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config).to(DTYPE).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, 11, (2, 4), generator=generator)
    attention = torch.ones(2, 4, dtype=torch.long)
    attention[1, 3] = 0
    labels = ids.clone()
    labels[1, 3] = -100
    return model, {"input_ids": ids, "attention_mask": attention, "labels": labels}


def tiny_llama(seed: int = 0) -> nn.Module:
    """LLaMA (1 layer, 4 query heads sharing 2 K/V heads of size 4, width 16, vocab 11), eval."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=11,
        max_position_embeddings=16,
    )
    return LlamaForCausalLM(config).to(DTYPE).eval()


def symmetric(eigenvalues, seed: int = 0) -> torch.Tensor:
    """``Q diag(eigenvalues) Q^T`` with a random orthogonal ``Q`` (float64)."""
    generator = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=DTYPE))
    return Q @ torch.diag(torch.as_tensor(eigenvalues, dtype=DTYPE)) @ Q.T


GPT2_PARAMS = [r"h\.0\.ln_1\.", "transformer.h.0.attn.c_proj.weight", "transformer.ln_f.bias"]
GPT2_NAMES = [
    "transformer.h.0.ln_1.weight",
    "transformer.h.0.ln_1.bias",
    "transformer.h.0.attn.c_proj.weight",
    "transformer.ln_f.bias",
]


# --------------------------------------------------------------------------- flat functions


class Problem:
    """Flat-parameter view of a model and its data: ``theta (n,) -> outputs / losses``.

    Args:
        model: the model (float64).
        names: selected parameter names, in ``named_parameters()`` order.
        batches: list of ``(inputs, targets)`` or dict batches.
        kind: ``"ce"`` or ``"mse"``.
        causal: shift labels of dict batches by one.
    """

    def __init__(self, model, names, batches, kind, causal=False):
        self.model, self.names, self.batches = model, list(names), batches
        self.kind, self.causal = kind, causal
        lookup = dict(model.named_parameters())
        self.shapes = [lookup[name].shape for name in self.names]
        self.theta = torch.cat([lookup[name].detach().reshape(-1) for name in self.names])

    def split(self, theta):
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            size = shape.numel()
            out[name] = theta[offset : offset + size].reshape(shape)
            offset += size
        return out

    def _batch_rows(self, theta, batch):
        if isinstance(batch, dict):
            kwargs = {key: value for key, value in batch.items() if key != "labels"}
            kwargs["use_cache"] = False
            logits = functional_call(self.model, self.split(theta), (), kwargs).logits
            labels, mask = batch["labels"], batch.get("attention_mask")
            if self.causal:
                logits, labels = logits[:, :-1], labels[:, 1:]
                mask = None if mask is None else mask[:, 1:]
            keep = labels != -100
            if mask is not None:
                keep &= mask != 0
            return logits[keep], labels[keep]
        x, y = batch
        out = functional_call(self.model, self.split(theta), (x,))
        if self.kind == "ce":
            keep = y != -100
            return out[keep], y[keep]
        return out, y

    def rows(self, theta):
        """All valid rows: outputs ``(R, C)`` and targets ``(R,)`` / ``(R, C)``."""
        with sdpa_kernel(SDPBackend.MATH):
            pairs = [self._batch_rows(theta, batch) for batch in self.batches]
        return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])

    def row_losses(self, theta, targets=None):
        out, y = self.rows(theta)
        y = y if targets is None else targets
        if self.kind == "ce":
            return -torch.log_softmax(out, dim=-1).gather(1, y[:, None]).squeeze(1)
        return 0.5 * ((out - y) ** 2).sum(dim=1)

    def mean_loss(self, theta):
        return self.row_losses(theta).mean()

    # ----------------------------------------------------------------- dense matrices

    def hessian(self):
        with sdpa_kernel(SDPBackend.MATH):
            return hessian(self.mean_loss)(self.theta)

    def ggn(self):
        J = jacrev(lambda t: self.rows(t)[0])(self.theta)  # (R, C, n)
        out, _ = self.rows(self.theta)
        if self.kind == "ce":
            p = torch.softmax(out, dim=-1)
            H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        else:
            H = torch.eye(out.shape[1], dtype=DTYPE).expand(out.shape[0], -1, -1)
        return torch.einsum("rcn,rcd,rdm->nm", J, H, J) / out.shape[0]

    def empirical_fisher(self):
        G = jacrev(self.row_losses)(self.theta)  # (R, n)
        return G.T @ G / G.shape[0]

    def fisher_mc(self, sampled):
        """Fisher from labels ``sampled``: list over batches of ``(S, R_b[, C])``."""
        S = sampled[0].shape[0]
        grads = []
        for s in range(S):
            targets = torch.cat([t[s] for t in sampled])
            grads.append(jacrev(lambda t, y=targets: self.row_losses(t, y))(self.theta))
        G = torch.cat(grads)
        return G.T @ G / G.shape[0]

    def dense(self, curvature, operator=None):
        if curvature == "fisher_mc":
            return self.fisher_mc(operator.sampled_targets)
        return {
            "ggn": self.ggn,
            "hessian": self.hessian,
            "empirical_fisher": self.empirical_fisher,
        }[curvature]()


def mlp_problem(kind: str, names=None) -> tuple[nn.Module, list, Problem]:
    model = mlp()
    batches = mlp_batches(kind)
    names = names or [name for name, _ in model.named_parameters()]
    return model, batches, Problem(model, names, batches, kind)


def gpt2_problem(names) -> tuple[nn.Module, dict, Problem]:
    model, batch = tiny_gpt2()
    return model, batch, Problem(model, names, [batch], "ce", causal=True)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------- K-FAC states


def kfac_trained(model, inputs, num_classes: int, *, policy: str, hybrid_min_out: int, seed: int):
    """Two real K-FAC + SGD steps on cross-entropy; returns ``(model, preconditioner)``.

    Args:
        model: the (float64) model, trained in place.
        inputs: ``generator -> a batch of inputs``; labels in ``0..num_classes-1``
            are drawn after it, one per input row, from the same generator
            (seeded with ``seed + 1``).
        policy, hybrid_min_out: the preconditioner's inverse policy options.
    """
    import kfac_optim

    pre = kfac_optim.KFACPreconditioner(
        model,
        kl_clip=None,
        factor_update_steps=1,
        factor_decay=0.9,
        inverse_policy=policy,
        hybrid_min_out=hybrid_min_out,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(seed + 1)
    for _ in range(2):
        x = inputs(generator)
        y = torch.randint(0, num_classes, (x.shape[0],), generator=generator)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pre.step()
        opt.step()
    return model, pre


def dense_factors(entry) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` (d, d) and ``G`` (o, o) from one layer's K-FAC state entry, written out."""
    A = entry["A"]["ema"].to(DTYPE) / entry["A"]["weight"]
    if A.dim() == 1:
        A = torch.diag(A)
    if entry["G_low_rank"]:
        U = entry["G"]["cols"].to(DTYPE)
        G = U @ U.T / entry["G"]["weight"]
    else:
        G = entry["G"]["ema"].to(DTYPE) / entry["G"]["weight"]
    return A, G
