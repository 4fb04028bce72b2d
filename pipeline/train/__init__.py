"""Training: one proxy's steps, stacked proxies, the rounds and their loss profile, aggregation, and the DVC stages' plan of rounds."""
