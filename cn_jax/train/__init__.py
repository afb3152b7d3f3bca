"""Training: trainable selection, the pure train step, sharding, checkpoints, the loop."""
