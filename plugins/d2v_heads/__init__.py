"""d2v's task heads. Each head is its own module and its own ``d2v`` entry point
(``head-<name> = "d2v_heads.<name>"``), so a head can be replaced or added like any
third-party plugin."""
