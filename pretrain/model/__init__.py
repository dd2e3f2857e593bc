"""Plain single-device PyTorch model code: no collectives, no ranks."""
