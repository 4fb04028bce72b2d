"""Comparison of models: verdicts over seeds, matched quality, frontiers' tests, risk, and the model registry."""
