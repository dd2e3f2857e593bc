"""The training loop, optimizer, metrics and FLOPs accounting."""
