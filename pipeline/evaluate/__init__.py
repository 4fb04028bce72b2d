"""Evaluation of a trained model: sampling, guidance, copy detection, membership inference, quality, and the memorization-quality curve."""
