"""A complete head: logits, loss, predictions and metrics, from the batch's transcripts."""

from __future__ import annotations

import torch
from torch import nn

from d2v import EncoderOutput, Head, HeadOutput


class WordCountHead(Head):
    """Mean-pool the non-padded frames, then a linear layer over ``0..max_words`` words."""

    def __init__(self, *, input_dim: int, max_words: int = 8, dropout: float = 0.1):
        super().__init__()
        self.max_words = max_words
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(input_dim, max_words + 1)

    def labels(self, batch) -> torch.Tensor:
        counts = [min(len(text.split()), self.max_words) for text in batch["text"]]
        return torch.tensor(counts, device=batch["inputs"].device)

    def forward(self, encoder_output: EncoderOutput, batch) -> HeadOutput:
        hidden = encoder_output.last_hidden_state
        if encoder_output.padding_mask is not None:
            keep = (~encoder_output.padding_mask).unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * keep).sum(1) / keep.sum(1).clamp(min=1)
        else:
            pooled = hidden.mean(1)
        logits = self.classifier(self.dropout(pooled))
        loss = nn.functional.cross_entropy(logits.float(), self.labels(batch)) if "text" in batch else None
        return HeadOutput(logits=logits, loss=loss)

    def predict(self, output: HeadOutput, batch) -> list[int]:
        return output.logits.argmax(-1).tolist()

    def eval_counts(self, output: HeadOutput, batch) -> dict[str, float]:
        correct = (output.logits.argmax(-1) == self.labels(batch)).sum()
        return {"correct": float(correct), "examples": float(len(batch["text"]))}

    def summarize(self, counts: dict[str, float]) -> dict[str, float]:
        return {"accuracy": 100.0 * counts["correct"] / max(1.0, counts["examples"])}

    def references(self, batch) -> list[int]:
        return self.labels(batch).tolist()
