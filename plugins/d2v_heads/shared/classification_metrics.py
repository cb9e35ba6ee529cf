"""Classification and regression metrics shared by the heads, split like every d2v metric into
additive per-batch counts (summed over batches and processes by the runner) and a summary.

All summaries are in **percent** (x100), the way GLUE and the data2vec paper report them, so
they sit beside WER/CER (also percent) in logs without a mental conversion.

* single-label: a sparse confusion matrix (``cm_<true>_<pred>`` counts) gives accuracy,
  macro-F1, binary F1 (positive class 1) and Matthews' correlation (Gorodkin's multi-class form,
  equal to the binary MCC for two classes);
* multi-label: true/false positives and negatives summed over labels give micro-F1, plus the
  exact-match (subset) accuracy;
* regression: Pearson's r and Spearman's rho need every value, so their counts are lists
  (concatenated by the runner), together with the mean squared error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

PREFIX = "cm"


# --------------------------------------------------------------------------- single-label


def confusion_counts(pred: Tensor, target: Tensor, num_classes: int, *, prefix: str = PREFIX) -> dict[str, float]:
    """Sparse confusion counts ``{f"{prefix}_{true}_{pred}": n}`` for class ids ``pred``/``target``
    (any matching shapes; entries of ``target`` below 0, e.g. -100, are ignored)."""
    pred, target = pred.detach().reshape(-1).long().cpu(), target.detach().reshape(-1).long().cpu()
    keep = target >= 0
    pred, target = pred[keep], target[keep]
    if pred.numel() and (int(pred.max()) >= num_classes or int(target.max()) >= num_classes):
        raise ValueError(f"class ids must be below num_classes={num_classes}")
    cells = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return {f"{prefix}_{i // num_classes}_{i % num_classes}": float(n) for i, n in enumerate(cells.tolist()) if n}


def confusion_matrix(counts: dict[str, float], num_classes: int, *, prefix: str = PREFIX) -> Tensor:
    """The ``(num_classes, num_classes)`` matrix (rows: true class, columns: prediction)."""
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    head = prefix + "_"
    for key, value in counts.items():
        if key.startswith(head) and not isinstance(value, list):
            true, pred = key[len(head):].split("_")
            matrix[int(true), int(pred)] += float(value)
    return matrix


def _f1(tp: float, fp: float, fn: float) -> float:
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


def classification_summary(counts: dict[str, float], num_classes: int, *, prefix: str = PREFIX) -> dict[str, float]:
    """``accuracy``, ``macro_f1`` (over classes seen in the targets or predictions, as
    scikit-learn's default), ``mcc`` and, for two classes, ``f1`` of class 1."""
    m = confusion_matrix(counts, num_classes, prefix=prefix)
    total = float(m.sum())
    if total == 0:
        return {}
    tp = m.diag()
    predicted, actual = m.sum(0), m.sum(1)
    seen = (predicted + actual) > 0
    per_class = [_f1(float(tp[k]), float(predicted[k] - tp[k]), float(actual[k] - tp[k])) for k in range(num_classes)]
    correct = float(tp.sum())
    mcc_den = math.sqrt((total**2 - float((predicted**2).sum())) * (total**2 - float((actual**2).sum())))
    out = {
        "accuracy": 100.0 * correct / total,
        "macro_f1": 100.0 * sum(f for f, s in zip(per_class, seen.tolist()) if s) / max(int(seen.sum()), 1),
        "mcc": 100.0 * (correct * total - float((predicted * actual).sum())) / mcc_den if mcc_den else 0.0,
    }
    if num_classes == 2:
        out["f1"] = 100.0 * per_class[1]
    return out


# --------------------------------------------------------------------------- multi-label


def multilabel_counts(pred: Tensor, target: Tensor) -> dict[str, float]:
    """Counts for boolean ``(B, L)`` predictions and targets: ``ml_tp``, ``ml_fp``, ``ml_fn``,
    ``ml_exact`` (rows predicted exactly) and ``ml_rows``."""
    pred, target = pred.detach().bool().cpu(), target.detach().bool().cpu()
    return {
        "ml_tp": float((pred & target).sum()),
        "ml_fp": float((pred & ~target).sum()),
        "ml_fn": float((~pred & target).sum()),
        "ml_exact": float((pred == target).all(-1).sum()),
        "ml_rows": float(pred.shape[0]),
    }


def multilabel_summary(counts: dict[str, float]) -> dict[str, float]:
    """``micro_f1`` and ``subset_accuracy`` from :func:`multilabel_counts` totals."""
    if not counts.get("ml_rows"):
        return {}
    return {
        "micro_f1": 100.0 * _f1(counts["ml_tp"], counts["ml_fp"], counts["ml_fn"]),
        "subset_accuracy": 100.0 * counts["ml_exact"] / counts["ml_rows"],
    }


# --------------------------------------------------------------------------- regression


def regression_counts(pred: Tensor, target: Tensor) -> dict[str, list[float]]:
    """Per-example values (lists, concatenated by the runner) for :func:`regression_summary`."""
    return {"reg_pred": pred.detach().reshape(-1).double().cpu().tolist(),
            "reg_target": target.detach().reshape(-1).double().cpu().tolist()}


def _ranks(values: Tensor) -> Tensor:
    """Ranks 1..n with ties given their average rank (as Spearman's rho needs)."""
    order = torch.argsort(values, stable=True)
    ranks = torch.empty_like(values)
    sorted_values = values[order]
    start = 0
    n = values.numel()
    while start < n:
        end = start
        while end + 1 < n and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def _pearson(x: Tensor, y: Tensor) -> float:
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum()) / denominator if denominator else 0.0


def regression_summary(preds: Sequence[float], targets: Sequence[float]) -> dict[str, float]:
    """``pearson`` and ``spearman`` (x100) and ``mse`` over every example."""
    if len(preds) == 0:
        return {}
    x = torch.as_tensor(list(preds), dtype=torch.float64)
    y = torch.as_tensor(list(targets), dtype=torch.float64)
    return {
        "pearson": 100.0 * _pearson(x, y),
        "spearman": 100.0 * _pearson(_ranks(x), _ranks(y)),
        "mse": float(((x - y) ** 2).mean()),
    }
