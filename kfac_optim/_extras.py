"""Optional dependencies: the one place that imports a package an extra provides.

``kfac_optim`` and ``fisher_metrics`` import and train with torch alone
(docs/design.md, "Must hold" 8). Features that need more (the Hugging Face
integrations, the demo, the report's plots and progress bars) import their packages
when called, through :func:`require`, so that a missing package raises an
``ImportError`` naming the feature, the package and the extra that installs it::

    plt = require("matplotlib.pyplot", "report", "fisher_metrics.report")

The extras (``pyproject.toml``): ``hf`` (transformers, tokenizers, accelerate), ``report``
(matplotlib, tqdm), ``demo`` (transformers, tokenizers, matplotlib, scikit-learn,
tqdm), ``test`` (the test suite: all of these plus pytest and ruff), ``deepspeed``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["DISTRIBUTION", "EXTRAS", "require"]

DISTRIBUTION = "kfac-optim"

# extra -> the distributions it installs (kept in step with pyproject.toml by
# tests/test_boundary.py).
EXTRAS: dict[str, tuple[str, ...]] = {
    "hf": ("transformers", "tokenizers", "accelerate"),
    "report": ("matplotlib", "tqdm"),
    "demo": ("transformers", "tokenizers", "matplotlib", "scikit-learn", "tqdm"),
}

# Import name -> distribution name, where they differ.
_DISTRIBUTIONS = {"sklearn": "scikit-learn"}


def require(module_name: str, extra: str, feature: str) -> ModuleType:
    """Import ``module_name`` for ``feature``, or say which extra installs it.

    Args:
        module_name: the module to import (``"matplotlib.pyplot"``, ``"transformers"``).
        extra: the ``kfac-optim`` extra that provides it (a key of ``EXTRAS``).
        feature: what needs it, as the user called it (``"fisher_metrics.report"``).

    Returns:
        The imported module.

    Raises:
        ValueError: ``extra`` is not one of ``EXTRAS`` (a bug in the caller).
        ImportError: the package is not installed (or fails to import); the message
            names ``feature``, the package and ``pip install 'kfac-optim[<extra>]'``.
    """
    if extra not in EXTRAS:
        raise ValueError(f"extra={extra!r}; accepted: {tuple(EXTRAS)}")
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        top = module_name.partition(".")[0]
        package = _DISTRIBUTIONS.get(top, top)
        raise ImportError(
            f"{feature} needs {package}: pip install '{DISTRIBUTION}[{extra}]' "
            f"(import of {module_name!r} failed: {exc})",
            name=exc.name,
        ) from exc
