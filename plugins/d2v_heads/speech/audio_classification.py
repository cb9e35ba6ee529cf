"""Utterance classification (keyword spotting, emotion, intent): Hugging Face's
``Data2VecAudioForSequenceClassification`` head.

``projector`` (Linear ``input_dim -> classifier_proj_size``) on every frame, mean pooling over
the valid frames (padded frames are left out of the sum and of the count), ``classifier``
(Linear -> ``num_labels``), cross-entropy. With ``use_weighted_layer_sum`` the projector reads a
softmax-weighted sum of all hidden states (``layer_weights``) instead of the last one.

Spec usage::

    head: {name: audio_classification, label_names: [yes, no, up, down], use_weighted_layer_sum: true}

Batch keys read: ``labels`` (``LongTensor (B,)`` class ids). Metrics (percent): ``accuracy``,
``macro_f1`` (and ``f1``/``mcc`` from :mod:`d2v_heads.shared.classification_metrics`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from d2v import hookimpl
from d2v import EncoderOutput, Head, HeadOutput
from d2v_heads.shared.classification_metrics import classification_summary, confusion_counts
from d2v_heads.shared.label_names import resolve_label_names
from d2v_heads.shared.layer_sum import head_input, make_layer_weights
from d2v_heads.shared.top_k import classification_results


@hookimpl
def d2v_register(register):
    register("head", "audio_classification", "d2v_heads.speech.audio_classification:AudioClassificationHead",
             summary="utterance classification: projector, masked mean pooling, optional weighted layer sum, "
                     "cross-entropy (HF Data2VecAudioForSequenceClassification); accuracy, macro-F1")


def masked_mean(x: Tensor, padding_mask: Tensor | None) -> Tensor:
    """Mean over time of ``x`` ``(B, T, D)`` counting only valid frames (HF: zero the padded
    frames, sum, divide by the number of valid frames)."""
    if padding_mask is None:
        return x.mean(dim=1)
    keep = (~padding_mask.bool()).to(x.dtype)[..., None]
    return (x * keep).sum(dim=1) / keep.sum(dim=1)


class AudioClassificationHead(Head):
    """One label per utterance.

    Parameters (keyword-only): ``input_dim`` and ``num_layers`` (injected from the encoder),
    ``num_labels`` or ``label_names``, ``classifier_proj_size`` (HF's default 256),
    ``use_weighted_layer_sum``.
    """

    tasks = ("audio-classification",)

    def __init__(
        self,
        *,
        input_dim: int,
        num_labels: int | None = None,
        label_names: list[str] | None = None,
        classifier_proj_size: int = 256,
        use_weighted_layer_sum: bool = False,
        num_layers: int | None = None,
    ) -> None:
        super().__init__()
        self.label_names = resolve_label_names(num_labels, label_names, "audio_classification")
        self.num_labels = len(self.label_names)
        self.input_dim = int(input_dim)
        self.classifier_proj_size = int(classifier_proj_size)
        self.use_weighted_layer_sum = bool(use_weighted_layer_sum)
        self.needs_hidden_states = self.use_weighted_layer_sum
        self.layer_weights = make_layer_weights(self.use_weighted_layer_sum, num_layers)
        self.projector = nn.Linear(self.input_dim, self.classifier_proj_size)
        self.classifier = nn.Linear(self.classifier_proj_size, self.num_labels)

    def hf_config(self) -> dict[str, Any]:
        """The ``Data2VecAudioConfig`` fields this head determines."""
        return {
            "use_weighted_layer_sum": self.use_weighted_layer_sum,
            "classifier_proj_size": self.classifier_proj_size,
            "id2label": {str(i): name for i, name in enumerate(self.label_names)},
            "label2id": {name: i for i, name in enumerate(self.label_names)},
        }

    def forward(self, encoder_output: EncoderOutput, batch: dict[str, Any] | None = None) -> HeadOutput:
        hidden = self.projector(head_input(encoder_output, self.layer_weights))
        pooled = masked_mean(hidden, encoder_output.padding_mask)
        logits = self.classifier(pooled)
        labels = (batch or {}).get("labels")
        loss = None
        if labels is not None:
            labels = torch.as_tensor(labels, device=logits.device).long().view(-1)
            loss = nn.functional.cross_entropy(logits.view(-1, self.num_labels), labels)
        return HeadOutput(logits=logits, loss=loss, extras={"pooled": pooled})

    # ------------------------------------------------------------------ evaluation
    def predict(self, output: HeadOutput, batch: dict[str, Any] | None = None) -> list[str]:
        return [self.label_names[i] for i in output.logits.argmax(-1).tolist()]

    def describe(self, output: HeadOutput, batch: dict[str, Any], *, top_k: int = 5, decode: Any = None) -> list[dict]:
        """Per utterance: the best label, its softmax probability and the ``top_k`` labels."""
        return classification_results(output.logits.float().softmax(-1), self.label_names, top_k)

    def references(self, batch: dict[str, Any]) -> list[Any]:
        labels = batch.get("labels")
        if labels is None:
            return super().references(batch)
        return [self.label_names[i] if 0 <= i < self.num_labels else None for i in torch.as_tensor(labels).tolist()]

    def eval_counts(self, output: HeadOutput, batch: dict[str, Any]) -> dict[str, float]:
        labels = batch.get("labels")
        if labels is None:
            return {}
        target = torch.as_tensor(labels).view(-1)
        counts = confusion_counts(output.logits.argmax(-1), target, self.num_labels)
        counts["examples"] = float(target.numel())
        return counts

    def summarize(self, counts: dict[str, float]) -> dict[str, float]:
        return classification_summary(counts, self.num_labels)


__all__ = ["AudioClassificationHead", "masked_mean"]
