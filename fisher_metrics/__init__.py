"""fisher_metrics: matrix-free curvature spectra and capacity metrics for PyTorch models.

Public API:

- :func:`top_eigenvalues`: extreme eigenvalues of the GGN / Fisher / empirical
  Fisher / Hessian of the mean loss, with capacity metrics.
- :mod:`~fisher_metrics.operators`: curvature operators (``GGNOperator``,
  ``FisherMCOperator``, ``EmpiricalFisherOperator``, ``HessianOperator``),
  ``make_operator`` and ``EmptyBatchError`` (data without a valid row); for
  code built on the operators: ``PreparedBatch``, ``RowLoss``, ``batch_list``,
  ``evaluation_mode``.
- :mod:`~fisher_metrics.lanczos`: ``lanczos`` (full / periodic
  reorthogonalization) and ``slq`` spectral densities.
- :mod:`~fisher_metrics.spectrum`: ``gram_eigenvalues`` (Gram-trick spectra,
  whole or per parameter block, of Fisher-type operators).
- :mod:`~fisher_metrics.trace`: ``hutchinson``, ``hutch_plus_plus`` and ``xtrace``.
- :mod:`~fisher_metrics.capacity`: trace, effective rank, condition number,
  spectral gap / range, PAC-Bayes flatness.
- :mod:`~fisher_metrics.representation` / :mod:`~fisher_metrics.kfac`:
  ``FisherRepresentation`` (block-diagonal Fisher interface) and ``KFACFisher``
  (eigenvalues, trace, log-det, products, top-k from stored K-FAC factors).
- :func:`compare_hessian_fisher`: top Hessian vs Fisher eigenvalues and ratios.
- :func:`fit_factors`: K-FAC factors fitted from data in one pass (Monte-Carlo or
  empirical Fisher), for a model trained without K-FAC; a K-FAC state the report reads.
- :func:`report`: post-hoc per-layer / whole-model report (JSON, Markdown,
  HTML); also ``python -m fisher_metrics report``. The module is
  :mod:`~fisher_metrics.reporting` (``fisher_metrics.report`` is the function).
- :mod:`~fisher_metrics.diagonal` / :mod:`~fisher_metrics.groups`:
  ``DiagonalFisher`` (empirical / MC / GGN diagonal from per-row squared
  gradients; one-shot, EMA, Welford; one per task) and ``GroupFisher``
  (per output channel / attention head, GQA-aware).
- :mod:`~fisher_metrics.forgetting`: ``forgetting_damage``, ``symmetric_damage``,
  ``fisher_overlap``, ``ewc_penalty``, ``OnlineEWC``, ``kfac_laplace_penalty``.
- :mod:`~fisher_metrics.importance`: ``pruning_masks``, ``scale_by_fisher``,
  ``detect_conflicts``, ``qkov_interference``.

Imports with torch alone (the report's plots and progress bars need the ``report``
extra, the command line also ``hf``). It imports ``kfac_optim``'s layer registry
(``kfac_optim.layers``: layer kinds, the weight-matrix convention, causal-LM detection, the
ignore index), saved-state schema (``kfac_optim.state``), optional-dependency helper
(``kfac_optim._extras``) and version; ``kfac_optim`` never imports ``fisher_metrics``.
"""

from kfac_optim._version import __version__ as __version__

from .capacity import (
    capacity_metrics,
    condition_number,
    effective_rank,
    pac_bayes_flatness,
    spectral_gap,
    spectral_range,
    spectral_trace,
)
from .compare import compare_hessian_fisher
from .diagonal import DiagonalFisher, DiagonalFisherCollector, per_row_gradients
from .eigenvalues import top_eigenvalues
from .fit import fit_factors
from .forgetting import (
    OnlineEWC,
    ewc_penalty,
    fisher_overlap,
    forgetting_damage,
    kfac_laplace_penalty,
    symmetric_damage,
)
from .groups import AttentionSpec, GroupFisher, attention_layers, gqa_kv_head, param_groupings
from .importance import (
    detect_conflicts,
    pruning_masks,
    qkov_interference,
    scale_by_fisher,
    task_gradient,
)
from .kfac import KFACFisher
from .lanczos import (
    BlockLanczosResult,
    LanczosResult,
    SpectralDensity,
    block_lanczos,
    gaussian_density,
    lanczos,
    slq,
)
from .operators import (
    CURVATURES,
    CallableOperator,
    CurvatureOperator,
    DenseOperator,
    EmpiricalFisherOperator,
    EmptyBatchError,
    FisherMCOperator,
    GGNOperator,
    HessianOperator,
    LinearOperator,
    ObservedOperator,
    as_operator,
    make_operator,
    resolve_parameters,
)
from .reporting import build_report, report
from .representation import FisherRepresentation, RepresentationOperator, TopEigenvalues
from .spectrum import gram_eigenvalues
from .trace import TraceEstimate, hutch_plus_plus, hutchinson, xtrace

__all__ = [
    "AttentionSpec",
    "CURVATURES",
    "CallableOperator",
    "CurvatureOperator",
    "DenseOperator",
    "DiagonalFisher",
    "DiagonalFisherCollector",
    "EmpiricalFisherOperator",
    "EmptyBatchError",
    "FisherMCOperator",
    "FisherRepresentation",
    "GGNOperator",
    "GroupFisher",
    "HessianOperator",
    "KFACFisher",
    "BlockLanczosResult",
    "LanczosResult",
    "LinearOperator",
    "ObservedOperator",
    "OnlineEWC",
    "RepresentationOperator",
    "SpectralDensity",
    "TopEigenvalues",
    "TraceEstimate",
    "as_operator",
    "attention_layers",
    "build_report",
    "capacity_metrics",
    "compare_hessian_fisher",
    "condition_number",
    "detect_conflicts",
    "effective_rank",
    "block_lanczos",
    "ewc_penalty",
    "fisher_overlap",
    "fit_factors",
    "forgetting_damage",
    "gaussian_density",
    "gqa_kv_head",
    "gram_eigenvalues",
    "hutch_plus_plus",
    "hutchinson",
    "kfac_laplace_penalty",
    "lanczos",
    "make_operator",
    "pac_bayes_flatness",
    "param_groupings",
    "per_row_gradients",
    "pruning_masks",
    "qkov_interference",
    "report",
    "resolve_parameters",
    "scale_by_fisher",
    "slq",
    "spectral_gap",
    "spectral_range",
    "spectral_trace",
    "symmetric_damage",
    "task_gradient",
    "top_eigenvalues",
    "xtrace",
]
