"""Evaluation of frozen representations: features, kNN, linear probe, diagnostics, fine-tuning ops."""
