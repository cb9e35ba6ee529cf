"""Token classification (NER, POS): Hugging Face's ``Data2VecTextForTokenClassification``.

``dropout -> classifier`` on every token, cross-entropy over the tokens whose label is not
-100 (the text processor labels the first sub-token of each word and sets -100 elsewhere).

Evaluation is per **word**, as seqeval scores CoNLL: each word takes the prediction of its first
sub-token (through the batch's ``word_ids``); words cut off by truncation are predicted ``O`` so
their entities count as missed. Entity-level ``precision``/``recall``/``f1`` (micro, percent) are
seqeval's default (see :mod:`d2v_heads.text.entities`); ``accuracy`` is the word-level tag accuracy
(seqeval's ``accuracy_score``) and ``token_accuracy`` the accuracy over labelled sub-tokens.

Spec usage::

    head: {name: token_classification, label_names: [O, B-PER, I-PER, B-ORG, I-ORG, B-LOC, I-LOC, B-MISC, I-MISC]}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from d2v import hookimpl
from d2v.api.errors import SpecError
from d2v import EncoderOutput, Head, HeadOutput
from d2v_heads.text.entities import entity_counts, entity_scores, get_entities
from d2v_heads.text.lm_head import IGNORE_INDEX
from d2v_heads.shared.label_names import resolve_label_names


@hookimpl
def d2v_register(register):
    register("head", "token_classification", "d2v_heads.text.token_classification:TokenClassificationHead",
             summary="token classification (HF Data2VecTextForTokenClassification: dropout + linear, CE with -100); "
                     "seqeval entity precision/recall/F1 on words, accuracy",
        modalities=("text",),
    )


def word_predictions(token_predictions: Sequence[int], word_ids: Sequence[int | None], num_words: int,
                     default: int) -> list[int]:
    """Per word, the prediction at its first sub-token; ``default`` for words with no token
    (truncated away)."""
    out = [default] * num_words
    seen: set[int] = set()
    for pred, word in zip(token_predictions, word_ids):
        if word is not None and word not in seen and word < num_words:
            out[word] = int(pred)
            seen.add(word)
    return out


class TokenClassificationHead(Head):
    """Parameters (keyword-only): ``input_dim`` (injected), ``label_names`` (tag names; needed for the
    entity metrics) or ``num_labels``, ``classifier_dropout`` (HF's fallback
    ``hidden_dropout_prob``, 0.1), ``outside_label`` (the tag given to truncated words, ``O``)."""

    tasks = ("token-classification",)

    def __init__(
        self,
        *,
        input_dim: int,
        num_labels: int | None = None,
        label_names: list[str] | None = None,
        classifier_dropout: float = 0.1,
        outside_label: str = "O",
        initializer_range: float = 0.02,
    ) -> None:
        super().__init__()
        self.label_names = resolve_label_names(num_labels, label_names, "token_classification", default=False)
        self.num_labels = len(self.label_names) if self.label_names is not None else int(num_labels)
        self.outside_label = str(outside_label)
        if self.label_names is not None and self.outside_label not in self.label_names:
            raise SpecError(f"token_classification: outside_label '{outside_label}' is not one of the labels "
                            f"{self.label_names}; add it or set outside_label to the tag meaning 'no entity'.")
        self.classifier_dropout = float(classifier_dropout)
        self.dropout = nn.Dropout(self.classifier_dropout)
        self.classifier = nn.Linear(int(input_dim), self.num_labels)
        nn.init.normal_(self.classifier.weight, std=initializer_range)
        nn.init.zeros_(self.classifier.bias)

    @property
    def names(self) -> list[str]:
        return self.label_names or [f"LABEL_{i}" for i in range(self.num_labels)]

    def hf_config(self) -> dict[str, Any]:
        names = self.names
        return {"num_labels": self.num_labels, "classifier_dropout": self.classifier_dropout,
                "id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)}}

    def forward(self, encoder_output: EncoderOutput, batch: dict[str, Any] | None = None) -> HeadOutput:
        logits = self.classifier(self.dropout(encoder_output.last_hidden_state))
        labels = (batch or {}).get("labels")
        loss = None
        if labels is not None:
            labels = torch.as_tensor(labels).to(logits.device).long()
            loss = nn.functional.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return HeadOutput(logits=logits, loss=loss)

    # ------------------------------------------------------------------ predictions
    def _word_ids(self, batch: dict[str, Any]) -> list[list[int | None]]:
        word_ids = batch.get("word_ids")
        if word_ids is None:
            raise SpecError("token_classification head: the batch has no word_ids (which token starts which word); "
                            "use the text processor with a word-level dataset (e.g. conll).")
        return word_ids

    def _num_words(self, batch: dict[str, Any], row: int, word_ids: Sequence[int | None]) -> int:
        words = batch.get("words")
        if words is not None:
            return len(words[row])
        return 1 + max((w for w in word_ids if w is not None), default=-1)

    def predict(self, output: HeadOutput, batch: dict[str, Any]) -> list[list[str]]:
        """Per example, one tag name per word (from its first sub-token)."""
        best = output.logits.detach().argmax(-1).tolist()
        outside = self.names.index(self.outside_label) if self.outside_label in self.names else 0
        out = []
        for row, word_ids in enumerate(self._word_ids(batch)):
            ids = word_predictions(best[row], word_ids, self._num_words(batch, row, word_ids), outside)
            out.append([self.names[i] for i in ids])
        return out

    def describe(self, output: HeadOutput, batch: dict[str, Any], *, top_k: int = 5, decode: Any = None) -> list[dict]:
        """Per example: ``words`` ``[{"word", "entity", "score"}]`` (the tag of the word's first
        sub-token and its softmax probability) and the ``entities`` those tags spell
        ``[{"entity_group", "word", "start_word", "end_word", "score"}]`` (as Hugging Face's
        ``aggregation_strategy="first"``; ``end_word`` exclusive, ``score`` the mean over its
        words). With the texts in the batch, words and entities also get character ``start`` /
        ``end`` offsets."""
        probs = output.logits.detach().float().softmax(-1).cpu()
        tags = self.predict(output, batch)
        texts = batch.get("texts")
        out = []
        for row, (word_ids, row_tags) in enumerate(zip(self._word_ids(batch), tags)):
            words = list(batch["words"][row]) if batch.get("words") is not None else [str(i) for i in range(len(row_tags))]
            scores = [1.0] * len(words)  # words cut off by truncation: tagged outside, certain
            seen: set[int] = set()
            for token, word in enumerate(word_ids):
                if word is not None and word not in seen and word < len(words):
                    seen.add(word)
                    scores[word] = float(probs[row, token].max())
            spans = word_spans(texts[row], words) if texts is not None else None
            described = []
            for k, (word, tag, score) in enumerate(zip(words, row_tags, scores)):
                described.append({"word": word, "entity": tag, "score": score, **(spans[k] if spans else {})})
            entities = []
            for kind, first, last in get_entities(row_tags):
                entity = {"entity_group": kind, "word": " ".join(words[first:last + 1]), "start_word": first,
                          "end_word": last + 1, "score": sum(scores[first:last + 1]) / (last + 1 - first)}
                if spans:
                    entity.update(start=spans[first]["start"], end=spans[last]["end"])
                    entity["word"] = texts[row][entity["start"]:entity["end"]]
                entities.append(entity)
            out.append({"words": described, "entities": entities})
        return out

    def references(self, batch: dict[str, Any]) -> list[Any]:
        """Per example, the gold tag per word (``word_labels``, else from ``labels`` on first sub-tokens)."""
        word_labels = batch.get("word_labels")
        if word_labels is not None and all(len(w) for w in word_labels):
            return [list(w) for w in word_labels]
        labels = batch.get("labels")
        if labels is None:
            return super().references(batch)
        out = []
        for row, (ids, word_ids) in enumerate(zip(torch.as_tensor(labels).tolist(), self._word_ids(batch))):
            tags = word_predictions(ids, word_ids, self._num_words(batch, row, word_ids), IGNORE_INDEX)
            out.append([self.names[i] if i != IGNORE_INDEX else self.outside_label for i in tags])
        return out

    # ------------------------------------------------------------------ metrics
    def eval_counts(self, output: HeadOutput, batch: dict[str, Any]) -> dict[str, float]:
        counts: dict[str, float] = {}
        labels = batch.get("labels")
        if labels is not None:
            labels = torch.as_tensor(labels).to(output.logits.device)
            keep = labels != IGNORE_INDEX
            counts["token_correct"] = float(((output.logits.argmax(-1) == labels) & keep).sum())
            counts["token_total"] = float(keep.sum())
        references = self.references(batch)
        if references and references[0] is not None:
            for gold, pred in zip(references, self.predict(output, batch)):
                for key, value in entity_counts(gold, pred).items():
                    counts[key] = counts.get(key, 0.0) + value
        return counts

    def summarize(self, counts: dict[str, float]) -> dict[str, float]:
        out = entity_scores(counts) if "ent_gold" in counts else {}
        if counts.get("token_total"):
            out["token_accuracy"] = 100.0 * counts["token_correct"] / counts["token_total"]
        return out


def word_spans(text: str, words: Sequence[str]) -> list[dict[str, int]]:
    """Character ``start``/``end`` of each word of ``text`` (words found left to right)."""
    spans, cursor = [], 0
    for word in words:
        start = text.find(word, cursor)
        start = cursor if start < 0 else start
        spans.append({"start": start, "end": start + len(word)})
        cursor = start + len(word)
    return spans


__all__ = ["TokenClassificationHead", "word_predictions", "word_spans"]
