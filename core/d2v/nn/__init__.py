"""Building blocks every modality's encoders share: dropout/drop-path and attention helpers
(``layers``), ALiBi biases (``alibi``) and per-layer options such as activation checkpointing
and compile (``layer_options``).

Imports only ``d2v.api``.
"""
