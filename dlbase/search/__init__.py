"""Sweeps on Optuna: the spec, the search space, the study and its storage, the sweep, its worker processes and
its trials trained as populations."""
