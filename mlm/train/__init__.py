"""Training: objectives (losses), optimiser and schedule, checkpoints, guards, data order, logs and the loop."""
