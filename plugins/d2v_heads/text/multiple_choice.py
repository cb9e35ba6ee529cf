"""Multiple choice (SWAG, RACE-style): Hugging Face's ``Data2VecTextForMultipleChoice``.

Each example holds ``C`` candidate sequences ``(B, C, S)``; :meth:`prepare_batch` folds them
into ``B*C`` rows before encoding, the encoder's pooler (dense + tanh over ``<s>``) summarises
each row, ``dropout -> classifier`` (Linear ``D -> 1``) scores it, and the ``C`` scores of an
example are its logits ``(B, C)`` for a cross-entropy over the choices.

The encoder must have its pooler (HF builds it for this class)::

    model: {encoder: {add_pooling_layer: true}, head: {name: multiple_choice}}

Metric: ``accuracy`` (percent).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from d2v import hookimpl
from d2v.api.errors import SpecError
from d2v import EncoderOutput, Head, HeadOutput

#: batch entries with a per-choice sequence axis that are folded ``(B, C, ...) -> (B*C, ...)``
FOLDED_KEYS = ("inputs", "padding_mask", "token_type_ids", "position_ids")


@hookimpl
def d2v_register(register):
    register("head", "multiple_choice", "d2v_heads.text.multiple_choice:MultipleChoiceHead",
             summary="multiple choice (HF Data2VecTextForMultipleChoice: pooled output, dropout, Linear(D,1), "
                     "cross-entropy over the choices); accuracy",
        modalities=("text",),
    )


class MultipleChoiceHead(Head):
    """Parameters (keyword-only): ``input_dim`` (injected), ``hidden_dropout_prob`` (HF's dropout
    before the classifier, 0.1)."""

    tasks = ("multiple-choice",)

    def __init__(self, *, input_dim: int, hidden_dropout_prob: float = 0.1, initializer_range: float = 0.02) -> None:
        super().__init__()
        self.hidden_dropout_prob = float(hidden_dropout_prob)
        self.dropout = nn.Dropout(self.hidden_dropout_prob)
        self.classifier = nn.Linear(int(input_dim), 1)
        nn.init.normal_(self.classifier.weight, std=initializer_range)
        nn.init.zeros_(self.classifier.bias)

    def hf_config(self) -> dict[str, Any]:
        """Nothing of its own: HF's dropout here is the encoder's ``hidden_dropout_prob`` (importing
        sets ``hidden_dropout_prob`` from it; exporting keeps the encoder's)."""
        return {}

    def prepare_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Fold ``(B, C, S)`` choice tensors into ``(B*C, S)`` rows; records ``num_choices``."""
        inputs = batch["inputs"]
        if inputs.dim() != 3:
            if "num_choices" in batch:
                return batch  # already folded
            raise SpecError(f"multiple_choice head: inputs must be (batch, choices, length), got shape "
                            f"{tuple(inputs.shape)}; use a multiple-choice dataset (e.g. swag_csv).")
        folded = dict(batch)
        folded["num_choices"] = int(inputs.shape[1])
        for key in FOLDED_KEYS:
            value = batch.get(key)
            if value is not None:
                folded[key] = value.reshape(-1, value.shape[-1])
        return folded

    def forward(self, encoder_output: EncoderOutput, batch: dict[str, Any] | None = None) -> HeadOutput:
        pooled = encoder_output.pooler_output
        if pooled is None:
            raise SpecError("multiple_choice head: the encoder has no pooler output; set "
                            "model.encoder.add_pooling_layer: true.")
        batch = batch or {}
        choices = int(batch.get("num_choices", pooled.shape[0]))
        logits = self.classifier(self.dropout(pooled)).view(-1, choices)
        labels = batch.get("labels")
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits, torch.as_tensor(labels).to(logits.device).long())
        return HeadOutput(logits=logits, loss=loss)

    def predict(self, output: HeadOutput, batch: dict[str, Any] | None = None) -> list[int]:
        """The index of the best choice per example."""
        return output.logits.argmax(-1).tolist()

    def describe(self, output: HeadOutput, batch: dict[str, Any], *, top_k: int = 5, decode: Any = None) -> list[dict]:
        """Per example: the best ``choice`` (index), its softmax probability and every choice's."""
        out = []
        for row in output.logits.detach().float().softmax(-1).cpu():
            best = int(row.argmax())
            out.append({"choice": best, "score": float(row[best]), "scores": row.tolist()})
        return out

    def references(self, batch: dict[str, Any]) -> list[Any]:
        labels = batch.get("labels")
        return super().references(batch) if labels is None else torch.as_tensor(labels).tolist()

    def eval_counts(self, output: HeadOutput, batch: dict[str, Any]) -> dict[str, float]:
        labels = batch.get("labels")
        if labels is None:
            return {}
        labels = torch.as_tensor(labels).to(output.logits.device)
        return {"mc_correct": float((output.logits.argmax(-1) == labels).sum()), "mc_examples": float(labels.numel())}

    def summarize(self, counts: dict[str, float]) -> dict[str, float]:
        if not counts.get("mc_examples"):
            return {}
        return {"accuracy": 100.0 * counts["mc_correct"] / counts["mc_examples"]}


__all__ = ["FOLDED_KEYS", "MultipleChoiceHead"]
