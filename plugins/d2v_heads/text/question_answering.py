"""Extractive question answering (SQuAD v1.1/v2.0): Hugging Face's ``Data2VecTextForQuestionAnswering``.

``qa_outputs`` (Linear ``D -> 2``) gives a start and an end logit per token. The loss is HF's:
positions clamped to ``[0, S]``, a position equal to ``S`` (outside the window) ignored, and the
mean of the start and end cross-entropies.

``predict`` is the standard n-best extraction over the stride-split windows of each question
(rows grouped by ``example_ids``): in every window the ``n_best_size`` best starts and ends are
paired; a pair is kept when both are context tokens (``offsets`` not ``None``), the end is not
before the start and the span is at most ``max_answer_length`` tokens; its score is the sum of
the two logits and its text the context characters between their offsets. The best span over all
windows is the answer. With ``version_2_with_negative`` the null score (start + end logit at the
``<s>`` position, the lowest over the windows) competes: the answer is ``""`` when
``null score - best span score > null_score_diff_threshold``.

Spec usage::

    head: {name: question_answering, version_2_with_negative: true}

Metrics: SQuAD ``exact`` and ``f1`` (percent, :mod:`d2v_heads.text.squad_metrics`), with the official
``HasAns_*``/``NoAns_*`` breakdown.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from d2v import hookimpl
from d2v.api.errors import SpecError
from d2v import EncoderOutput, Head, HeadOutput
from d2v_heads.text.squad_metrics import squad_counts, squad_summary


@hookimpl
def d2v_register(register):
    register("head", "question_answering", "d2v_heads.text.question_answering:QuestionAnsweringHead",
             summary="extractive QA (HF Data2VecTextForQuestionAnswering: qa_outputs start/end); n-best span "
                     "extraction over stride windows, SQuAD v1.1/v2.0 exact match and F1",
        modalities=("text",),
    )


def qa_loss(start_logits: Tensor, end_logits: Tensor, start_positions: Tensor, end_positions: Tensor) -> Tensor:
    """HF's loss: clamp the positions to ``[0, S]``, ignore ``S``, average start and end CE."""
    length = start_logits.shape[1]
    start = start_positions.to(start_logits.device).long().view(-1).clamp(0, length)
    end = end_positions.to(start_logits.device).long().view(-1).clamp(0, length)
    start_loss = nn.functional.cross_entropy(start_logits, start, ignore_index=length)
    end_loss = nn.functional.cross_entropy(end_logits, end, ignore_index=length)
    return (start_loss + end_loss) / 2


def best_answer(
    windows: Sequence[tuple[Sequence[float], Sequence[float], Sequence[Any]]],
    context: str,
    *,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    version_2_with_negative: bool = False,
    null_score_diff_threshold: float = 0.0,
) -> dict[str, Any]:
    """The answer to one question from its windows ``(start_logits, end_logits, offsets)``.

    ``offsets[i]`` is ``(char_start, char_end)`` for context tokens and ``None`` otherwise; logits
    past the end of ``offsets`` (padding) are dropped before the n best are chosen, so the answer
    does not depend on how much a batch was padded. Returns ``{"text", "score",
    "null_score", "span"}`` (``score`` ``None`` when no valid span exists; ``span``: the best span's
    ``(window, start token, end token, start char, end char)``).
    """
    best_text, best_score, best_span = "", None, None
    null_score = None
    for window, (start_logits, end_logits, offsets) in enumerate(windows):
        start_logits, end_logits = list(start_logits)[: len(offsets)], list(end_logits)[: len(offsets)]
        if start_logits:
            window_null = start_logits[0] + end_logits[0]
            null_score = window_null if null_score is None else min(null_score, window_null)
        starts = sorted(range(len(start_logits)), key=lambda i: -start_logits[i])[:n_best_size]
        ends = sorted(range(len(end_logits)), key=lambda i: -end_logits[i])[:n_best_size]
        for s in starts:
            if offsets[s] is None:
                continue
            for e in ends:
                if offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                    continue
                score = start_logits[s] + end_logits[e]
                if best_score is None or score > best_score:
                    best_score = score
                    best_text = context[offsets[s][0]: offsets[e][1]]
                    best_span = (window, s, e, offsets[s][0], offsets[e][1])
    text = best_text
    if version_2_with_negative and (
        best_score is None or (null_score is not None and null_score - best_score > null_score_diff_threshold)
    ):
        text = ""
    return {"text": text, "score": best_score, "null_score": null_score, "span": best_span}


