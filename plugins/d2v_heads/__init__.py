"""d2v's task heads, grouped by the modality they serve (``speech/``, ``text/``, ``vision/``) with
the helpers they share in ``shared/``. Each head is its own module and its own ``d2v`` entry point
(``head-<name> = "d2v_heads.<modality>.<name>"``), so a head can be replaced or added like any
third-party plugin."""
