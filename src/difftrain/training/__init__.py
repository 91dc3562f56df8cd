"""The training loop and what it writes: checkpoints, metrics, samples, the final pipeline."""
