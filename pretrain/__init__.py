"""Pretraining of Mixture-of-Experts liquid language models: config, model, training loop and CLI."""
