"""Evals: candidates answer items (a dataset or a file), graders score them, runs compare."""
