"""Self-supervision: the EMA teacher (``ema``), mask generators (``masking``), masks drawn in the
loader workers (``batch_masks``) and the data2vec 1.0 and 2.0 objectives (``distill``, ``distill2``). The targets and decoders they use are
registered components of the ``d2v_targets`` plugin, so a research plugin can replace them.

Imports only ``d2v.api``.
"""
