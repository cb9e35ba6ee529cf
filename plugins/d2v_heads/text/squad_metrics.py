"""SQuAD exact match and F1, as the official v2.0 evaluation script scores them (which agrees
with v1.1 on every answerable question).

Answers are normalised (lower case, punctuation removed, the articles a/an/the removed,
whitespace collapsed); F1 is over the bag of normalised tokens; each question takes its best
score over the gold answers. A question whose gold answers all normalise to nothing (v2.0
unanswerable: no answers) is scored against the empty answer, so predicting ``""`` is right.
The official ``HasAns``/``NoAns`` breakdown follows whether the question has gold answers.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, drop articles, collapse whitespace (the official order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_score(gold: str, pred: str) -> float:
    return float(normalize_answer(gold) == normalize_answer(pred))


def f1_score(gold: str, pred: str) -> float:
    gold_tokens, pred_tokens = normalize_answer(gold).split(), normalize_answer(pred).split()
    if not gold_tokens or not pred_tokens:
        return float(gold_tokens == pred_tokens)
    same = sum((Counter(gold_tokens) & Counter(pred_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def question_scores(golds: Sequence[str], pred: str) -> tuple[float, float]:
    """``(exact, f1)`` of one prediction: the best over the gold answers that do not normalise
    to nothing (the empty answer when there are none)."""
    usable = [g for g in golds if normalize_answer(g)] or [""]
    return max(exact_score(g, pred) for g in usable), max(f1_score(g, pred) for g in usable)


def squad_counts(golds: Sequence[Sequence[str]], preds: Sequence[str]) -> dict[str, float]:
    """Additive counts for a batch of questions: totals and sums of exact/F1, overall and split
    into questions with answers (``has_ans_*``) and without (``no_ans_*``)."""
    counts = {"qa_total": 0.0, "qa_exact": 0.0, "qa_f1": 0.0,
              "has_ans_total": 0.0, "has_ans_exact": 0.0, "has_ans_f1": 0.0,
              "no_ans_total": 0.0, "no_ans_exact": 0.0, "no_ans_f1": 0.0}
    for gold, pred in zip(golds, preds):
        exact, f1 = question_scores(gold, pred)
        group = "has_ans" if len(gold) else "no_ans"
        for prefix in ("qa", group):
            counts[f"{prefix}_total"] += 1
            counts[f"{prefix}_exact"] += exact
            counts[f"{prefix}_f1"] += f1
    return counts


def squad_summary(counts: dict[str, float]) -> dict[str, float]:
    """``exact`` and ``f1`` in percent, plus ``HasAns_exact``/``HasAns_f1``/``NoAns_exact``/
    ``NoAns_f1`` (the official script's names) for the groups that have questions."""
    if not counts.get("qa_total"):
        return {}
    out = {"exact": 100.0 * counts["qa_exact"] / counts["qa_total"], "f1": 100.0 * counts["qa_f1"] / counts["qa_total"]}
    for prefix, name in (("has_ans", "HasAns"), ("no_ans", "NoAns")):
        total = counts.get(f"{prefix}_total", 0.0)
        if total:
            out[f"{name}_exact"] = 100.0 * counts[f"{prefix}_exact"] / total
            out[f"{name}_f1"] = 100.0 * counts[f"{prefix}_f1"] / total
    return out


__all__ = ["exact_score", "f1_score", "normalize_answer", "question_scores", "squad_counts", "squad_summary"]
