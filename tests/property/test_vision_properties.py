"""Properties of the vision pure functions: segmentation counts are additive over batches and
agree with a direct per-class computation; relative-position indices encode 2-D offsets."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d2v_heads.vision.segmentation_metrics import segmentation_counts, segmentation_summary
from d2v_vision.relative_position import relative_position_index


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(2, 5), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_segmentation_counts_additive_and_exact(num_classes, batch, seed):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randint(0, num_classes, (batch, 5, 6), generator=g)
    target = torch.randint(0, num_classes + 1, (batch, 5, 6), generator=g)
    target[target == num_classes] = 255
    whole = segmentation_counts(pred, target, num_classes, 255)
    parts: dict[str, float] = {}
    for b in range(batch):
        for k, v in segmentation_counts(pred[b], target[b], num_classes, 255).items():
            parts[k] = parts.get(k, 0.0) + v
    assert parts == whole
    keep = target != 255
    ious = []
    for k in range(num_classes):
        inter = ((pred == k) & (target == k) & keep).sum().item()
        union = (((pred == k) | (target == k)) & keep).sum().item()
        if union:
            ious.append(inter / union)
    summary = segmentation_summary(whole, num_classes)
    if keep.any():
        assert abs(summary["mIoU"] - 100 * sum(ious) / len(ious)) < 1e-9
        assert abs(summary["pixel_accuracy"] - 100 * ((pred == target) & keep).sum().item() / keep.sum().item()) < 1e-9


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.integers(1, 6), st.integers(1, 6))
def test_relative_index_encodes_offsets(h, w):
    index = relative_position_index((h, w))
    n = h * w
    distances = (2 * h - 1) * (2 * w - 1)
    assert index.shape == (n + 1, n + 1)
    assert index[0, 0] == distances + 2 and (index[0, 1:] == distances).all() and (index[1:, 0] == distances + 1).all()
    coords = [(i // w, i % w) for i in range(n)]
    for a in range(n):
        for b in range(n):
            dy, dx = coords[a][0] - coords[b][0], coords[a][1] - coords[b][1]
            assert index[a + 1, b + 1] == (dy + h - 1) * (2 * w - 1) + (dx + w - 1)
