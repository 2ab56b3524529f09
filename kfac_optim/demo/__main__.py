"""``python -m kfac_optim.demo``: see :mod:`kfac_optim.demo`."""

from .cli import main

main()
