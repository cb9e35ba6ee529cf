"""Sequence classification and regression: Hugging Face's ``Data2VecTextForSequenceClassification``.

The classifier reads the first token (``<s>``): ``dropout -> dense -> tanh -> dropout ->
out_proj``. The loss follows HF's ``problem_type``: ``regression`` (MSE; with one output the
logits and labels are squeezed), ``single_label_classification`` (cross-entropy) or
``multi_label_classification`` (BCE with logits). Left unset it is inferred as HF does, from
the first labels seen: one label -> regression; integer labels -> single-label; otherwise
multi-label (then kept, and reported by ``hf_config``).

Spec usage::

    head: {name: text_classification, label_names: [entailment, neutral, contradiction]}
    head: {name: text_classification, num_labels: 1}               # STS-B regression

Metrics (percent, :mod:`d2v_heads.shared.classification_metrics`): single-label ``accuracy``,
``macro_f1``, ``mcc`` and binary ``f1``; regression ``pearson``, ``spearman`` (and ``mse``);
multi-label ``micro_f1`` and ``subset_accuracy`` (a label is predicted when its logit > 0).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from d2v import hookimpl
from d2v.api.errors import SpecError
from d2v import EncoderOutput, Head, HeadOutput
from d2v_heads.shared.label_names import resolve_label_names
from d2v_heads.shared.classification_metrics import (
    classification_summary,
    confusion_counts,
    multilabel_counts,
    multilabel_summary,
    regression_counts,
    regression_summary,
)
from d2v_heads.shared.top_k import classification_results, ranked


@hookimpl
def d2v_register(register):
    register("head", "text_classification", "d2v_heads.text.text_classification:TextClassificationHead",
             summary="sequence classification/regression over <s> (HF Data2VecTextForSequenceClassification, "
                     "problem_type single/multi-label/regression); accuracy, F1, MCC, Pearson/Spearman, micro-F1",
        modalities=("text",),
    )


PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def infer_problem_type(num_labels: int, labels: Tensor) -> str:
    """HF's rule: one output -> regression; integer labels -> single-label; else multi-label."""
    if num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int):
        return "single_label_classification"
    return "multi_label_classification"


