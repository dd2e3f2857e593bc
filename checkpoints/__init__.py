"""Training checkpoints (save, load, resume) and export of final weights."""
