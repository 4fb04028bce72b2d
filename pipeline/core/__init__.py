"""What every stage shares: the params, files and data, the UNet and its checkpoints, the round folders' layout, the copy measure and the figures."""
