"""Helpers the heads of every modality share: class names, top-k results, classification
metrics (accuracy, F1, MCC, correlations) and the learned weighted sum of hidden states.

Each head module is its own ``d2v`` entry point; nothing here is imported by core."""
