"""Runnable examples: ``python -m linmix.examples.<name>``."""
