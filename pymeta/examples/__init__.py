"""Runnable examples: ``python -m pymeta.examples.<name>``."""
