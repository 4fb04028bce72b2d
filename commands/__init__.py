"""Commands that read many experiments at once (the `iet-agc` console script, the tradeoff figure, the
ablation table): above the library (pipeline/) and beside the DVC stages (stages/), which run one
experiment. The library never imports them."""
