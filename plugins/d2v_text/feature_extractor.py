"""data2vec-text's input embeddings: token ids -> vectors (Hugging Face ``Data2VecTextEmbeddings``,
fairseq's RoBERTa ``TransformerEncoder`` embedding with ``layernorm_embedding``).

``word + position + token type``, then LayerNorm and dropout. Positions are RoBERTa's (fairseq's
learned ``PositionalEmbedding``): they count only real tokens and start at ``padding_idx + 1``,
and a padding token sits at position ``padding_idx`` (whose embedding row is zero at init), so a
sequence gets the same positions whether it is padded on the left, on the right or not at all.

``type_vocab_size: 0`` leaves the token-type table out, as fairseq's data2vec text models
(1.0 ``TransformerEncoder`` and 2.0 ``TextLocalEncoder``) have none; Hugging Face's
``Data2VecText`` always has one, so the exporter writes it as a single row of zeros (what
Hugging Face's own conversion of the fairseq checkpoints did).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from d2v.api.errors import SpecError
from d2v import ExampleInputs, FeatureExtractor, FeatureExtractorOutput


def position_ids_from_input_ids(input_ids: Tensor, padding_idx: int, past_length: int = 0) -> Tensor:
    """RoBERTa position ids: ``padding_idx + past_length + k`` for the ``k``-th real token (1-based)
    of each row, ``padding_idx`` at padding tokens (HF's ``create_position_ids_from_input_ids``)."""
    real = input_ids.ne(padding_idx).long()
    return (real.cumsum(dim=1) + past_length) * real + padding_idx


class TextEmbeddings(FeatureExtractor):
    """Token ids ``(B, S)`` -> ``(B, S, dim)`` features (defaults: data2vec-text Base).

    The ``padding_mask`` is handed on unchanged: while decoding with a cache it covers the past
    tokens too (like Hugging Face's ``attention_mask``), which the encoder needs for its keys.
    ``batch_keys``: ``token_type_ids`` (default zeros; must be zeros without a token-type table), ``position_ids`` (default: from the ids as
    above) and ``past_key_values`` (a cache whose ``get_seq_length()`` offsets the positions).
    """

    batch_keys = ("token_type_ids", "position_ids", "past_key_values")

    def __init__(
        self,
        *,
        dim: int = 768,
        vocab_size: int = 50265,
        max_position_embeddings: int = 514,
        type_vocab_size: int = 1,
        padding_idx: int = 1,
        layer_norm_eps: float = 1e-5,
        dropout: float = 0.1,
        initializer_range: float = 0.02,
    ):
        #: the constructor arguments (what the Hugging Face exporter reads back)
        hparams = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        for key in ("dim", "vocab_size", "max_position_embeddings"):
            if int(hparams[key]) < 1:
                raise SpecError(f"text.embeddings: {key} must be >= 1, got {hparams[key]}.")
        if int(type_vocab_size) < 0:
            raise SpecError(f"text.embeddings: type_vocab_size must be >= 0 (0 = no token types, as fairseq), "
                            f"got {type_vocab_size}.")
        if not 0 <= padding_idx < min(vocab_size, max_position_embeddings):
            raise SpecError(f"text.embeddings: padding_idx {padding_idx} must be a token id below vocab_size "
                            f"({vocab_size}) and max_position_embeddings ({max_position_embeddings}).")
        self.hparams = hparams
        self.dim = int(dim)
        self.vocab_size = int(vocab_size)
        self.padding_idx = int(padding_idx)
        self.max_position_embeddings = int(max_position_embeddings)
        self.word_embeddings = nn.Embedding(vocab_size, dim, padding_idx=padding_idx)
        self.position_embeddings = nn.Embedding(max_position_embeddings, dim, padding_idx=padding_idx)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, dim) if type_vocab_size else None
        self.layer_norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        for embedding in (self.word_embeddings, self.position_embeddings, self.token_type_embeddings):
            if embedding is not None:
                nn.init.normal_(embedding.weight, std=initializer_range)
        with torch.no_grad():  # HF zeroes the padding rows after its normal init
            self.word_embeddings.weight[padding_idx].zero_()
            self.position_embeddings.weight[padding_idx].zero_()

    def input_embeddings(self) -> nn.Embedding:
        """The word embedding table (an LM head ties its output layer to it)."""
        return self.word_embeddings

    def example_inputs(self, batch_size: int = 2, length: int | None = None, *, seed: int = 0) -> ExampleInputs:
        """Random token ids, the first row ``length`` tokens long (default 16), the others shorter
        and padded with ``padding_idx`` on the right, with Hugging Face's ``attention_mask``."""
        longest = self.max_position_embeddings - self.padding_idx - 1
        length = int(length or min(16, longest))
        if not 2 <= length <= longest:
            raise SpecError(f"text.embeddings: example inputs must be 2..{longest} tokens long, got {length}.")
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, self.vocab_size - 1, (batch_size, length), generator=generator)
        ids = ids + (ids >= self.padding_idx).long()  # any token but padding
        attention_mask = torch.ones(batch_size, length, dtype=torch.long)
        for row in range(1, batch_size):
            real = max(1, length - row * length // (2 * batch_size))
            ids[row, real:] = self.padding_idx
            attention_mask[row, real:] = 0
        axes = {0: "batch", 1: "sequence"}
        return ExampleInputs({"input_ids": ids, "attention_mask": attention_mask},
                             {"input_ids": axes, "attention_mask": axes})

    def forward(
        self,
        inputs: Tensor,
        padding_mask: Tensor | None = None,
        *,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: Any = None,
    ) -> FeatureExtractorOutput:
        if inputs.dim() != 2 or inputs.is_floating_point():
            raise SpecError(f"text.embeddings: inputs must be (batch, length) token ids, got a "
                            f"{inputs.dtype} tensor of shape {tuple(inputs.shape)}.")
        past_length = 0 if past_key_values is None else int(past_key_values.get_seq_length())
        if position_ids is None:
            position_ids = position_ids_from_input_ids(inputs, self.padding_idx, past_length)
        too_far = int(position_ids.max()) if position_ids.numel() else 0
        if too_far >= self.max_position_embeddings:
            raise SpecError(f"text.embeddings: position {too_far} is beyond max_position_embeddings "
                            f"{self.max_position_embeddings} (at most {self.max_position_embeddings - self.padding_idx - 1} "
                            f"tokens); truncate the inputs (processor max_length) or use a model with more positions.")
        x = self.word_embeddings(inputs)
        if self.token_type_embeddings is not None:  # HF's order: words + types, then positions
            x = x + self.token_type_embeddings(torch.zeros_like(inputs) if token_type_ids is None else token_type_ids)
        elif token_type_ids is not None and bool(token_type_ids.ne(0).any()):
            raise SpecError("text.embeddings: the batch has non-zero token_type_ids but the model has no token-type "
                            "embedding (type_vocab_size: 0, as fairseq's data2vec); drop token_type_ids or set "
                            "type_vocab_size >= 1.")
        x = x + self.position_embeddings(position_ids)
        x = self.dropout(self.layer_norm(x))
        if padding_mask is not None:
            padding_mask = padding_mask.bool()
        return FeatureExtractorOutput(features=x, padding_mask=padding_mask)