class QuestionAnsweringHead(Head):
    """Parameters (keyword-only): ``input_dim`` (injected), ``n_best_size`` (20),
    ``max_answer_length`` (30 tokens), ``version_2_with_negative`` (SQuAD v2.0 no-answer),
    ``null_score_diff_threshold`` (0.0)."""

    tasks = ("question-answering",)

    def __init__(
        self,
        *,
        input_dim: int,
        n_best_size: int = 20,
        max_answer_length: int = 30,
        version_2_with_negative: bool = False,
        null_score_diff_threshold: float = 0.0,
        initializer_range: float = 0.02,
    ) -> None:
        super().__init__()
        if int(n_best_size) < 1 or int(max_answer_length) < 1:
            raise SpecError(f"question_answering: n_best_size and max_answer_length must be >= 1, got "
                            f"{n_best_size} and {max_answer_length}.")
        self.n_best_size = int(n_best_size)
        self.max_answer_length = int(max_answer_length)
        self.version_2_with_negative = bool(version_2_with_negative)
        self.null_score_diff_threshold = float(null_score_diff_threshold)
        self.qa_outputs = nn.Linear(int(input_dim), 2)
        nn.init.normal_(self.qa_outputs.weight, std=initializer_range)
        nn.init.zeros_(self.qa_outputs.bias)

    def hf_config(self) -> dict[str, Any]:
        return {"num_labels": 2}

    def forward(self, encoder_output: EncoderOutput, batch: dict[str, Any] | None = None) -> HeadOutput:
        logits = self.qa_outputs(encoder_output.last_hidden_state)
        start_logits, end_logits = logits[..., 0].contiguous(), logits[..., 1].contiguous()
        batch = batch or {}
        loss = None
        if batch.get("start_positions") is not None and batch.get("end_positions") is not None:
            loss = qa_loss(start_logits, end_logits, torch.as_tensor(batch["start_positions"]),
                           torch.as_tensor(batch["end_positions"]))
        return HeadOutput(logits=logits, loss=loss, extras={"start_logits": start_logits, "end_logits": end_logits})

    # ------------------------------------------------------------------ predictions
    @staticmethod
    def _groups(batch: dict[str, Any], rows: int) -> list[tuple[Any, list[int]]]:
        example_ids = batch.get("example_ids")
        if example_ids is None or batch.get("offsets") is None or batch.get("contexts") is None:
            raise SpecError("question_answering head: the batch needs example_ids, offsets and contexts (one per "
                            "window); use the text processor with a squad_json dataset.")
        if len(example_ids) != rows:
            raise SpecError(f"question_answering head: {len(example_ids)} example_ids for {rows} windows.")
        groups: dict[Any, list[int]] = {}
        for row, example in enumerate(example_ids):
            groups.setdefault(example, []).append(row)
        return list(groups.items())

    def _best_answers(self, logits: Tensor, batch: dict[str, Any]):
        """``(rows, best)`` per question: its windows' rows and :func:`best_answer` over them."""
        start, end = logits[..., 0].tolist(), logits[..., 1].tolist()
        for _, rows in self._groups(batch, logits.shape[0]):
            windows = [(start[r], end[r], batch["offsets"][r]) for r in rows]
            yield rows, best_answer(windows, batch["contexts"][rows[0]], n_best_size=self.n_best_size,
                                    max_answer_length=self.max_answer_length,
                                    version_2_with_negative=self.version_2_with_negative,
                                    null_score_diff_threshold=self.null_score_diff_threshold)

    def predict(self, output: HeadOutput, batch: dict[str, Any]) -> list[str]:
        """One answer text per question (``""`` = no answer, SQuAD v2.0), in order of first window."""
        return [best["text"] for _, best in self._best_answers(output.logits.detach().float(), batch)]

    def describe(self, output: HeadOutput, batch: dict[str, Any], *, top_k: int = 5, decode: Any = None) -> list[dict]:
        """Per question: the ``answer`` text, its character ``start``/``end`` in the context and
        its ``score``, ``p(start) * p(end)`` with softmaxes over the context tokens of its window
        (Hugging Face's QA pipeline score). A SQuAD v2.0 "no answer" is ``{"answer": ""}``."""
        logits = output.logits.detach().float().cpu()
        out = []
        for rows, best in self._best_answers(logits, batch):
            if best["span"] is None or (best["text"] == "" and self.version_2_with_negative):
                out.append({"answer": ""})
                continue
            window, first, last, start, end = best["span"]
            row, offsets = rows[window], batch["offsets"][rows[window]]
            context = torch.tensor([o is not None for o in offsets] + [False] * (logits.shape[1] - len(offsets)))
            p_start = logits[row, :, 0].masked_fill(~context, float("-inf")).softmax(-1)[first]
            p_end = logits[row, :, 1].masked_fill(~context, float("-inf")).softmax(-1)[last]
            out.append({"answer": best["text"], "start": start, "end": end, "score": float(p_start * p_end)})
        return out

    def references(self, batch: dict[str, Any]) -> list[Any]:
        """The gold answer texts per question (an empty list for an unanswerable one)."""
        answers = batch.get("answers")
        if answers is None:
            return super().references(batch)
        return [list(answers[rows[0]]) for _, rows in self._groups(batch, len(answers))]

    def eval_counts(self, output: HeadOutput, batch: dict[str, Any]) -> dict[str, float]:
        if batch.get("answers") is None:
            return {}
        return squad_counts(self.references(batch), self.predict(output, batch))

    def summarize(self, counts: dict[str, float]) -> dict[str, float]:
        return squad_summary(counts)


__all__ = ["QuestionAnsweringHead", "best_answer", "qa_loss"]
