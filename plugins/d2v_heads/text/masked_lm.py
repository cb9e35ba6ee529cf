"""Masked language modelling: Hugging Face's ``Data2VecTextForMaskedLM`` head and loss.

The LM layer of :mod:`d2v_heads.text.lm_head` (decoder tied to the word embeddings), cross-entropy
over every position whose label is not -100 (the text processor's BERT masking puts the original
id at the corrupted positions and -100 elsewhere), averaged over those positions, as HF.

Spec usage::

    head: {name: masked_lm, top_k: 5}

``predict`` is fill-mask: for each ``<mask>`` position (``batch["mask_token_id"]``, else the
head's ``mask_token_id``) the ``top_k`` token ids and their probabilities. Metrics:
``accuracy`` (percent of labelled positions whose argmax is the label) and ``perplexity``
(``exp`` of the token-weighted mean NLL over the whole evaluation set).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from d2v import hookimpl
from d2v.api.errors import SpecError
from d2v import EncoderOutput, HeadOutput
from d2v_heads.text.lm_head import IGNORE_INDEX, LanguageModelHead, perplexity, token_nll


@hookimpl
def d2v_register(register):
    register("head", "masked_lm", "d2v_heads.text.masked_lm:MaskedLMHead",
             summary="masked LM (HF Data2VecTextForMaskedLM: dense, gelu, LayerNorm, tied decoder + bias); "
                     "top-k fill-mask; masked-token accuracy, perplexity",
        modalities=("text",),
    )


class MaskedLMHead(LanguageModelHead):
    """Parameters (keyword-only): ``input_dim`` and ``vocab_size`` (injected), ``layer_norm_eps``,
    ``activation``, ``tie_word_embeddings``, ``top_k`` (fill-mask candidates per position),
    ``mask_token_id`` (used when the batch does not carry one)."""

    tasks = ("fill-mask",)

    def __init__(
        self,
        *,
        input_dim: int,
        vocab_size: int | None = None,
        layer_norm_eps: float = 1e-5,
        activation: str = "gelu",
        tie_word_embeddings: bool = True,
        top_k: int = 5,
        mask_token_id: int | None = None,
    ) -> None:
        super().__init__(input_dim=input_dim, vocab_size=vocab_size, layer_norm_eps=layer_norm_eps,
                         activation=activation, tie_word_embeddings=tie_word_embeddings, name="masked_lm")
        if int(top_k) < 1:
            raise SpecError(f"masked_lm head: top_k must be >= 1, got {top_k}.")
        self.top_k = int(top_k)
        self.mask_token_id = None if mask_token_id is None else int(mask_token_id)

    def hf_config(self) -> dict[str, Any]:
        return self.lm_config()

    def forward(self, encoder_output: EncoderOutput, batch: dict[str, Any] | None = None) -> HeadOutput:
        logits = self.token_logits(encoder_output.last_hidden_state)
        labels = (batch or {}).get("labels")
        if labels is None:
            return HeadOutput(logits=logits)
        nll, tokens = token_nll(logits, labels)
        # HF: CrossEntropyLoss() mean over the labelled positions (a batch with none gives 0, not nan)
        loss = nll / tokens.clamp(min=1)
        return HeadOutput(logits=logits, loss=loss, extras={"nll_sum": nll.detach(), "tokens": tokens})

    # ------------------------------------------------------------------ predictions
    def _mask_id(self, batch: dict[str, Any]) -> int:
        mask_id = batch.get("mask_token_id", self.mask_token_id)
        if mask_id is None:
            raise SpecError("masked_lm head: fill-mask needs the <mask> token id: the text processor puts "
                            "mask_token_id in the batch; otherwise set model.head.mask_token_id.")
        return int(mask_id)

    def _mask_candidates(self, output: HeadOutput, batch: dict[str, Any], k: int) -> list[list[tuple]]:
        """Per example, left to right, ``(position, scores, token_ids)`` of the ``k`` most probable
        tokens at each ``<mask>``; the softmax runs at the masked positions only, not over the
        whole ``(B, T, V)`` logits."""
        where = batch["inputs"] == self._mask_id(batch)
        rows, positions = where.nonzero(as_tuple=True)
        scores, ids = output.logits.detach()[rows, positions].float().softmax(-1).topk(min(k, self.vocab_size))
        out: list[list[tuple]] = [[] for _ in range(where.shape[0])]
        for b, p, s, i in zip(rows.tolist(), positions.tolist(), scores.tolist(), ids.tolist()):
            out[b].append((p, s, i))
        return out

    def predict(self, output: HeadOutput, batch: dict[str, Any]) -> list[list[dict[str, Any]]]:
        """Per example, one entry per ``<mask>`` position: ``{"position", "token_ids", "scores"}``
        with the ``top_k`` most probable tokens (probabilities, best first), as HF's fill-mask."""
        return [[{"position": p, "token_ids": ids, "scores": scores} for p, scores, ids in example]
                for example in self._mask_candidates(output, batch, self.top_k)]

    def describe(self, output: HeadOutput, batch: dict[str, Any], *, top_k: int = 5, decode: Any = None) -> list[dict]:
        """Fill-mask as Hugging Face's pipeline: per example, one list per ``<mask>`` (left to
        right) of the ``top_k`` candidates ``{"score", "token_id", "token", "sequence"}``, where
        ``sequence`` is the text with that mask filled (``token``/``sequence`` need ``decode``)."""
        inputs: Tensor = batch["inputs"]
        padding = batch.get("padding_mask")
        out = []
        for b, example in enumerate(self._mask_candidates(output, batch, int(top_k))):
            real = inputs[b] if padding is None else inputs[b][~padding[b].bool()]
            masks = []
            for position, scores, ids in example:
                candidates = []
                for score, token in zip(scores, ids):
                    candidate: dict[str, Any] = {"score": score, "token_id": token}
                    if decode is not None:
                        filled = real.clone()
                        filled[position] = token
                        candidate.update(token=decode([token]), sequence=decode(filled.tolist()))
                    candidates.append(candidate)
                masks.append(candidates)
            out.append({"masks": masks})
        return out

    def references(self, batch: dict[str, Any]) -> list[Any]:
        """Per example, the original token id at each labelled position ``{position: id}``."""
        labels = batch.get("labels")
        if labels is None:
            return super().references(batch)
        return [{p: t for p, t in enumerate(row) if t != IGNORE_INDEX} for row in labels.tolist()]

    # ------------------------------------------------------------------ metrics
    def eval_counts(self, output: HeadOutput, batch: dict[str, Any]) -> dict[str, float]:
        labels = batch.get("labels")
        if labels is None:
            return {}
        labels = labels.to(output.logits.device)
        keep = labels != IGNORE_INDEX
        correct = (output.logits.argmax(-1) == labels) & keep
        extras = output.extras or {}
        nll = extras.get("nll_sum")
        if nll is None:
            nll, _ = token_nll(output.logits, labels)
        return {"mlm_correct": float(correct.sum()), "mlm_tokens": float(keep.sum()), "mlm_nll_sum": float(nll)}

    def summarize(self, counts: dict[str, float]) -> dict[str, float]:
        tokens = counts.get("mlm_tokens", 0.0)
        if not tokens:
            return {}
        return {"accuracy": 100.0 * counts["mlm_correct"] / tokens,
                "perplexity": perplexity(counts["mlm_nll_sum"], tokens)}


__all__ = ["MaskedLMHead"]