class TextClassificationHead(Head):
    """Parameters (keyword-only): ``input_dim`` (injected), ``num_labels`` or ``label_names``,
    ``problem_type`` (``None`` = infer as HF), ``classifier_dropout`` (HF falls back to
    ``hidden_dropout_prob``, 0.1)."""

    tasks = ("text-classification",)

    def __init__(
        self,
        *,
        input_dim: int,
        num_labels: int | None = None,
        label_names: list[str] | None = None,
        problem_type: str | None = None,
        classifier_dropout: float = 0.1,
        initializer_range: float = 0.02,
    ) -> None:
        super().__init__()
        self.label_names = resolve_label_names(num_labels, label_names, "text_classification", default=False)
        self.num_labels = len(self.label_names) if self.label_names is not None else int(num_labels)
        if problem_type is not None and problem_type not in PROBLEM_TYPES:
            raise SpecError(f"text_classification: problem_type must be one of {', '.join(PROBLEM_TYPES)} "
                            f"or null (inferred), got {problem_type!r}.")
        self.problem_type = problem_type
        self.classifier_dropout = float(classifier_dropout)
        self.dropout = nn.Dropout(self.classifier_dropout)
        self.dense = nn.Linear(int(input_dim), int(input_dim))
        self.out_proj = nn.Linear(int(input_dim), self.num_labels)
        for linear in (self.dense, self.out_proj):
            nn.init.normal_(linear.weight, std=initializer_range)
            nn.init.zeros_(linear.bias)

    def hf_config(self) -> dict[str, Any]:
        names = self.label_names or [f"LABEL_{i}" for i in range(self.num_labels)]
        return {"num_labels": self.num_labels, "problem_type": self.problem_type,
                "classifier_dropout": self.classifier_dropout,
                "id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)}}

    def resolve_problem_type(self, labels: Tensor) -> str:
        if self.problem_type is None:
            self.problem_type = infer_problem_type(self.num_labels, labels)
        return self.problem_type

    def forward(self, encoder_output: EncoderOutput, batch: dict[str, Any] | None = None) -> HeadOutput:
        x = self.dropout(encoder_output.last_hidden_state[:, 0])
        logits = self.out_proj(self.dropout(torch.tanh(self.dense(x))))
        labels = (batch or {}).get("labels")
        if labels is None:
            return HeadOutput(logits=logits)
        labels = torch.as_tensor(labels).to(logits.device)
        problem = self.resolve_problem_type(labels)
        if problem == "regression":
            if self.num_labels == 1:
                loss = nn.functional.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
            else:
                loss = nn.functional.mse_loss(logits, labels.to(logits.dtype))
        elif problem == "single_label_classification":
            loss = nn.functional.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1).long())
        else:
            loss = nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        return HeadOutput(logits=logits, loss=loss)

    # ------------------------------------------------------------------ predictions
    def _name(self, index: int) -> Any:
        return self.label_names[index] if self.label_names is not None else index

    def _problem_for_eval(self, batch: dict[str, Any]) -> str:
        labels = batch.get("labels")
        if self.problem_type is None and labels is not None:
            return infer_problem_type(self.num_labels, torch.as_tensor(labels))
        if self.problem_type is None:
            return "regression" if self.num_labels == 1 else "single_label_classification"
        return self.problem_type

    def predict(self, output: HeadOutput, batch: dict[str, Any] | None = None) -> list[Any]:
        """Single-label: a label name (or id); multi-label: the names (or ids) whose logit > 0;
        regression: the value (a list of values with several outputs)."""
        logits = output.logits.detach().float()
        problem = self._problem_for_eval(batch or {})
        if problem == "regression":
            return logits.squeeze(-1).tolist() if self.num_labels == 1 else logits.tolist()
        if problem == "multi_label_classification":
            return [[self._name(i) for i, on in enumerate(row) if on] for row in (logits > 0).tolist()]
        return [self._name(i) for i in logits.argmax(-1).tolist()]

    def describe(self, output: HeadOutput, batch: dict[str, Any], *, top_k: int = 5, decode: Any = None) -> list[dict]:
        """Single-label: the best label, its softmax probability and the ``top_k`` labels;
        multi-label: the ``labels`` whose sigmoid exceeds 0.5 and the ``top_k`` by sigmoid (as
        Hugging Face's ``function_to_apply``); regression: ``{"score": value}``."""
        logits = output.logits.detach().float().cpu()
        problem = self._problem_for_eval(batch)
        if problem == "regression":
            return [{"score": value} for value in (logits.squeeze(-1) if self.num_labels == 1 else logits).tolist()]
        if problem == "multi_label_classification":
            out = []
            for row in logits.sigmoid():
                top = ranked(row, self.label_names, top_k)
                out.append({"labels": [self._name(i) for i, p in enumerate(row.tolist()) if p > 0.5], "top_k": top})
            return out
        return classification_results(logits.softmax(-1), self.label_names, top_k)

    def references(self, batch: dict[str, Any]) -> list[Any]:
        labels = batch.get("labels")
        if labels is None:
            return super().references(batch)
        labels = torch.as_tensor(labels)
        problem = self._problem_for_eval(batch)
        if problem == "regression":
            return labels.tolist()
        if problem == "multi_label_classification":
            return [[self._name(i) for i, on in enumerate(row) if on] for row in (labels > 0.5).tolist()]
        return [self._name(i) if 0 <= i < self.num_labels else None for i in labels.view(-1).tolist()]

    # ------------------------------------------------------------------ metrics
    def eval_counts(self, output: HeadOutput, batch: dict[str, Any]) -> dict[str, Any]:
        labels = batch.get("labels")
        if labels is None:
            return {}
        labels = torch.as_tensor(labels).to(output.logits.device)
        logits = output.logits.detach()
        problem = self._problem_for_eval(batch)
        if problem == "regression":
            return regression_counts(logits, labels)
        if problem == "multi_label_classification":
            return multilabel_counts(logits > 0, labels > 0.5)
        return confusion_counts(logits.argmax(-1), labels, self.num_labels)

    def summarize(self, counts: dict[str, Any]) -> dict[str, float]:
        if "reg_pred" in counts:
            return regression_summary(counts["reg_pred"], counts["reg_target"])
        if "ml_rows" in counts:
            return multilabel_summary(counts)
        return classification_summary(counts, self.num_labels)


__all__ = ["PROBLEM_TYPES", "TextClassificationHead", "infer_problem_type"]
