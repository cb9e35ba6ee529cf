"""d2v's self-supervised targets and objectives (data2vec 1.0 and 2.0)."""
