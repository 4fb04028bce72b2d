"""IET-AGC+: diffusion training that memorizes less, with the measurements to show it."""
