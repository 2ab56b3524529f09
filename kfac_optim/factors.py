"""Kronecker factor statistics and their running (EMA) estimates.

For one layer with input rows ``a`` (``d`` features, bias column included) and
output-gradient rows ``g`` (``o`` features) the batch factors are (docs/design.md,
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

from collections.abc import Callable

import torch
from torch import Tensor

from .inverse import eigh_psd, lowrank_eigh

__all__ = [
    "KFAC_APPROXIMATIONS", "input_rows", "valid_rows", "RowSample", "eigenbasis_second_moments",
    "embedding_input_statistics", "output_grad_rows", "RunningFactor", "LowRankFactor",
]

KFAC_APPROXIMATIONS = ("expand", "reduce")


def _with_bias_column(rows: Tensor) -> Tensor:
    return torch.cat([rows, rows.new_ones(rows.shape[:-1] + (1,))], dim=-1)


def input_rows(
    rows: Tensor,
    mask: Tensor | None,
    *,
    has_bias: bool,
    approx: str,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Rows ``a`` of one forward call, masked, with the bias column: ``sum a a^T`` is
    this call's contribution to ``T A``.

    Args:
        rows: ``(B, R, d_in)`` layer inputs.
        mask: ``(B, R)`` 1 for valid rows, 0 for padding, or None (all valid).
        has_bias: append a column of ones (the bias input).
        approx: ``"expand"`` (one row per position) or ``"reduce"`` (one row per sample:
            the mean over its valid positions).
        dtype: accumulation dtype.

    Returns:
        ``(a, T)``: ``(rows, d)`` with ``d = d_in + has_bias`` (padding rows are zero),
        and the 0-dim count of valid rows.
    """
    rows = rows.to(dtype)
    if has_bias:
        rows = _with_bias_column(rows)
    m = rows.new_ones(rows.shape[:2]) if mask is None else mask.to(dtype)
    if mask is not None:  # without a mask, no multiply by ones (the same values, no copy)
        rows = rows * m.unsqueeze(-1)
    if approx == "reduce":
        per_sample = m.sum(1)
        rows = rows.sum(1) / per_sample.clamp(min=1).unsqueeze(-1)
        return rows, (per_sample > 0).to(dtype).sum()
    return rows.reshape(-1, rows.shape[-1]), m.sum()


def valid_rows(mask: Tensor | None, approx: str) -> Tensor | None:
    """Which rows of ``input_rows`` / ``output_grad_rows`` are valid: ``(rows,)`` bool, or
    None when all are (no mask).

    Args:
        mask: ``(B, R)`` validity mask or None.
        approx: ``"expand"`` (a row per position: ``B R`` rows) or ``"reduce"`` (a row per
            sample with at least one valid position: ``B`` rows).
    """
    if mask is None:
        return None
    return mask.sum(1) > 0 if approx == "reduce" else mask.reshape(-1) != 0


class RowSample:
    """Subsampled statistics (docs/design.md, "Subsampled statistics").

    For valid rows ``x_1 .. x_T`` (of dimension n) and a sample size ``m = max(limit, n)``
    with ``T > m``, pick ``S``, m of the T rows uniformly without replacement, and estimate

        sum_{t=1}^T x_t x_t^T  by  (T / m) sum_{t in S} x_t x_t^T,

    unbiased since each row is in S with probability m / T. The count T is left unchanged,
    so the factor ``sum / T`` and its reduction across ranks (sums and counts summed, then
    divided) are unbiased too. With ``T <= m`` every row is used, unchanged.

    Args:
        limit: the option ``factor_row_limit`` (>= 1).
        generator: the CPU generator the row indices are drawn from.
    """

    def __init__(self, limit: int, generator: torch.Generator) -> None:
        self.limit = limit
        self.generator = generator

    def outer_sum(self, rows: Tensor, valid: Tensor | None) -> Tensor:
        """``sum_t x_t x_t^T`` ``(n, n)`` of ``rows`` ``(rows, n)``, estimated from a sample
        of the valid rows (``valid``: ``(rows,)`` bool or None for all) when there are more
        than ``max(limit, n)`` of them."""
        size = max(self.limit, rows.shape[1])
        if (rows.shape[0] if valid is None else int(valid.sum())) <= size:
            return rows.t() @ rows
        candidates = (torch.arange(rows.shape[0]) if valid is None
                      else valid.nonzero().squeeze(1).cpu())
        total = candidates.numel()
        pick = candidates[torch.randperm(total, generator=self.generator)[:size]]
        sample = rows[pick.to(rows.device)]
        return (sample.t() @ sample) * (total / size)


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


