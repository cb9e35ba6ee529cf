"""Data: datasets turned into batches (length grouping, bad-example policy, crops: ``loading``)
and WebDataset-style tar shards for large corpora (``shards``).

Imports ``d2v.api`` and ``d2v.spec``.
"""
