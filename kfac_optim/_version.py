"""The distribution's version, defined once: ``pyproject.toml`` reads it from here
(``[tool.setuptools.dynamic]``), ``kfac_optim.__version__`` and
``fisher_metrics.__version__`` import it."""

__version__ = "0.1.0"
