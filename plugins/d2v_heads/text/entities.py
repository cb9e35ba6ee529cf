"""Entity chunks from IOB/IOBES tag sequences, and entity-level precision/recall/F1, exactly as
``seqeval``'s default mode (conlleval-style chunking; IOB1 and IOB2 both work).

A tag is ``O`` or ``<prefix>-<type>`` with the prefix one of ``B I E S`` (a bare prefix has the
type ``_``). A chunk ends before a ``B``/``S``/``O``, after an ``E``/``S``, or when the type
changes; it starts at a ``B``/``S``, at an ``I``/``E`` that follows ``O``/``E``/``S``, or when the
type changes. Scores are micro-averaged over entity types: a predicted chunk is correct when a
gold chunk has the same type, start and end. The counts are additive over sentences (seqeval
joins sentences with an ``O`` between them, which never lets a chunk cross sentences).
"""

from __future__ import annotations

from collections.abc import Sequence


def split_tag(tag: str) -> tuple[str, str]:
    """``"B-PER"`` -> ``("B", "PER")``; ``"O"`` -> ``("O", "_")``; ``"I"`` -> ``("I", "_")``."""
    return tag[:1], tag[1:].split("-", 1)[-1] or "_"


def _ends(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag not in ("O", ".") and prev_type != type_


def _starts(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if tag in ("B", "S"):
        return True
    if prev_tag in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag not in ("O", ".") and prev_type != type_


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Chunks ``(type, first, last)`` (inclusive word indices) of one sentence's tags."""
    chunks: list[tuple[str, int, int]] = []
    prev_tag, prev_type, begin = "O", "", 0
    for i, chunk in enumerate([*tags, "O"]):
        tag, type_ = split_tag(chunk)
        if _ends(prev_tag, tag, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if _starts(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


def entity_counts(gold: Sequence[str], pred: Sequence[str]) -> dict[str, float]:
    """Additive counts for one sentence: ``ent_correct``, ``ent_pred``, ``ent_gold``, and the
    tag-level ``tag_correct``/``tag_total`` (seqeval's ``accuracy_score``)."""
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} tags but the prediction has {len(pred)}")
    gold_chunks, pred_chunks = set(get_entities(gold)), set(get_entities(pred))
    return {
        "ent_correct": float(len(gold_chunks & pred_chunks)),
        "ent_pred": float(len(pred_chunks)),
        "ent_gold": float(len(gold_chunks)),
        "tag_correct": float(sum(g == p for g, p in zip(gold, pred))),
        "tag_total": float(len(gold)),
    }


def entity_scores(counts: dict[str, float]) -> dict[str, float]:
    """Micro ``precision``, ``recall``, ``f1`` and tag ``accuracy``, in percent (0 when a
    denominator is 0, as seqeval's default ``zero_division``)."""
    correct, pred, gold = counts.get("ent_correct", 0.0), counts.get("ent_pred", 0.0), counts.get("ent_gold", 0.0)
    precision = correct / pred if pred else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    out = {"precision": 100.0 * precision, "recall": 100.0 * recall, "f1": 100.0 * f1}
    if counts.get("tag_total"):
        out["accuracy"] = 100.0 * counts["tag_correct"] / counts["tag_total"]
    return out


__all__ = ["entity_counts", "entity_scores", "get_entities", "split_tag"]
