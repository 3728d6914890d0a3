"""Self-supervised objectives: heads, losses, masking, schedules, EMA teacher, LightningModules."""
