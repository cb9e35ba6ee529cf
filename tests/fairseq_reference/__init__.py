"""Test-only references: fairseq forward passes written out with plain torch ops, computed
directly from fairseq-named state dicts (no fairseq import)."""
