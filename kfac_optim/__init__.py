"""kfac_optim: K-FAC natural-gradient optimizer and preconditioner for PyTorch.

Public API: ``KFAC`` (a ``torch.optim.Optimizer``) and ``KFACPreconditioner``
(rewrites ``p.grad`` in place before any optimizer's step), their options ``KFACOptions``,
the per-layer view ``LayerView`` (``KFACPreconditioner.layers``) and ``upgrade_state``
(loads a state of an earlier release). Architecture: README.md, "Architecture".
"""

from ._version import __version__ as __version__
from .layer import LayerView
from .layers import SUPPORTED_MODULES, KFACCoverageWarning
from .optimizer import KFAC
from .options import INVERSE_POLICIES, KFACOptions
from .preconditioner import KFACPreconditioner
from .state import upgrade_state

__all__ = ["KFAC", "KFACPreconditioner", "KFACOptions", "INVERSE_POLICIES", "SUPPORTED_MODULES",
           "KFACCoverageWarning", "LayerView", "upgrade_state"]
