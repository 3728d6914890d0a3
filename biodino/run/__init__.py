"""Running a training: the Trainer, callbacks, stages, signals, locks, logging, Slurm scripts."""
