"""Example d2v plugin: a Conformer encoder (torchaudio's layers) under d2v's objectives and heads."""

from d2v import hookimpl


@hookimpl
def d2v_register(register):
    register("encoder", "conformer", "d2v_conformer.encoder:ConformerEncoder",
             summary="torchaudio Conformer layers (FFN/attention/conv/FFN), padding- and kept-token-aware, mask embedding")
