"""The benchmark suite behind `python -m linmix.bench`."""
