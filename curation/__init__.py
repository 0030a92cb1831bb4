"""The offline path: datasets, evals and fine-tunes built from captured traffic."""
