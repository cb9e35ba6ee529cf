"""A head given only ``num_labels`` takes the class names its training data knows, so the
checkpoint, ``d2v predict`` and every export say ``positive`` instead of ``1``."""

from types import SimpleNamespace

from d2v.api import plugins
from d2v.train.label_names import adopt_label_names


def _adopt(head: dict, data: object) -> tuple[dict, str | None]:
    model = {"preset": "data2vec-text-tiny", "head": dict(head)}
    line = adopt_label_names(model, data, plugins.registry())
    return model["head"], line


def test_names_from_the_data_fill_a_head_given_only_a_count():
    glue = SimpleNamespace(label_names=["negative", "positive"], is_regression=False)
    head, line = _adopt({"name": "text_classification", "num_labels": 2}, glue)
    assert head["label_names"] == ["negative", "positive"]
    assert line == "model.head.label_names from the training data: negative, positive"
    head, _ = _adopt({"name": "text_classification"}, glue)
    assert head["label_names"] == ["negative", "positive"]


def test_the_spec_and_the_head_keep_the_last_word():
    glue = SimpleNamespace(label_names=["negative", "positive"])
    assert _adopt({"name": "text_classification", "label_names": ["bad", "good"]}, glue)[0]["label_names"] == ["bad", "good"]
    # a different count is the head's own error to report, not silently renamed
    assert "label_names" not in _adopt({"name": "text_classification", "num_labels": 3}, glue)[0]
    # regression (STS-B's single "score") and heads without names are left alone
    stsb = SimpleNamespace(label_names=["score"], is_regression=True)
    assert _adopt({"name": "text_classification", "num_labels": 1}, stsb) == ({"name": "text_classification", "num_labels": 1}, None)
    assert _adopt({"name": "masked_lm"}, glue) == ({"name": "masked_lm"}, None)
    assert _adopt({"name": "text_classification", "num_labels": 2}, SimpleNamespace())[1] is None
