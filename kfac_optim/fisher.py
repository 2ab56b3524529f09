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

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

__all__ = ["FISHER_TYPES", "LIKELIHOODS", "TYPE2_MAX_OUTPUTS", "check_likelihood",
           "sample_targets", "output_vectors", "backward_to_outputs"]

FISHER_TYPES = ("empirical", "mc", "type2")
LIKELIHOODS = ("categorical", "gaussian")
TYPE2_MAX_OUTPUTS = 1024
"""Largest C ``"type2"`` accepts: it backpropagates C vectors per factor update."""


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
                   generator: torch.Generator | None = None) -> Iterator[Tensor]:
    """The vectors backpropagated from ``logits`` for ``"mc"`` or ``"type2"``.

    Args:
        logits: ``(..., C)``.
        likelihood: see ``sample_targets``.
        fisher_type: ``"mc"`` (K = 1 sampled loss gradient per row) or ``"type2"`` (the K = C
            columns of the output-Hessian square root per row).
        mask: ``(...)`` 1 for rows that are loss terms, 0 for rows that are not (their
            vectors are zero), or None (all rows).
        generator: for ``"mc"``, see ``sample_targets`` (the targets are drawn at once).

    Yields:
        K tensors ``(..., C)`` in ``logits``' dtype, one at a time (type-2 never holds the
        ``(C, ..., C)`` stack): ``sum_k v_k v_k^T`` per row is, in expectation (``"mc"``) or
        exactly (``"type2"``), the output Hessian of the per-row loss.

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
    keep = None if mask is None else mask.to(f.dtype).unsqueeze(-1)
    return _vectors(f, likelihood, fisher_type, keep, generator, logits.dtype)


def _vectors(f: Tensor, likelihood: str, fisher_type: str, keep: Tensor | None,
             generator: torch.Generator | None, dtype: torch.dtype) -> Iterator[Tensor]:
    c = f.shape[-1]
    if fisher_type == "mc":
        y = sample_targets(f, likelihood, generator)
        if likelihood == "categorical":
            v = torch.softmax(f, -1) - torch.nn.functional.one_hot(y, c).to(f.dtype)
        else:
            v = f - y
        yield _finish(v, keep, dtype)
        return
    p = torch.softmax(f, -1) if likelihood == "categorical" else None
    for k in range(c):
        if p is None:  # S = I
            v = torch.zeros_like(f)
            v[..., k] = 1.0
        else:  # column k of diag(sqrt p) - p sqrt(p)^T: sqrt(p_k) (e_k - p)
            root = p[..., k:k + 1].sqrt()
            v = -root * p
            v[..., k] += root[..., 0]
        yield _finish(v, keep, dtype)


def _finish(v: Tensor, keep: Tensor | None, dtype: torch.dtype) -> Tensor:
    return (v if keep is None else v * keep).to(dtype)


def backward_to_outputs(logits: Tensor, outputs: list[Tensor],
                        vectors: Iterable[Tensor]) -> Iterator[list[Tensor | None]]:
    """Gradients of ``<v_k, logits>`` with respect to ``outputs``, one vector ``v_k`` at a
    time, by ``torch.autograd.grad`` (``retain_graph=True``): no parameter's ``.grad``
    changes and the graph stays for the training loss's own backward.

    A loop rather than ``is_grads_batched``: on the demo LM (CPU, benchmarks/README.md,
    "Fisher type") 8 vectors took 1.9 s in a loop and 4.3 s batched through ``vmap``, and a
    loop holds one vector's gradients at a time.

    Args:
        logits: ``(..., C)``, the outputs of a graph that ``outputs`` lie on.
        outputs: tensors of that graph (captured layer outputs).
        vectors: ``(..., C)`` tensors (``output_vectors``).

    Yields:
        for each k: the gradients of ``outputs`` (None for one that does not reach
        ``logits``).
    """
    for v in vectors:
        yield list(torch.autograd.grad(logits, outputs, v, retain_graph=True,
                                       allow_unused=True))
