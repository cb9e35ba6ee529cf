"""Heads for text: masked and causal language modelling, sequence, token and multiple-choice
classification, extractive question answering, and their metrics (seqeval entities, SQuAD).

Each head module is its own ``d2v`` entry point; nothing here is imported by core."""
