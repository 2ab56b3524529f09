"""Gram-trick spectra of Fisher-type curvature from per-row gradients.

A curvature that is a Gram matrix, ``A = V^T V`` with ``V: (N, n)`` (per-row
loss gradients for the empirical / sampled Fisher, output-Hessian-weighted
Jacobian rows for the GGN; see
:meth:`fisher_metrics.operators.CurvatureOperator.gram_factor`), shares its
non-zero eigenvalues with the ``N x N`` Gram matrix ``V V^T``. When the rows are
fewer than the parameters (``N < n``) the whole non-zero spectrum costs one
``eigvalsh`` of that small matrix instead of many Lanczos steps (Papyan 2019,
"Measurements of three-level hierarchical structure in the outliers in the
spectrum of deepnet Hessians", Sec. 2; Papyan 2020). Diagonal blocks of ``A``
(one per parameter tensor) are Gram matrices of column slices of ``V``, which
gives per-layer spectra from the same factor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._validation import check_int
from .operators import CurvatureOperator

__all__ = ["gram_eigenvalues"]

MAX_FACTOR_ENTRIES = 2**27


def _eigenvalues(V: Tensor) -> Tensor:
    gram = V @ V.T if V.shape[0] <= V.shape[1] else V.T @ V
    return torch.linalg.eigvalsh(gram).flip(0)


def gram_eigenvalues(
    operator: CurvatureOperator,
    *,
    blocks: bool = False,
    max_entries: int = MAX_FACTOR_ENTRIES,
) -> Tensor | dict[str, Tensor]:
    """All eigenvalues of a Fisher-type operator (or of its per-parameter blocks) by the Gram trick.

    Args:
        operator: a ``GGNOperator`` (cross-entropy or squared error),
            ``FisherMCOperator`` or ``EmpiricalFisherOperator``.
        blocks: return a dict ``{parameter name: eigenvalues of the diagonal
            block of A for that parameter}`` instead of the spectrum of ``A``.
        max_entries: refuse factors ``V`` with more than this many entries
            (``N * n``; default ``2**27``, 1 GiB in float64).

    Returns:
        Descending eigenvalues, ``(min(N, n),)`` float (the operator's dtype),
        the non-zero spectrum of ``A`` padded by zeros up to ``min(N, n)``
        entries; or the per-block dict. Units: loss per squared parameter unit.

    Raises:
        TypeError: ``operator`` is not a :class:`CurvatureOperator`, or is a
            Hessian; ``blocks`` not a bool.
        ValueError: ``N * n > max_entries``; GGN of a callable loss.
    """
    if not isinstance(operator, CurvatureOperator):
        raise TypeError(
            "operator must be a GGNOperator, FisherMCOperator or EmpiricalFisherOperator; "
            f"got {type(operator).__name__}"
        )
    if not isinstance(blocks, bool):
        raise TypeError(f"blocks must be True or False; got {blocks!r}")
    max_entries = check_int("max_entries", max_entries)
    rows = operator.num_rows * getattr(operator, "mc_samples", 1)
    if rows * operator.shape[0] > max_entries:
        raise ValueError(
            f"the Gram factor would have at least {rows} x {operator.shape[0]} entries, more than "
            f"max_entries = {max_entries}; use fisher_metrics.lanczos instead"
        )
    V = operator.gram_factor()
    if not blocks:
        return _eigenvalues(V)
    out, offset = {}, 0
    for name, shape in operator.param_shapes.items():
        out[name] = _eigenvalues(V[:, offset : offset + shape.numel()])
        offset += shape.numel()
    return out
