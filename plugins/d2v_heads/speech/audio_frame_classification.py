"""Frame labels (voice activity, speaker diarization, per-frame events): Hugging Face's
``Data2VecAudioForAudioFrameClassification`` head.

``classifier`` (Linear ``input_dim -> num_labels``) on every frame, optionally on the weighted
sum of all hidden states (``use_weighted_layer_sum``). Labels are ``(B, F, num_labels)``
multi-hot rows per frame (the ``audio`` processor builds them from segments, marking padded
frames -100); they are cut or padded (with -100) to the model's ``T`` frames. Frames whose
label row holds a negative value are left out of the loss and the metrics.

``loss``:

* ``"bce"`` (default): multi-label binary cross-entropy, one sigmoid per label (overlapping
  speakers, several events at once);
* ``"cross_entropy"``: Hugging Face's loss, softmax cross-entropy against the *argmax* of each
  label row (one class per frame). HF has no padding marker, so it counts every frame of the
  labels it is given, padded frames included; given the same labels, so does d2v.

Metrics (percent): ``frame_f1`` (micro-F1 over frames x labels) and ``frame_accuracy`` (frames
whose whole label row is right); with ``diarization: true`` also the diarization error rate
``der`` (+ miss / false alarm / confusion), mapping predicted to reference speakers per
recording (see :mod:`d2v_heads.speech.verification_metrics`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from d2v import hookimpl
from d2v.api.errors import SpecError
from d2v import EncoderOutput, Head, HeadOutput
from d2v_heads.shared.label_names import resolve_label_names
from d2v_heads.shared.classification_metrics import multilabel_counts, multilabel_summary
from d2v_heads.shared.layer_sum import head_input, make_layer_weights
from d2v_heads.speech.verification_metrics import diarization_counts, diarization_summary

LOSSES = ("bce", "cross_entropy")
IGNORE = -100.0


@hookimpl
def d2v_register(register):
    register("head", "audio_frame_classification", "d2v_heads.speech.audio_frame_classification:AudioFrameClassificationHead",
             summary="per-frame labels (VAD, diarization): linear classifier, optional weighted layer sum, BCE or HF "
                     "cross-entropy (HF Data2VecAudioForAudioFrameClassification); frame F1, DER")


def align_frame_labels(labels: Tensor, frames: int) -> Tensor:
    """``(B, F, L)`` labels cut or padded (with -100) to ``frames`` frames."""
    have = labels.shape[1]
    if have >= frames:
        return labels[:, :frames]
    pad = labels.new_full((labels.shape[0], frames - have, labels.shape[2]), IGNORE)
    return torch.cat([labels, pad], dim=1)


class AudioFrameClassificationHead(Head):
    """Per-frame (multi-)label classification.

    Parameters (keyword-only): ``input_dim``/``num_layers`` (injected), ``num_labels`` or
    ``label_names``, ``use_weighted_layer_sum``, ``loss`` (``bce`` | ``cross_entropy``),
    ``threshold`` (sigmoid probability above which a label is active, ``bce`` only),
    ``diarization`` (report DER with speaker mapping), ``frame_seconds`` (frame hop, for the
    segments :meth:`predict` writes; 0.02 = data2vec's 50 Hz).
    """

    tasks = ("audio-frame-classification",)

    def __init__(
        self,
        *,
        input_dim: int,
        num_labels: int | None = None,
        label_names: list[str] | None = None,
        use_weighted_layer_sum: bool = False,
        num_layers: int | None = None,
        loss: str = "bce",
        threshold: float = 0.5,
        diarization: bool = False,
        frame_seconds: float = 0.02,
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise SpecError(f"audio_frame_classification: loss must be one of {', '.join(LOSSES)}, got {loss!r}.")
        if not 0.0 < float(threshold) < 1.0:
            raise SpecError(f"audio_frame_classification: threshold must be in (0, 1), got {threshold!r}.")
        self.label_names = resolve_label_names(num_labels, label_names, "audio_frame_classification")
        self.num_labels = len(self.label_names)
        self.input_dim = int(input_dim)
        self.loss_name = loss
        self.threshold = float(threshold)
        self.diarization = bool(diarization)
        self.frame_seconds = float(frame_seconds)
        self.use_weighted_layer_sum = bool(use_weighted_layer_sum)
        self.needs_hidden_states = self.use_weighted_layer_sum
        self.layer_weights = make_layer_weights(self.use_weighted_layer_sum, num_layers)
        self.classifier = nn.Linear(self.input_dim, self.num_labels)

    def hf_config(self) -> dict[str, Any]:
        return {
            "use_weighted_layer_sum": self.use_weighted_layer_sum,
            "id2label": {str(i): name for i, name in enumerate(self.label_names)},
            "label2id": {name: i for i, name in enumerate(self.label_names)},
        }

    # ------------------------------------------------------------------ forward / loss
    def forward(self, encoder_output: EncoderOutput, batch: dict[str, Any] | None = None) -> HeadOutput:
        logits = self.classifier(head_input(encoder_output, self.layer_weights))
        labels = self.labels_for(logits, batch or {})
        loss = None if labels is None else self.frame_loss(logits, labels)
        extras = {} if labels is None else {"labels": labels}
        if encoder_output.padding_mask is not None:  # which frames are real, for describe
            extras["padding_mask"] = encoder_output.padding_mask
        return HeadOutput(logits=logits, loss=loss, extras=extras)

    def labels_for(self, logits: Tensor, batch: dict[str, Any]) -> Tensor | None:
        labels = batch.get("labels")
        if labels is None:
            return None
        labels = torch.as_tensor(labels, device=logits.device)
        if labels.dim() != 3 or labels.shape[-1] != self.num_labels:
            raise SpecError(f"audio_frame_classification: labels must be (batch, frames, {self.num_labels}) "
                            f"multi-hot rows, got shape {tuple(labels.shape)}.")
        return align_frame_labels(labels.to(logits.dtype), logits.shape[1])

    def frame_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        flat_logits = logits.reshape(-1, self.num_labels)
        flat_labels = labels.reshape(-1, self.num_labels)
        keep = (flat_labels >= 0).all(-1)
        if not bool(keep.any()):  # nothing labelled in this batch: a zero that keeps the graph
            return flat_logits.sum() * 0.0
        if self.loss_name == "cross_entropy":
            return nn.functional.cross_entropy(flat_logits[keep], flat_labels[keep].argmax(-1))
        return nn.functional.binary_cross_entropy_with_logits(flat_logits[keep], flat_labels[keep])

    # ------------------------------------------------------------------ evaluation
    def active(self, logits: Tensor) -> Tensor:
        """Boolean ``(B, T, L)`` predicted activity."""
        if self.loss_name == "cross_entropy":
            return nn.functional.one_hot(logits.argmax(-1), self.num_labels).bool()
        return torch.sigmoid(logits.float()) > self.threshold

    def predict(self, output: HeadOutput, batch: dict[str, Any] | None = None) -> list[str]:
        """Per example: the predicted segments as ``label start-end`` (seconds), ``;``-separated."""
        rows = []
        for example in self.active(output.logits).cpu():
            rows.append("; ".join(f"{self.label_names[k]} {start * self.frame_seconds:.2f}-{end * self.frame_seconds:.2f}"
                                  for k, start, end in self._segments(example)))
        return rows

    def _segments(self, activity: Tensor) -> list[tuple[int, int, int]]:
        """``(label index, start frame, end frame)`` of each run of active frames ``(T, K)``."""
        out = []
        for k in range(len(self.label_names)):
            padded = torch.cat([torch.zeros(1, dtype=torch.int8), activity[:, k].to(torch.int8), torch.zeros(1, dtype=torch.int8)])
            edges = torch.nonzero(padded.diff()).flatten().tolist()
            out.extend((k, start, end) for start, end in zip(edges[::2], edges[1::2]))
        return out

    def describe(self, output: HeadOutput, batch: dict[str, Any], *, top_k: int = 5, decode: Any = None) -> list[dict]:
        """Per utterance (its real frames only): ``segments`` ``[{"label", "start", "end",
        "score"}]`` in seconds, ``score`` the label's mean probability over the segment
        (sigmoid for ``bce``, softmax for ``cross_entropy``), ordered by start."""
        logits = output.logits.detach().float()
        probs = (torch.sigmoid(logits) if self.loss_name == "bce" else logits.softmax(-1)).cpu()
        active = self.active(logits).cpu()  # one transfer, not one per utterance and label
        padding = (output.extras or {}).get("padding_mask")
        out = []
        for b in range(logits.shape[0]):
            frames = logits.shape[1] if padding is None else int((~padding[b].bool()).sum())
            segments = [{"label": self.label_names[k], "start": round(start * self.frame_seconds, 4),
                         "end": round(end * self.frame_seconds, 4), "score": float(probs[b, start:end, k].mean())}
                        for k, start, end in self._segments(active[b, :frames])]
            out.append({"segments": sorted(segments, key=lambda s: (s["start"], s["label"]))})
        return out

    def references(self, batch: dict[str, Any]) -> list[Any]:
        labels = batch.get("labels")
        if labels is None:
            return super().references(batch)
        labels = torch.as_tensor(labels)
        return ["; ".join(self._segments(row[(row >= 0).all(-1)] > 0.5)) for row in labels.cpu()]

    def eval_counts(self, output: HeadOutput, batch: dict[str, Any]) -> dict[str, float]:
        labels = (output.extras or {}).get("labels")
        if labels is None:
            return {}
        pred = self.active(output.logits)
        keep = (labels >= 0).all(-1)
        counts = multilabel_counts(pred[keep], labels[keep] > 0.5)
        if self.diarization:
            for b in range(labels.shape[0]):
                part = diarization_counts(pred[b][keep[b]], labels[b][keep[b]] > 0.5, permute=True)
                for key, value in part.items():
                    counts[key] = counts.get(key, 0.0) + value
        return counts

    def summarize(self, counts: dict[str, float]) -> dict[str, float]:
        summary = multilabel_summary(counts)
        metrics = {}
        if summary:
            metrics = {"frame_f1": summary["micro_f1"], "frame_accuracy": summary["subset_accuracy"]}
        if self.diarization:
            metrics.update(diarization_summary(counts))
        return metrics


__all__ = ["AudioFrameClassificationHead", "align_frame_labels"]
