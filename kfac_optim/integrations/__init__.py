"""Integrations with training frameworks; imported explicitly, never by ``kfac_optim``."""
