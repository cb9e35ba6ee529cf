"""Image classification: Hugging Face's ``Data2VecVisionForImageClassification`` head, a
Linear on the encoder's ``pooler_output`` (mean of the patch tokens + LayerNorm, or CLS).

Loss: cross-entropy for class ids (as HF's single-label loss); soft targets ``(B, classes)``
-- what timm's ``Mixup`` (mixup/cutmix with label smoothing) produces during fine-tuning --
use the soft-target cross-entropy ``-(y * log_softmax(z)).sum(-1).mean()``; with one output the
loss is MSE (HF's regression).

Metrics (percent): ``accuracy`` (top-1), ``top5`` (top-k with ``k = min(5, classes)``),
``macro_f1`` and ``mcc`` (:mod:`d2v_heads.shared.classification_metrics`).

Layer-wise learning-rate decay (``optim: {name: adamw, layer_decay: 0.65}``) treats this head
as the top layer and the vision encoder's ``layers.<i>`` as layers ``i + 1``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

from d2v import hookimpl
from d2v.api.errors import SpecError
from d2v import EncoderOutput, Head, HeadOutput
from d2v_heads.shared.label_names import resolve_label_names
from d2v_heads.shared.classification_metrics import classification_summary, confusion_counts
from d2v_heads.shared.top_k import classification_results


@hookimpl
def d2v_register(register):
    register("head", "image_classification", "d2v_heads.vision.image_classification:ImageClassificationHead",
             summary="Linear on the pooled encoder output (HF Data2VecVisionForImageClassification); "
                     "cross-entropy or mixup soft targets; top-1/top-5 accuracy, macro-F1, MCC",
        modalities=("image",),
    )


class ImageClassificationHead(Head):
    """Parameters: ``input_dim`` (injected), ``num_labels`` or ``label_names`` (class names, in id
    order), ``initializer_range`` (the classifier's init std; BEiT scales it down, 0.02 is HF's)."""

    tasks = ("image-classification",)

    def __init__(self, *, input_dim: int, num_labels: int | None = None, label_names: list[str] | None = None,
                 initializer_range: float = 0.02):
        super().__init__()
        self.label_names = resolve_label_names(num_labels, label_names, "head image_classification", default=False)
        self.num_labels = len(self.label_names) if self.label_names is not None else int(num_labels)
        self.classifier = nn.Linear(int(input_dim), self.num_labels)
        trunc_normal_(self.classifier.weight, std=initializer_range)
        nn.init.zeros_(self.classifier.bias)

    def hf_config(self) -> dict[str, Any]:
        names = self.label_names or [f"LABEL_{i}" for i in range(self.num_labels)]
        return {"num_labels": self.num_labels, "id2label": {str(i): n for i, n in enumerate(names)},
                "label2id": {n: i for i, n in enumerate(names)}}

    def forward(self, encoder_output: EncoderOutput, batch: dict[str, Any] | None = None) -> HeadOutput:
        pooled = encoder_output.pooler_output
        if pooled is None:
            raise SpecError("head image_classification needs the encoder's pooler_output; "
                            "set model.encoder.add_pooling_layer: true.")
        logits = self.classifier(pooled)
        labels = (batch or {}).get("labels")
        if labels is None:
            return HeadOutput(logits=logits)
        return HeadOutput(logits=logits, loss=self.loss(logits, torch.as_tensor(labels).to(logits.device)))

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
        if labels.is_floating_point() and labels.ndim == 2:  # mixup / cutmix / smoothed targets
            return -(labels * F.log_softmax(logits, dim=-1)).sum(-1).mean()
        return F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1).long())

    # ------------------------------------------------------------------ predictions
    def predict(self, output: HeadOutput, batch: dict[str, Any] | None = None) -> list[Any]:
        ids = output.logits.detach().argmax(-1).tolist()
        return [self.label_names[i] if self.label_names else i for i in ids]

    def describe(self, output: HeadOutput, batch: dict[str, Any], *, top_k: int = 5, decode: Any = None) -> list[dict]:
        """Per image: the best label, its softmax probability and the ``top_k`` labels (with one
        output, a regression: ``{"score": value}``)."""
        logits = output.logits.detach().float()
        if self.num_labels == 1:
            return [{"score": value} for value in logits.squeeze(-1).tolist()]
        return classification_results(logits.softmax(-1), self.label_names, top_k)

    def references(self, batch: dict[str, Any]) -> list[Any]:
        labels = batch.get("labels")
        if labels is None:
            return super().references(batch)
        ids = hard_labels(torch.as_tensor(labels)).tolist()
        return [self.label_names[i] if self.label_names else i for i in ids]

    def eval_counts(self, output: HeadOutput, batch: dict[str, Any]) -> dict[str, Any]:
        labels = batch.get("labels")
        if labels is None or self.num_labels == 1:
            return {}
        target = hard_labels(torch.as_tensor(labels)).to(output.logits.device)
        logits = output.logits.detach()
        k = min(5, self.num_labels)
        top5 = (logits.topk(k, dim=-1).indices == target[:, None]).any(-1).sum()
        counts = confusion_counts(logits.argmax(-1), target, self.num_labels)
        counts["top5_correct"] = float(top5)
        counts["top5_total"] = float(target.numel())
        return counts

    def summarize(self, counts: dict[str, Any]) -> dict[str, float]:
        top5 = {k: counts[k] for k in ("top5_correct", "top5_total") if k in counts}
        rest = {k: v for k, v in counts.items() if k not in top5}
        summary = classification_summary(rest, self.num_labels)
        if top5.get("top5_total"):
            summary["top5"] = 100.0 * top5["top5_correct"] / top5["top5_total"]
        return summary


def hard_labels(labels: Tensor) -> Tensor:
    """Class ids from ids or soft targets (the most likely class)."""
    return labels.argmax(-1) if labels.is_floating_point() and labels.ndim == 2 else labels.view(-1).long()
