"""Training: the CLI, configs, Trainer building, checkpoints, import and export."""
