"""kfac_optim: K-FAC natural-gradient optimizer and preconditioner for PyTorch.

Public API: ``KFAC`` (a ``torch.optim.Optimizer``) and ``KFACPreconditioner``
(rewrites ``p.grad`` in place before any optimizer's step).
"""

from ._version import __version__ as __version__
from .layers import SUPPORTED_MODULES
from .optimizer import KFAC
from .options import INVERSE_POLICIES, KFACOptions
from .preconditioner import KFACPreconditioner

__all__ = ["KFAC", "KFACPreconditioner", "KFACOptions", "INVERSE_POLICIES", "SUPPORTED_MODULES"]
