"""Heads for speech: CTC (with its vocabularies, beam decoders, WER/CER and the n-gram LM builder
behind ``d2v lm``), utterance and frame classification, x-vector speaker embeddings and their metrics.

Each head module is its own ``d2v`` entry point; nothing here is imported by core."""