def output_grad_rows(
    grads: Tensor, mask: Tensor | None, *, scale: float | Tensor, approx: str, dtype: torch.dtype
) -> Tensor:
    """Output-gradient rows of the summed loss for one backward call.

    Args:
        grads: ``(B, R, o)`` gradients w.r.t. the layer output, as autograd gave them.
        mask: ``(B, R)`` validity mask or None.
        scale: factor turning them into gradients of the summed loss (``N`` for a
            mean-reduced loss over ``N`` terms, 1 for a summed loss), divided by a
            gradient scaler's scale when one is active.
        approx: ``"expand"`` (one row per position) or ``"reduce"`` (sum over positions).

    Returns:
        ``g``: ``(rows, o)``; ``sum g g^T`` is this call's contribution to ``N G``. Masked
        rows are zero (they add nothing to ``sum g g^T``).
    """
    if mask is None:
        grads = grads.to(dtype) * scale
    else:  # one pass: mask is 0 / 1 and scale > 0, so (g scale) mask == g (mask scale)
        grads = grads.to(dtype) * (mask.to(dtype) * scale).unsqueeze(-1)
    return grads.sum(1) if approx == "reduce" else grads.reshape(-1, grads.shape[-1])


def eigenbasis_second_moments(
    a: Tensor, g: Tensor, q_a: Tensor | None, q_g: Tensor, num_embeddings: int = 0
) -> Tensor:
    """EKFAC statistics (George et al. 2018, Eq. 10): sum over loss terms of the squared
    gradient of each term in the Kronecker eigenbasis.

    Rows that are loss terms (2-D ``a``, ``g``): ``S = sum_t (Q_G^T g_t)^2 ((Q_A^T
    a_t)^2)^T``. Samples whose positions share the weight (3-D ``a``, ``g``): ``S = sum_n
    (Q_G^T (sum_r g_{n,r} a_{n,r}^T) Q_A)^2`` elementwise, squared after the sum over the
    sample's positions (docs/design.md, "Weight sharing and EKFAC"). Divided by N it replaces
    the K-FAC eigenvalues ``s_G s_A^T``.

    Args:
        a: ``(rows, d)`` or ``(B, R, d)`` input rows (bias column included, padding rows
            zero), or for a diagonal A (Embedding, ``q_a`` None, one-hot rows) the
            ``(rows,)`` token ids.
        g: ``(rows, o)`` or ``(B, R, o)`` output-gradient rows of the summed loss (padding
            rows zero).
        q_a: ``(d, d)`` eigenvectors of A, or None for a diagonal A.
        q_g: ``(o, o)`` eigenvectors of G.
        num_embeddings: ``d`` when ``q_a`` is None.

    Returns:
        ``(o, d)``.
    """
    if g.dim() == 3:
        per_sample = torch.einsum("bro,brd->bod", g @ q_g, a @ q_a)
        return (per_sample**2).sum(0)
    pg = (g @ q_g) ** 2
    if q_a is None:
        out = torch.zeros(num_embeddings, pg.shape[1], dtype=pg.dtype, device=pg.device)
        return out.index_add_(0, a, pg).t()
    return pg.t() @ (a @ q_a) ** 2


