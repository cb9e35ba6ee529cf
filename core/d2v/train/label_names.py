"""Class names from the training data for a head given only ``num_labels``.

A classifier trained on SST-2 with ``num_labels: 2`` would otherwise predict ``0`` and ``1``
everywhere it is used later: the checkpoint's spec, ``d2v predict``, ``pipeline`` and every export
read the names from the head's ``label_names``. Datasets that know their classes say so with a
``label_names`` attribute (folder names, GLUE's names, CoNLL's tags).
"""

from __future__ import annotations

from typing import Any

from d2v.api.errors import SpecError
from d2v.api.registry import Registry


def adopt_label_names(model_spec: dict, train_set: Any, registry: Registry) -> str | None:
    """Write the training data's class names into ``model.head.label_names`` when the spec names
    none and the head takes them; returns a line for the log, or None when nothing changed."""
    head = (model_spec or {}).get("head")
    names = getattr(train_set, "label_names", None)
    if not isinstance(head, dict) or head.get("label_names") is not None or not names:
        return None
    if getattr(train_set, "is_regression", False):
        return None
    try:
        takes_names = "label_names" in registry.get("head", head["name"]).signature().parameters
    except (SpecError, KeyError):
        return None
    num_labels = head.get("num_labels")
    if not takes_names or (num_labels is not None and num_labels != len(names)):
        return None  # a count that differs from the data's classes is the head's own error to report
    head["label_names"] = [str(n) for n in names]
    return f"model.head.label_names from the training data: {', '.join(head['label_names'])}"
