"""The language-model output layer shared by the ``masked_lm`` and ``causal_lm`` heads.

Hugging Face's ``Data2VecTextLMHead`` (RoBERTa's): ``dense -> gelu -> LayerNorm -> decoder``,
where the decoder's weight is the input word-embedding matrix (tied through
``tie_input_embeddings``) and its bias is the separate parameter ``bias`` (HF ties
``lm_head.decoder.bias`` to ``lm_head.bias``; here the decoder has no bias of its own, so the
state dict holds it once, as ``head.bias``). Parameter names match HF's ``lm_head.*``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from d2v.api.errors import SpecError
from d2v import Head
from d2v.nn.layers import make_activation

IGNORE_INDEX = -100


class LanguageModelHead(Head):
    """``dense``, ``layer_norm``, ``decoder`` (``V x D``, tied to the word embeddings) and
    ``bias`` (``V``); subclasses add the loss, predictions and metrics."""

    def __init__(
        self,
        *,
        input_dim: int,
        vocab_size: int | None = None,
        layer_norm_eps: float = 1e-5,
        activation: str = "gelu",
        tie_word_embeddings: bool = True,
        initializer_range: float = 0.02,
        name: str = "lm",
    ) -> None:
        super().__init__()
        if vocab_size is None:
            raise SpecError(f"{name} head: vocab_size is unknown; it is injected from a feature extractor with a "
                            f"vocabulary (text.embeddings), or set model.head.vocab_size.")
        self.input_dim, self.vocab_size = int(input_dim), int(vocab_size)
        self.layer_norm_eps = float(layer_norm_eps)
        self.activation_name = activation
        self.tie_word_embeddings = bool(tie_word_embeddings)
        self.dense = nn.Linear(self.input_dim, self.input_dim)
        self.activation = make_activation(activation)
        self.layer_norm = nn.LayerNorm(self.input_dim, eps=self.layer_norm_eps)
        self.decoder = nn.Linear(self.input_dim, self.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(self.vocab_size))
        for linear in (self.dense, self.decoder):
            nn.init.normal_(linear.weight, std=initializer_range)
        nn.init.zeros_(self.dense.bias)

    def tie_input_embeddings(self, embedding: nn.Embedding) -> None:
        """Share the decoder weight with the input word embeddings (when ``tie_word_embeddings``)."""
        if not self.tie_word_embeddings:
            return
        if tuple(embedding.weight.shape) != (self.vocab_size, self.input_dim):
            raise SpecError(f"LM head: the word embeddings are {tuple(embedding.weight.shape)} but the head predicts "
                            f"{self.vocab_size} tokens from {self.input_dim}-wide states; drop model.head.vocab_size "
                            f"so it follows the feature extractor.")
        self.decoder.weight = embedding.weight

    def token_logits(self, hidden: Tensor) -> Tensor:
        """``(..., D)`` hidden states -> ``(..., V)`` token logits."""
        x = self.layer_norm(self.activation(self.dense(hidden)))
        return nn.functional.linear(x, self.decoder.weight, self.bias)

    def lm_config(self) -> dict[str, Any]:
        """The ``Data2VecTextConfig`` fields the LM layer determines."""
        return {"vocab_size": self.vocab_size, "layer_norm_eps": self.layer_norm_eps,
                "tie_word_embeddings": self.tie_word_embeddings}

    def extra_repr(self) -> str:
        return f"vocab={self.vocab_size}, tied={self.tie_word_embeddings}"


def token_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed negative log-likelihood (float32) of the ``labels`` that are not -100, and their count."""
    labels = labels.to(logits.device).reshape(-1)
    nll = nn.functional.cross_entropy(logits.float().reshape(labels.numel(), -1), labels,
                                      ignore_index=IGNORE_INDEX, reduction="sum")
    return nll, (labels != IGNORE_INDEX).sum()


def perplexity(nll_sum: float, tokens: float) -> float:
    """``exp`` of the mean token NLL (``inf`` when it overflows, ``nan`` with no tokens)."""
    if not tokens:
        return float("nan")
    mean = nll_sum / tokens
    return float("inf") if mean > 700 else float(torch.tensor(mean, dtype=torch.float64).exp())


__all__ = ["IGNORE_INDEX", "LanguageModelHead", "perplexity", "token_nll"]
