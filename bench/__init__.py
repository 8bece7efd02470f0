"""featbench core: models, datasets, activations, the run entry point, results."""
