"""Fisher type for G (docs/design.md, "Fisher type for G"): the output-side vectors whose
backward to the layer outputs gives the rows ``g`` of ``G``.

For a model with outputs ``f`` (logits, ``(..., C)``) and a per-row loss
``-log p(y | f)`` the three choices of G differ only in the vectors backpropagated from the
outputs:

- ``"empirical"``: the gradient of the training loss at the data targets (the user's own
  backward; nothing here).
- ``"mc"``: the gradient of the loss at targets ``y ~ p(y | f)`` sampled from the model's
  predictive distribution (Martens & Grosse 2015, Sec. 5): one vector per row,
  ``softmax(f) - onehot(y)`` (categorical) or ``f - y = -eps`` (Gaussian). Its expectation
  of ``g g^T`` is the type-2 statistic.
- ``"type2"``: the columns of a square root ``S`` of the output Hessian ``H = S S^T`` of
  the per-row loss: ``C`` vectors per row. Categorical (softmax cross-entropy):
  ``H = diag(p) - p p^T`` with ``S = diag(sqrt p) - p sqrt(p)^T``, column ``k`` being
  ``sqrt(p_k) (e_k - p)``. Gaussian (``0.5 ||f - y||^2``, unit variance): ``H = I``,
  ``S = I``.

Every vector is a gradient of the *sum* of per-row losses (no mean, no loss scaling, no
GradScaler), matching the convention ``G = (1/N) sum g g^T`` of docs/design.md, so that
``E_mc[G] = G_type2``. ``fisher_metrics`` imports ``sample_targets``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["FISHER_TYPES", "LIKELIHOODS", "TYPE2_MAX_OUTPUTS", "check_likelihood",
           "sample_targets", "output_vectors", "backward_to_outputs"]

FISHER_TYPES = ("empirical", "mc", "type2")
LIKELIHOODS = ("categorical", "gaussian")
TYPE2_MAX_OUTPUTS = 1024
"""Largest C ``"type2"`` accepts: it backpropagates C vectors per factor update."""
_BATCH_ELEMENTS = 2**24  # vectors per batched backward: at most this many logits entries


def check_likelihood(likelihood: str) -> str:
    """Raises:
        ValueError: ``likelihood`` not in ``LIKELIHOODS``."""
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood={likelihood!r} is not accepted; accepted values: "
                         f"{LIKELIHOODS} (softmax cross-entropy, or 0.5 ||f - y||^2)")
    return likelihood


def _compute_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def sample_targets(logits: Tensor, likelihood: str,
                   generator: torch.Generator | None = None) -> Tensor:
    """Targets drawn from the model's predictive distribution at ``logits``.

    Args:
        logits: ``(..., C)`` model outputs (detached inside).
        likelihood: ``"categorical"`` (``p = softmax(logits)``) or ``"gaussian"`` (mean
            ``logits``, identity covariance).
        generator: a ``torch.Generator`` on ``logits``' device, or None (the global RNG).

    Returns:
        categorical: ``(...)`` int64 class ids; gaussian: ``(..., C)`` in ``logits``' dtype.

    Raises:
        ValueError: unknown ``likelihood``, or ``logits`` with no class dimension.
    """
    check_likelihood(likelihood)
    if logits.dim() < 1:
        raise ValueError("logits must have shape (..., C), got a 0-dim tensor")
    f = logits.detach()
    if likelihood == "gaussian":
        return f + torch.randn(f.shape, generator=generator, dtype=f.dtype, device=f.device)
    p = torch.softmax(f.to(_compute_dtype(f)), dim=-1).reshape(-1, f.shape[-1])
    return torch.multinomial(p, 1, generator=generator).reshape(f.shape[:-1])


def output_vectors(logits: Tensor, likelihood: str, fisher_type: str,
                   mask: Tensor | None = None,
                   generator: torch.Generator | None = None) -> Tensor:
    """The vectors backpropagated from ``logits`` for ``"mc"`` or ``"type2"``.

    Args:
        logits: ``(..., C)``.
        likelihood: see ``sample_targets``.
        fisher_type: ``"mc"`` (K = 1 sampled loss gradient per row) or ``"type2"`` (the K = C
            columns of the output-Hessian square root per row).
        mask: ``(...)`` 1 for rows that are loss terms, 0 for rows that are not (their
            vectors are zero), or None (all rows).
        generator: for ``"mc"``, see ``sample_targets``.

    Returns:
        ``(K, ..., C)`` in ``logits``' dtype: ``sum_k v_k v_k^T`` per row is, in expectation
        (``"mc"``) or exactly (``"type2"``), the output Hessian of the per-row loss.

    Raises:
        ValueError: a bad ``likelihood`` / ``fisher_type``, or ``"type2"`` with C above
            ``TYPE2_MAX_OUTPUTS`` (use ``"mc"``).
    """
    check_likelihood(likelihood)
    if fisher_type not in ("mc", "type2"):
        raise ValueError(f"fisher_type={fisher_type!r} has no output vectors; accepted: "
                         "'mc', 'type2'")
    f = logits.detach().to(_compute_dtype(logits))
    c = f.shape[-1]
    if fisher_type == "type2" and c > TYPE2_MAX_OUTPUTS:
        raise ValueError(f"fisher_type='type2' backpropagates one vector per output: C={c} "
                         f"outputs exceed the limit of {TYPE2_MAX_OUTPUTS}; use "
                         "fisher_type='mc' (one sampled vector, the same G in expectation)")
    eye = torch.eye(c, dtype=f.dtype, device=f.device)
    if likelihood == "categorical":
        p = torch.softmax(f, dim=-1)
        if fisher_type == "mc":
            y = sample_targets(f, likelihood, generator)
            vectors = (p - torch.nn.functional.one_hot(y, c).to(f.dtype)).unsqueeze(0)
        else:  # column k of diag(sqrt p) - p sqrt(p)^T: sqrt(p_k) (e_k - p)
            shape = (c,) + (1,) * (f.dim() - 1) + (c,)
            vectors = p.sqrt().movedim(-1, 0).unsqueeze(-1) * (eye.reshape(shape) - p)
    elif fisher_type == "mc":
        vectors = (f - sample_targets(f, likelihood, generator)).unsqueeze(0)
    else:
        vectors = eye.reshape((c,) + (1,) * (f.dim() - 1) + (c,)).expand((c,) + f.shape)
    if mask is not None:
        vectors = vectors * mask.to(f.dtype).unsqueeze(-1)
    return vectors.to(logits.dtype)


def backward_to_outputs(logits: Tensor, outputs: list[Tensor],
                        vectors: Tensor) -> list[list[Tensor | None]]:
    """Gradients of ``<v_k, logits>`` with respect to ``outputs`` for every vector ``v_k``,
    by ``torch.autograd.grad`` (``retain_graph=True``): no parameter's ``.grad`` changes and
    the graph stays for the training loss's own backward.

    Args:
        logits: ``(..., C)``, the outputs of a graph that ``outputs`` lie on.
        outputs: tensors of that graph (captured layer outputs).
        vectors: ``(K, ..., C)``; batched ``is_grads_batched`` backwards of at most
            ``2**24`` logits entries each (a plain loop where the graph has an operation
            without a batching rule).

    Returns:
        ``[k][i]``: the gradient for vector k of ``outputs[i]``, None when ``outputs[i]``
        does not reach ``logits``.
    """
    k = vectors.shape[0]
    chunk = max(1, _BATCH_ELEMENTS // max(1, logits.numel()))
    out: list[list[Tensor | None]] = []
    for start in range(0, k, chunk):
        block = vectors[start:start + chunk]
        try:
            batched = block.shape[0] > 1
            grads = torch.autograd.grad(logits, outputs, block if batched else block[0],
                                        retain_graph=True, allow_unused=True,
                                        is_grads_batched=batched)
            if block.shape[0] == 1:
                grads = tuple(None if g is None else g.unsqueeze(0) for g in grads)
        except RuntimeError:  # no batching rule for an operation of the graph: one by one
            if block.shape[0] == 1:
                raise
            grads = tuple(zip(*[torch.autograd.grad(logits, outputs, v, retain_graph=True,
                                                    allow_unused=True) for v in block],
                              strict=True))
            grads = tuple(None if g[0] is None else torch.stack(g) for g in grads)
        for j in range(block.shape[0]):
            out.append([None if g is None else g[j] for g in grads])
    return out
