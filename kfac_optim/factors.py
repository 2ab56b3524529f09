"""Kronecker factor statistics and their running (EMA) estimates.

For one layer with input rows ``a`` (``d`` features, bias column included) and
output-gradient rows ``g`` (``o`` features) the batch factors are (DESIGN.md,
"The mathematics that must hold"):

    A = (1/T) sum_rows a a^T        (d, d)   T = number of valid rows
    G = (1/N) sum_rows g g^T        (o, o)   N = number of loss terms

where ``g`` is the gradient of the *sum* of the per-row losses. When every row is a
loss term (an MLP, a per-token language-model loss) ``T == N`` and this is the
textbook ``(1/T) sum g g^T``; with weight sharing and a per-sample loss (a conv
layer over ``L`` positions, Grosse & Martens 2016) ``T = N L`` and this is KFC's
``Omega (x) Gamma`` scale, and the KFAC-expand scale of Eschenhagen et al. (2023),
which makes K-FAC exact for deep linear networks.

Weight-sharing approximations (Eschenhagen et al. 2023, Sec. 3):

- ``"expand"`` (default): every shared position is a row. Exact in the expand
  setting (a loss per position, as in language modelling), which is what K-FAC
  on transformers trained with a token loss is.
- ``"reduce"``: positions are reduced first, ``a_n = mean_r a_{n,r}``,
  ``g_n = sum_r g_{n,r}``, one row per sample. Exact in the reduce setting (one
  loss per sequence, e.g. sequence classification) and cheaper.

Running factors are exponential moving averages with bias correction
``ema / (1 - decay^k)``, written as ``ema / w`` with ``w`` updated by the same
recursion so that a decay that changes during training stays unbiased.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["KFAC_APPROXIMATIONS", "input_statistics", "output_grad_statistics", "RunningFactor"]

KFAC_APPROXIMATIONS = ("expand", "reduce")


def _with_bias_column(rows: Tensor) -> Tensor:
    return torch.cat([rows, rows.new_ones(rows.shape[:-1] + (1,))], dim=-1)


def input_statistics(
    rows: Tensor,
    mask: Tensor | None,
    *,
    has_bias: bool,
    approx: str,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Sum of input outer products and row count for one forward call.

    Args:
        rows: ``(B, R, d_in)`` layer inputs.
        mask: ``(B, R)`` 1 for valid rows, 0 for padding, or None (all valid).
        has_bias: append a column of ones (the bias input).
        approx: ``"expand"`` or ``"reduce"`` (see module docstring).
        dtype: accumulation dtype.

    Returns:
        ``(sum a a^T, T)``: ``(d, d)`` with ``d = d_in + has_bias``, and a 0-dim count.
    """
    rows = rows.to(dtype)
    if has_bias:
        rows = _with_bias_column(rows)
    m = rows.new_ones(rows.shape[:2]) if mask is None else mask.to(dtype)
    if approx == "reduce":
        per_sample = m.sum(1)
        rows = (rows * m.unsqueeze(-1)).sum(1) / per_sample.clamp(min=1).unsqueeze(-1)
        count = (per_sample > 0).to(dtype).sum()
    else:
        rows = (rows * m.unsqueeze(-1)).reshape(-1, rows.shape[-1])
        count = m.sum()
    return rows.t() @ rows, count


def embedding_input_statistics(
    ids: Tensor, mask: Tensor | None, *, num_embeddings: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Diagonal of ``sum onehot onehot^T`` (token counts) and the row count.

    Args:
        ids: ``(B, R)`` token ids.
        mask: ``(B, R)`` validity mask or None.
        num_embeddings: vocabulary size ``V``.

    Returns:
        ``(counts (V,), T)``.
    """
    ids = ids.reshape(-1)
    w = torch.ones(ids.shape, dtype=dtype, device=ids.device) if mask is None else (
        mask.reshape(-1).to(dtype))
    counts = torch.zeros(num_embeddings, dtype=dtype, device=ids.device).index_add_(0, ids, w)
    return counts, w.sum()


def output_grad_statistics(
    grads: Tensor, mask: Tensor | None, *, scale: float | Tensor, approx: str, dtype: torch.dtype
) -> Tensor:
    """Sum of output-gradient outer products for one backward call.

    Args:
        grads: ``(B, R, o)`` gradients w.r.t. the layer output, as autograd gave them.
        mask: ``(B, R)`` validity mask or None.
        scale: factor turning them into gradients of the summed loss (``N`` for a
            mean-reduced loss over ``N`` terms, 1 for a summed loss).
        approx: ``"expand"`` or ``"reduce"``.

    Returns:
        ``sum g g^T``: ``(o, o)``.
    """
    grads = grads.to(dtype) * scale
    if mask is not None:
        grads = grads * mask.to(dtype).unsqueeze(-1)
    grads = grads.sum(1) if approx == "reduce" else grads.reshape(-1, grads.shape[-1])
    return grads.t() @ grads


class RunningFactor:
    """One Kronecker factor: statistics accumulated since the last update, and its EMA.

    ``add`` sums ``(sum of outer products, count)`` pairs from any number of forward /
    backward calls (micro-batches); a reduction across ranks may sum ``pending_sum``
    and ``pending_count`` in place; ``take_batch`` returns ``sum / count`` and clears
    them; ``update`` folds a batch factor into the EMA.
    """

    def __init__(self) -> None:
        self.ema: Tensor | None = None
        self.weight = 0.0
        self.updates = 0
        self.pending_sum: Tensor | None = None
        self.pending_count: Tensor | None = None

    def add(self, outer_sum: Tensor, count: Tensor | float) -> None:
        if self.pending_sum is None:
            self.pending_sum = outer_sum
            self.pending_count = torch.as_tensor(count, dtype=outer_sum.dtype,
                                                 device=outer_sum.device).clone()
        else:
            self.pending_sum += outer_sum
            self.pending_count += count

    @property
    def pending(self) -> bool:
        return self.pending_sum is not None

    def take_batch(self) -> Tensor | None:
        """``pending_sum / pending_count`` (None if nothing is pending), and clear."""
        if self.pending_sum is None:
            return None
        batch = self.pending_sum / self.pending_count.clamp(min=1)
        self.pending_sum = self.pending_count = None
        return batch

    def update(self, batch: Tensor, decay: float) -> None:
        """``ema <- decay ema + (1 - decay) batch``; the bias-correction weight follows."""
        if self.ema is None:
            self.ema = torch.zeros_like(batch)
        self.ema.mul_(decay).add_(batch, alpha=1.0 - decay)
        self.weight = decay * self.weight + (1.0 - decay)
        self.updates += 1

    def value(self) -> Tensor | None:
        """Bias-corrected running factor, or None before the first update."""
        return None if self.ema is None else self.ema / self.weight

    def state_dict(self) -> dict:
        return {"ema": self.ema, "weight": self.weight, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.ema = state["ema"]
        self.weight = float(state["weight"])
        self.updates = int(state["updates"])
