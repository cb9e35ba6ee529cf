"""Classification / regression metrics: hand-computed values, additivity over batches, and the
runner's list-aware count merging."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d2v.train.loop import add_counts
from d2v_heads.shared.classification_metrics import (
    classification_summary,
    confusion_counts,
    multilabel_counts,
    multilabel_summary,
    regression_counts,
    regression_summary,
)


def test_binary_summary_matches_hand_computation():
    target = torch.tensor([1, 1, 1, 0, 0, 0, 0, 1])
    pred = torch.tensor([1, 1, 0, 0, 0, 1, 0, 1])
    # tp=3 fn=1 fp=1 tn=3
    s = classification_summary(confusion_counts(pred, target, 2), 2)
    assert s["accuracy"] == pytest.approx(75.0)
    assert s["f1"] == pytest.approx(100 * 6 / 8)
    mcc = (3 * 3 - 1 * 1) / math.sqrt(4 * 4 * 4 * 4)
    assert s["mcc"] == pytest.approx(100 * mcc)
    assert s["macro_f1"] == pytest.approx(75.0)  # both classes have F1 0.75


def test_multiclass_macro_f1_and_ignored_labels():
    target = torch.tensor([0, 1, 2, 2, -100])
    pred = torch.tensor([0, 2, 2, 2, 1])
    s = classification_summary(confusion_counts(pred, target, 3), 3)
    # class 0: f1 1; class 1: tp 0 -> 0; class 2: tp 2 fp 1 -> 0.8
    assert s["accuracy"] == pytest.approx(75.0)
    assert s["macro_f1"] == pytest.approx(100 * (1 + 0 + 0.8) / 3)
    assert "f1" not in s


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=2, max_size=60), st.integers(1, 5))
def test_counts_are_additive_over_batches(pairs, cut):
    pred = torch.tensor([p for p, _ in pairs])
    target = torch.tensor([t for _, t in pairs])
    whole = confusion_counts(pred, target, 4)
    totals: dict = {}
    for start in range(0, len(pairs), cut):
        add_counts(totals, confusion_counts(pred[start:start + cut], target[start:start + cut], 4))
    assert classification_summary(totals, 4) == pytest.approx(classification_summary(whole, 4))
    # the binary MCC equals the multi-class form when only two classes occur
    binary = classification_summary(confusion_counts(pred % 2, target % 2, 2), 2)
    tp = float(((pred % 2 == 1) & (target % 2 == 1)).sum()); tn = float(((pred % 2 == 0) & (target % 2 == 0)).sum())
    fp = float(((pred % 2 == 1) & (target % 2 == 0)).sum()); fn = float(((pred % 2 == 0) & (target % 2 == 1)).sum())
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert binary["mcc"] == pytest.approx(100 * (tp * tn - fp * fn) / den if den else 0.0, abs=1e-9)


def test_multilabel_summary():
    pred = torch.tensor([[1, 0, 1], [0, 0, 1]]).bool()
    target = torch.tensor([[1, 0, 1], [1, 0, 0]]).bool()
    s = multilabel_summary(multilabel_counts(pred, target))
    assert s["subset_accuracy"] == pytest.approx(50.0)
    assert s["micro_f1"] == pytest.approx(100 * 4 / 6)  # tp 2, fp 1, fn 1


def test_regression_summary_pearson_spearman_with_ties():
    pred = [1.0, 2.0, 2.0, 4.0, 10.0]
    target = [1.0, 3.0, 2.0, 5.0, 4.0]
    s = regression_summary(pred, target)
    # Spearman: ranks of pred (1, 2.5, 2.5, 4, 5) vs target (1, 3, 2, 5, 4)
    rx = torch.tensor([1, 2.5, 2.5, 4, 5], dtype=torch.float64)
    ry = torch.tensor([1, 3, 2, 5, 4], dtype=torch.float64)
    rho = float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])
    r = float(torch.corrcoef(torch.tensor([pred, target], dtype=torch.float64))[0, 1])
    assert s["spearman"] == pytest.approx(100 * rho)
    assert s["pearson"] == pytest.approx(100 * r)
    assert s["mse"] == pytest.approx(sum((a - b) ** 2 for a, b in zip(pred, target)) / 5)


def test_list_counts_concatenate_in_the_runner():
    totals: dict = {}
    add_counts(totals, {**regression_counts(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5])), "n": 2})
    add_counts(totals, {**regression_counts(torch.tensor([3.0]), torch.tensor([2.0])), "n": 1})
    assert totals["reg_pred"] == [1.0, 2.0, 3.0] and totals["reg_target"] == [1.0, 2.5, 2.0]
    assert totals["n"] == 3.0
