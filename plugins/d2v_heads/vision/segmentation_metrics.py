"""Semantic segmentation metrics from additive per-class counts (mmsegmentation's definitions).

``intersection_k``/``union_k``/``target_k`` are pixel counts per class ``k`` (pixels equal to
``ignore_index`` do not count); ``mIoU`` averages ``intersection / union`` over the classes
present in the union (mmseg drops NaN classes), ``pixel_accuracy`` is correct / labelled pixels.
"""

from __future__ import annotations

import torch
from torch import Tensor


def segmentation_counts(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int) -> dict[str, float]:
    """Additive counts for class maps ``pred`` and ``target`` of the same shape."""
    pred, target = pred.detach().reshape(-1).long().cpu(), target.detach().reshape(-1).long().cpu()
    keep = (target != ignore_index) & (target >= 0) & (target < num_classes)
    pred, target = pred[keep], target[keep]
    hit = target[pred == target]
    intersection = torch.bincount(hit, minlength=num_classes)
    area_pred = torch.bincount(pred.clamp(0, num_classes - 1), minlength=num_classes)
    area_target = torch.bincount(target, minlength=num_classes)
    union = area_pred + area_target - intersection
    counts: dict[str, float] = {}
    for k in range(num_classes):
        for name, values in (("intersection", intersection), ("union", union), ("target", area_target)):
            if int(values[k]):
                counts[f"seg_{name}_{k}"] = float(values[k])
    return counts


def segmentation_summary(counts: dict[str, float], num_classes: int) -> dict[str, float]:
    """``mIoU`` and ``pixel_accuracy`` (percent) from summed :func:`segmentation_counts`."""
    inter = [counts.get(f"seg_intersection_{k}", 0.0) for k in range(num_classes)]
    union = [counts.get(f"seg_union_{k}", 0.0) for k in range(num_classes)]
    target = [counts.get(f"seg_target_{k}", 0.0) for k in range(num_classes)]
    ious = [i / u for i, u in zip(inter, union) if u > 0]
    labelled = sum(target)
    if not labelled:
        return {}
    return {"mIoU": 100.0 * sum(ious) / len(ious), "pixel_accuracy": 100.0 * sum(inter) / labelled}
