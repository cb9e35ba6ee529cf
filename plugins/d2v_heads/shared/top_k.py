"""Ranked labels with scores: what the classification heads' ``describe`` returns per example
(``d2v predict``), the shape of Hugging Face's classification pipelines."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor


def ranked(scores: Tensor, names: Sequence[Any] | None, k: int) -> list[dict[str, Any]]:
    """The ``k`` best of ``scores`` ``(C,)``, best first: ``[{"label", "score"}, ...]`` (a class
    id stands in for the label when the head has no names)."""
    values, ids = scores.float().topk(min(int(k), scores.shape[-1]))
    return [{"label": names[i] if names else i, "score": float(v)} for v, i in zip(values.tolist(), ids.tolist())]


def classification_results(probabilities: Tensor, names: Sequence[Any] | None, k: int) -> list[dict[str, Any]]:
    """Per row of ``probabilities`` ``(B, C)``: the best ``label`` and its ``score``, and the
    ``top_k`` list."""
    out = []
    for row in probabilities.detach().cpu():
        top = ranked(row, names, k)
        out.append({"label": top[0]["label"], "score": top[0]["score"], "top_k": top})
    return out


__all__ = ["classification_results", "ranked"]