def _compute(t: Tensor) -> Tensor:
    """Half-precision storage is computed with in float32."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def choose_store_device(nbytes: int, compute_device: torch.device, policy: str,
                        threshold_bytes: int) -> torch.device:
    """Where a low-rank factor lives between uses.

    ``"compute"``: next to the layer; ``"cpu"``: host memory; ``"auto"``: next to the
    layer while it takes at most ``threshold_bytes``, else host memory (pinned when the
    layer is on an accelerator, and moved to it on use). On a CPU-only machine every
    policy gives the CPU.
    """
    if policy == "cpu":
        return torch.device("cpu")
    if policy == "compute" or nbytes <= threshold_bytes:
        return compute_device
    return torch.device("cpu")


class RunningFactor:
    """One Kronecker factor: statistics accumulated since the last update, and its EMA.

    ``add`` sums ``(sum of outer products, count)`` pairs from any number of forward /
    backward calls (micro-batches); a reduction across ranks may sum ``pending_sum``
    and ``pending_count`` in place; ``take_batch`` returns ``sum / count`` and clears
    them; ``update`` folds a batch factor into the EMA.
    """

    def __init__(self, storage_dtype: torch.dtype | None = None) -> None:
        self.storage_dtype = storage_dtype
        self.ema: Tensor | None = None
        self.weight = 0.0
        self.updates = 0
        self.pending_sum: Tensor | None = None
        self.pending_count: Tensor | None = None

    def add(self, rows: Tensor, count: Tensor | float) -> None:
        """Add ``rows^T rows`` ((r, n) rows -> (n, n)) and their count."""
        self.add_sum(rows.t() @ rows, count)

    def add_sum(self, outer_sum: Tensor, count: Tensor | float) -> None:
        """Add a precomputed sum of outer products (or, for a diagonal factor, of squares)."""
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
        """``ema <- decay ema + (1 - decay) batch``; the bias-correction weight follows.

        The EMA is computed in ``batch``'s dtype and stored in ``storage_dtype``."""
        ema = batch * (1.0 - decay)
        if self.ema is not None:
            ema = ema.add_(self.ema.to(batch.dtype), alpha=decay)
        self.ema = ema if self.storage_dtype is None else ema.to(self.storage_dtype)
        self.weight = decay * self.weight + (1.0 - decay)
        self.updates += 1

    def value(self) -> Tensor | None:
        """Bias-corrected running factor (at least float32), or None before the first update."""
        return None if self.ema is None else _compute(self.ema) / self.weight

    def state_dict(self) -> dict:
        return {"ema": self.ema, "weight": self.weight, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.ema = state["ema"]
        self.weight = float(state["weight"])
        self.updates = int(state["updates"])


class LowRankFactor:
    """G kept as ``U U^T / w`` with ``U`` (o, k): the Woodbury policy's storage.

    Each update appends the batch block ``U_b = [g_1 ... g_T] / sqrt(N)`` (so that
    ``U_b U_b^T`` is the batch G) and rescales the stack for the EMA:
    ``U <- [sqrt(decay) U, sqrt(1 - decay) U_b]``, ``w <- decay w + (1 - decay)``; the
    bias-corrected factor is ``U U^T / w`` (docs/design.md, "Woodbury policy"). ``rank`` is
    ``k``, the number of stacked columns.

    Row-sharded (``rows=(start, stop)``): the factor holds rows ``start:stop`` of U only,
    ``cols`` (stop - start, k), and its batch blocks are the same rows of the batch blocks.
    Stacking and rescaling act on each row separately, so the row slice of the stacked U is
    the stack of the row slices: the EMA stays exact. ``value`` and ``to_dense`` need every
    row; the owner gathers them first (``kfac_optim.distributed.all_gather_rows``).
    """

    def __init__(self, storage_dtype: torch.dtype | None = None, store_device: str = "auto",
                 threshold_bytes: int = 500 * 2**20,
                 rows: tuple[int, int] | None = None) -> None:
        self.rows = rows
        self.storage_dtype = storage_dtype
        self.store_device = store_device
        self.threshold_bytes = threshold_bytes
        self.cols: Tensor | None = None
        self.weight = 0.0
        self.updates = 0
        self.pending_rows: list[Tensor] = []
        self.pending_count: Tensor | None = None

    def add(self, rows: Tensor, count: Tensor | float) -> None:
        """Add ``rows`` (r, o) of output gradients and their loss-term ``count``."""
        self.pending_rows.append(rows)
        c = torch.as_tensor(count, dtype=rows.dtype, device=rows.device)
        self.pending_count = c.clone() if self.pending_count is None else self.pending_count + c

    @property
    def pending(self) -> bool:
        return bool(self.pending_rows)

    @property
    def rank(self) -> int:
        return 0 if self.cols is None else self.cols.shape[1]

    def take_batch(self) -> Tensor | None:
        """Batch block ``U_b`` (o, T) with ``U_b U_b^T = G_batch``, and clear."""
        if not self.pending_rows:
            return None
        rows = torch.cat(self.pending_rows)
        block = rows.t() / self.pending_count.clamp(min=1).sqrt()
        self.pending_rows, self.pending_count = [], None
        return block

    def update(self, block: Tensor, decay: float) -> None:
        """Stack ``sqrt(1 - decay) U_b`` after ``sqrt(decay) U``; store per the policies."""
        device = block.device
        cols = block * (1.0 - decay) ** 0.5
        if self.cols is not None:
            cols = torch.cat([self.cols.to(device, block.dtype) * decay**0.5, cols], 1)
        self._store(cols, device)
        self.weight = decay * self.weight + (1.0 - decay)
        self.updates += 1

    def _store(self, cols: Tensor, device: torch.device) -> None:
        """Keep ``cols`` in the storage dtype on the device the store policy picks."""
        if self.storage_dtype is not None:
            cols = cols.to(self.storage_dtype)
        store = choose_store_device(cols.numel() * cols.element_size(), device,
                                    self.store_device, self.threshold_bytes)
        if store != device:
            cols = cols.to(store)
            if device.type != "cpu":
                cols = cols.pin_memory()
        self.cols = cols
        self.compute_device = device

    def truncate(self, rank: int, *, dtype: torch.dtype | None = None,
                 device: torch.device | None = None,
                 reduce_gram: Callable[[Tensor], Tensor] | None = None) -> float | None:
        """Keep the top ``rank`` eigen-directions of ``U U^T`` (the truncated EMA).

        ``U U^T = Q diag(s) Q^T`` (``lowrank_eigh``, O(o k^2 + k^3)); ``U`` becomes
        ``Q_r diag(s_r)^{1/2}`` (o, rank) with the ``rank`` largest ``s``: by
        Eckart-Young the best rank-``rank`` approximation of the stored factor in the
        Frobenius and spectral norms. Applied after every update, the EMA becomes
        ``G_t = top_r(decay G_{t-1} + (1 - decay) G_batch)``.

        A row slice ``U^(p)`` of a row-sharded factor cannot take that QR; there
        ``reduce_gram`` sums the slices' float64 Grams over ranks, ``U^T U = W diag(s)
        W^T``, and each rank keeps ``U^(p) W_r``: the same columns ``U W_r = Q_r
        diag(s_r)^{1/2}`` (up to signs), each rank holding its rows.

        Args:
            rank: columns kept (>= 1). Nothing happens while ``self.rank <= rank``.
            dtype, device: solver dtype and device (as ``eigh_psd``).
            reduce_gram: for a row slice, the sum over ranks of a ``(k, k)`` Gram.

        Returns:
            The fraction of ``trace(U U^T)`` dropped (0.0 when nothing was dropped), or
            None when the eigensolver failed (the factor is then left as it was).
        """
        if self.cols is None or self.rank <= rank:
            return 0.0
        device_c = getattr(self, "compute_device", self.cols.device)
        u = _compute(self.cols.to(device_c))
        if reduce_gram is None:
            eig = lowrank_eigh(u, dtype=dtype, device=device)
        else:
            wide = u.to(torch.float64)
            eig = eigh_psd(reduce_gram(wide.t() @ wide), device=device)
        if eig is None:
            return None
        s, vecs = eig  # ascending; vecs: Q (o, k') or, for row slices, W (k, k)
        total = float(s.sum())
        kept = s[-rank:]
        if reduce_gram is None:
            cols = vecs[:, -rank:] * kept.sqrt()
        else:
            cols = (wide @ vecs[:, -rank:].to(wide.device)).to(u.dtype)
        self._store(cols, device_c)
        return 0.0 if total <= 0 else max(0.0, 1.0 - float(kept.sum()) / total)

    def factor(self) -> Tensor | None:
        """``U / sqrt(w)`` (o, k) on the compute device, at least float32: the
        bias-corrected G is ``factor() factor()^T``."""
        if self.cols is None:
            return None
        device = getattr(self, "compute_device", self.cols.device)
        return _compute(self.cols.to(device, non_blocking=True)) / self.weight**0.5

    def _check_whole(self) -> None:
        if self.rows is not None:
            raise RuntimeError(f"this low-rank factor holds rows {self.rows[0]}:{self.rows[1]} "
                               "of U only (row-sharded); gather the rows first")

    def value(self) -> Tensor | None:
        """Dense bias-corrected ``G`` (o, o); for tests and for the dense fallback.

        Raises:
            RuntimeError: a row-sharded factor (it holds part of U).
        """
        self._check_whole()
        u = self.factor()
        return None if u is None else u @ u.t()

    def to_dense(self) -> RunningFactor:
        """The same factor as a dense ``RunningFactor`` (used past the rank limit).

        Raises:
            RuntimeError: a row-sharded factor (it holds part of U).
        """
        self._check_whole()
        dense = RunningFactor(self.storage_dtype)
        if self.cols is not None:
            u = self.factor() * self.weight**0.5
            dense.ema = u @ u.t()
            if self.storage_dtype is not None:
                dense.ema = dense.ema.to(self.storage_dtype)
        dense.weight, dense.updates = self.weight, self.updates
        return dense

    def state_dict(self) -> dict:
        """``cols`` (this factor's rows of U), ``rows`` (``[start, stop]`` when row-sharded,
        else None), ``weight``, ``updates``."""
        return {"cols": self.cols, "rows": None if self.rows is None else list(self.rows),
                "weight": self.weight, "updates": self.updates}

    def check_rows(self, state: dict) -> None:
        """Raises:
            RuntimeError: ``state`` holds other rows of U than this factor (a row-sharded
                state loaded at another rank, world size or ``woodbury_reduction``).
        """
        rows = state.get("rows")
        if (None if rows is None else tuple(rows)) != self.rows:
            raise RuntimeError(
                f"low-rank G state holds rows {'all' if rows is None else tuple(rows)} of U, "
                f"this factor {'all' if self.rows is None else self.rows}: row-sharded states "
                "load only at the same rank and world size with woodbury_reduction="
                "'row_sharded' (and whole-U states only without it)")

    def load_state_dict(self, state: dict) -> None:
        """Raises:
            RuntimeError: as ``check_rows``.
        """
        self.check_rows(state)
        self.cols = state["cols"]
        self.weight = float(state["weight"])
        self.updates = int(state["updates"])
