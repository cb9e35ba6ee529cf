"""Shared check of a Data2VecTextModel exported without a pooler (fairseq's data2vec text has none)."""

from __future__ import annotations

from pathlib import Path

import d2v


def assert_pooler_is_reported(directory: Path, report: str) -> None:
    """transformers reads no "no pooler" from config.json: plain loading initialises pooler.dense
    (what the report warns of), ``add_pooling_layer=False`` loads with nothing new (what it advises)."""
    import transformers

    assert "note: this model has no pooler, so pooler.dense is not in the checkpoint" in report, report
    assert "pooler_output is not meaningful" in report and "add_pooling_layer=False" in report
    assert "last_hidden_state[:, 0]" in report
    _, plain = transformers.Data2VecTextModel.from_pretrained(directory, output_loading_info=True)
    assert sorted(plain["missing_keys"]) == ["pooler.dense.bias", "pooler.dense.weight"], plain
    model, info = transformers.Data2VecTextModel.from_pretrained(directory, add_pooling_layer=False,
                                                                 output_loading_info=True)
    assert model.pooler is None and not info["missing_keys"] and not info["unexpected_keys"], info
    assert d2v.from_pretrained(directory).model.encoder.pooler is None
