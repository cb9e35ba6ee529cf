"""CTC head: character logits per frame, the CTC loss, greedy / prefix-beam decoding, WER/CER.

This is Hugging Face's ``Data2VecAudioForCTC`` head (``dropout -> lm_head``; our linear is
called ``proj``) with the same loss: log-softmax in float32, ``(T, B, V)`` layout, blank =
``<pad>`` (id 0), labels ``-100`` (and blank) ignored, ``torch.nn.functional.ctc_loss`` with
``ctc_loss_reduction`` (``"sum"``: summed over utterances; ``"mean"``: each utterance's loss
divided by its target length, then averaged) and ``ctc_zero_infinity``.

Spec usage::

    head: {name: ctc, vocab: librispeech, final_dropout: 0.1, decoder: greedy}
    head: {name: ctc, decoder: {name: lm_beam, lm: lm.arpa, alpha: 0.5, beta: 2.0, beam_size: 50}}

Decoders (``greedy``, ``beam``, the LM-fused ``lm_beam``) and their options are described in
:mod:`d2v_heads.speech.ctc_decoders`.

Metrics: ``summarize`` reports ``wer`` and ``cer`` in **percent** (100 * errors / reference
units), computed on whitespace-normalised, case-matched text (see :mod:`d2v_heads.speech.error_rates`).
"""

from __future__ import annotations

from collections import Counter

import heapq
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from d2v import hookimpl
from d2v import EncoderOutput, Head, HeadOutput
from d2v_heads.speech.error_rates import char_errors, error_rate, word_errors
from d2v_heads.speech.ctc_decoders import DecoderOptions, LexiconBeamDecoder, decoder_options
from d2v_heads.speech.ctc_vocab import BOS, EOS, CharVocab


@hookimpl
def d2v_register(register):
    register(
        "head",
        "ctc",
        "d2v_heads.speech.ctc:CTCHead",
        summary="character CTC head (dropout + linear), HF Data2VecAudioForCTC loss, greedy/beam decoding, WER/CER",
        modalities=("audio",),
    )



@hookimpl
def d2v_cli_commands(subparsers):
    """``d2v lm build``: the word n-gram models the CTC head's beam search decodes with."""
    from d2v_heads.speech.ngram_lm import add_parser

    add_parser(subparsers)

IGNORE_INDEX = -100
_NEG_INF = float("-inf")


# --------------------------------------------------------------------------- decoding
def collapse_ctc(path: Iterable[int], blank: int) -> list[int]:
    """A frame-level CTC path -> its labelling: merge repeats, then drop blanks."""
    out: list[int] = []
    previous = None
    for token in path:
        token = int(token)
        if token != previous and token != blank:
            out.append(token)
        previous = token
    return out


def ctc_greedy_ids(logits: Tensor, lengths: Tensor | Sequence[int] | None = None, *, blank: int = 0) -> list[list[int]]:
    """Best-path decoding of ``logits`` (or log-probs) ``(B, T, V)``: per utterance, the
    argmax of each of its first ``lengths[b]`` frames, collapsed (see :func:`collapse_ctc`)."""
    best = logits.argmax(dim=-1).cpu()
    batch, frames = best.shape
    lengths = _lengths_list(lengths, batch, frames)
    return [collapse_ctc(best[b, : lengths[b]].tolist(), blank) for b in range(batch)]


def _logaddexp(a: float, b: float) -> float:
    if a == _NEG_INF:
        return b
    if b == _NEG_INF:
        return a
    if a < b:
        a, b = b, a
    return a + math.log1p(math.exp(b - a))


def ctc_prefix_beam_search(log_probs: Tensor, *, beam_size: int = 8, blank: int = 0) -> tuple[list[int], float]:
    """CTC prefix beam search (no language model) over ``log_probs`` ``(T, V)``.

    Keeps the ``beam_size`` most probable *labellings* (prefixes), each with the log
    probability of all its alignments so far that end in a blank and that end in its last
    token. At every frame only the ``beam_size`` most probable non-blank tokens (and each
    prefix's own last token) are tried as extensions. Returns the best labelling and its log
    probability. With a beam at least as large as the number of labellings it is exact.
    Ties are broken by the order in which prefixes were first reached (deterministic).
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, not {beam_size}")
    table = log_probs.detach().to(device="cpu", dtype=torch.float64)
    frames, vocab_size = table.shape
    if frames == 0:
        return [], 0.0
    tops = table.topk(min(beam_size, vocab_size), dim=-1).indices.tolist()
    rows = table.tolist()

    # Prefixes live in a trie: node 0 is the empty prefix; node n is prefix(parent[n]) + token[n].
    parent = [-1]
    token_of = [-1]
    children: dict[tuple[int, int], int] = {}

    def child(node: int, token: int) -> int:
        key = (node, token)
        found = children.get(key)
        if found is None:
            found = children[key] = len(parent)
            parent.append(node)
            token_of.append(token)
        return found

    # node -> [log P(alignments ending in blank), log P(alignments ending in its last token)]
    beams: dict[int, list[float]] = {0: [0.0, _NEG_INF]}
    for t in range(frames):
        row = rows[t]
        candidates = [c for c in tops[t] if c != blank]
        p_blank = row[blank]
        extended: dict[int, list[float]] = {}
        for node, (lp_b, lp_nb) in beams.items():
            total = _logaddexp(lp_b, lp_nb)
            # a blank keeps the prefix, now ending in blank
            here = extended.get(node)
            if here is None:
                here = extended[node] = [_NEG_INF, _NEG_INF]
            here[0] = _logaddexp(here[0], total + p_blank)
            last = token_of[node] if node else None
            tokens = candidates if last is None or last in candidates else candidates + [last]
            for token in tokens:
                p = row[token]
                longer_node = child(node, token)
                longer = extended.get(longer_node)
                if longer is None:
                    longer = extended[longer_node] = [_NEG_INF, _NEG_INF]
                if token == last:
                    # a repeat without a blank in between merges into the same prefix;
                    # after a blank it is a new occurrence of the token
                    here[1] = _logaddexp(here[1], lp_nb + p)
                    longer[1] = _logaddexp(longer[1], lp_b + p)
                else:
                    longer[1] = _logaddexp(longer[1], total + p)
        best_nodes = heapq.nlargest(beam_size, extended.items(), key=lambda kv: _logaddexp(kv[1][0], kv[1][1]))
        beams = dict(best_nodes)
    node, (lp_b, lp_nb) = max(beams.items(), key=lambda kv: _logaddexp(kv[1][0], kv[1][1]))
    score = _logaddexp(lp_b, lp_nb)
    labelling = []
    while node:
        labelling.append(token_of[node])
        node = parent[node]
    return labelling[::-1], score


def ctc_beam_ids(
    log_probs: Tensor, lengths: Tensor | Sequence[int] | None = None, *, beam_size: int = 8, blank: int = 0
) -> list[list[int]]:
    """:func:`ctc_prefix_beam_search` on each utterance of ``log_probs`` ``(B, T, V)``,
    restricted to its first ``lengths[b]`` frames."""
    batch, frames = log_probs.shape[:2]
    lengths = _lengths_list(lengths, batch, frames)
    return [
        ctc_prefix_beam_search(log_probs[b, : lengths[b]], beam_size=beam_size, blank=blank)[0] for b in range(batch)
    ]


def _lengths_list(lengths: Tensor | Sequence[int] | None, batch: int, frames: int) -> list[int]:
    if lengths is None:
        return [frames] * batch
    if isinstance(lengths, Tensor):
        lengths = lengths.tolist()
    return [min(int(n), frames) for n in lengths]


# --------------------------------------------------------------------------- the head
class CTCHead(Head):
    """Dropout -> ``proj`` (Linear ``input_dim -> len(vocab)``), trained with CTC.

    Parameters (keyword-only):

    * ``input_dim``: encoder width (the runner fills it in).
    * ``vocab``: ``"librispeech"`` (the 32-token vocabulary of
      ``facebook/data2vec-audio-base-960h``), a list of tokens, a ``{token: id}`` dict, or a
      path to a ``vocab.json`` (or to a checkpoint directory holding one).
    * ``final_dropout``: dropout on the encoder output (HF ``config.final_dropout``).
    * ``ctc_loss_reduction``: ``"sum"`` or ``"mean"`` (HF semantics, see the module doc).
    * ``ctc_zero_infinity``: zero infinite losses (inputs too short for their targets).
    * ``decoder``: ``"greedy"`` (best path), ``"beam"`` (prefix beam search, no LM), or a
      mapping ``{name: greedy|beam|lm_beam, beam_size, lm, alpha, beta, lexicon, ...}``
      (:class:`~d2v_heads.speech.ctc_decoders.DecoderOptions`; ``lm_beam`` fuses a KenLM n-gram LM).
    * ``beam_size``: beam width when the decoder mapping does not give one.

    ``batch`` keys read: ``"labels"`` (``LongTensor (B, U)`` padded with -100) or ``"text"``
    (list of transcripts, encoded with the vocabulary); labels win when both are given.
    ``HeadOutput.extras``: ``output_lengths`` (valid frames per utterance), and with labels,
    ``labels`` (the padded label ids used) and ``utterance_loss`` (per-utterance CTC loss,
    detached, before reduction).
    """

    #: the ``d2v predict`` / ``d2v.pipeline`` task (Hugging Face's pipeline name)
    tasks = ("automatic-speech-recognition",)

    def __init__(
        self,
        *,
        input_dim: int,
        vocab: str | list[str] = "librispeech",
        final_dropout: float = 0.1,
        ctc_loss_reduction: str = "sum",
        ctc_zero_infinity: bool = False,
        decoder: str | dict = "greedy",
        beam_size: int = 8,
    ) -> None:
        super().__init__()
        if ctc_loss_reduction not in ("sum", "mean"):
            raise ValueError(f"ctc_loss_reduction must be 'sum' or 'mean', not {ctc_loss_reduction!r}")
        if int(beam_size) < 1:
            raise ValueError(f"beam_size must be >= 1, not {beam_size}")
        self.vocab = CharVocab.resolve(vocab)
        self.input_dim = int(input_dim)
        self.vocab_size = len(self.vocab)
        self.final_dropout = float(final_dropout)
        self.ctc_loss_reduction = ctc_loss_reduction
        self.ctc_zero_infinity = bool(ctc_zero_infinity)
        self.beam_size = int(beam_size)
        self.decoder = decoder

        self.dropout = nn.Dropout(self.final_dropout)
        self.proj = nn.Linear(self.input_dim, self.vocab_size)
        # Hugging Face's initialisation of lm_head (normal, std = initializer_range 0.02)
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    @classmethod
    def from_transcripts(cls, texts: Iterable[str], *, case: str | None = None, **kwargs: Any) -> CTCHead:
        """A head whose vocabulary is built from ``texts`` (see :meth:`CharVocab.build`)."""
        return cls(vocab=CharVocab.build(texts, case=case).tokens, **kwargs)

    @property
    def blank_id(self) -> int:
        return self.vocab.blank_id

    @property
    def decoder(self) -> str:
        """The decoder's name; assign a name or an options mapping to switch decoders."""
        return self.decoding.name

    @decoder.setter
    def decoder(self, value: str | dict[str, Any] | DecoderOptions) -> None:
        #: the checked decoder options (see :mod:`d2v_heads.speech.ctc_decoders`)
        self.decoding = decoder_options(value, beam_size=self.beam_size)
        self._lm_decoder = LexiconBeamDecoder(self.decoding, self.vocab) if self.decoding.name == "lm_beam" else None

    def hf_config(self) -> dict[str, Any]:
        """The ``Data2VecAudioConfig`` fields this head determines."""
        ids = self.vocab.token_to_id
        return {
            "vocab_size": self.vocab_size,
            "final_dropout": self.final_dropout,
            "ctc_loss_reduction": self.ctc_loss_reduction,
            "ctc_zero_infinity": self.ctc_zero_infinity,
            "pad_token_id": self.blank_id,
            "bos_token_id": ids.get(BOS, 1),
            "eos_token_id": ids.get(EOS, 2),
        }

    def extra_repr(self) -> str:
        return f"vocab={self.vocab_size} tokens, reduction={self.ctc_loss_reduction}, decoder={self.decoder}"

    # ----------------------------------------------------------------- forward / loss
    def forward(self, encoder_output: EncoderOutput, batch: dict[str, Any] | None = None) -> HeadOutput:
        hidden = encoder_output.last_hidden_state
        logits = self.proj(self.dropout(hidden))
        batch_size, frames = logits.shape[:2]
        padding_mask = encoder_output.padding_mask
        if padding_mask is None:
            lengths = torch.full((batch_size,), frames, dtype=torch.long, device=logits.device)
        else:
            lengths = (~padding_mask.bool()).sum(dim=-1).to(device=logits.device, dtype=torch.long)
        extras: dict[str, Tensor] = {"output_lengths": lengths}
        labels = self.labels_from_batch(batch or {}, device=logits.device)
        loss = None
        if labels is not None:
            loss, per_utterance = self.ctc_loss(logits, labels, lengths)
            extras["labels"] = labels
            extras["utterance_loss"] = per_utterance.detach()
        return HeadOutput(logits=logits, loss=loss, extras=extras)

    def inspect_examples(self, examples: Any) -> list[str]:
        """Transcript characters outside the vocabulary (they would silently become ``<unk>``),
        with counts and example ids."""
        missing: Counter[str] = Counter()
        where: dict[str, list[str]] = {}
        utterances = 0
        known = set(self.vocab.token_to_id) | {" "}
        for example in examples:
            text = example.get("text") if isinstance(example, dict) else None
            if not text:
                continue
            bad = [c for c in self.vocab.normalize(text) if c not in known]
            if bad:
                utterances += 1
                missing.update(bad)
                for char in set(bad):
                    where.setdefault(char, []).append(str(example.get("id", "?")))
        if not missing:
            return []
        shown = ", ".join(f"{c!r} x{n} (e.g. {where[c][0]})" for c, n in missing.most_common(12))
        target = self.vocab.unk_token if self.vocab.unk_id is not None else "an error"
        return [f"{sum(missing.values())} transcript characters in {utterances} utterances are not in the CTC "
                f"vocabulary and become {target}: {shown}. Normalise the transcripts or extend the vocabulary "
                f"(head.vocab)."]

    def labels_from_batch(self, batch: dict[str, Any], *, device: torch.device | str | None = None) -> Tensor | None:
        """``batch["labels"]`` as a LongTensor, else ``batch["text"]`` encoded and padded with
        -100, else ``None``."""
        labels = batch.get("labels")
        if labels is not None:
            if not isinstance(labels, Tensor):
                labels = self.pad_labels(labels)
            return labels.to(device=device, dtype=torch.long)
        texts = batch.get("text")
        if texts is None:
            return None
        if isinstance(texts, str):
            texts = [texts]
        return self.encode_texts(texts).to(device)

    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """Transcripts -> ``(B, U)`` label ids padded with -100."""
        return self.pad_labels([self.vocab.encode(t) for t in texts])

    @staticmethod
    def pad_labels(sequences: Sequence[Sequence[int]]) -> Tensor:
        width = max((len(s) for s in sequences), default=0)
        out = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
        for i, seq in enumerate(sequences):
            if len(seq):
                out[i, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        return out

    def ctc_loss(self, logits: Tensor, labels: Tensor, input_lengths: Tensor) -> tuple[Tensor, Tensor]:
        """The reduced CTC loss (as Hugging Face computes it) and the per-utterance losses.

        ``labels`` ``(B, U)``: positions equal to -100 or to the blank are ignored.
        """
        if labels.numel() and int(labels.max()) >= self.vocab_size:
            raise ValueError(f"label ids must be < vocab size {self.vocab_size}, got {int(labels.max())}")
        labels = labels.to(logits.device)
        keep = (labels != IGNORE_INDEX) & (labels != self.blank_id)
        target_lengths = keep.sum(dim=-1)
        targets = labels[keep]
        # float32 log-probs, (T, B, V) as ctc_loss wants
        log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)
        with torch.backends.cudnn.flags(enabled=False):
            per_utterance = nn.functional.ctc_loss(
                log_probs,
                targets,
                input_lengths.to(torch.long),
                target_lengths,
                blank=self.blank_id,
                reduction="none",
                zero_infinity=self.ctc_zero_infinity,
            )
        if self.ctc_loss_reduction == "sum":
            loss = per_utterance.sum()
        else:  # torch's "mean": divide by target length (at least 1), then average
            loss = (per_utterance / target_lengths.clamp(min=1).to(per_utterance.dtype)).mean()
        return loss, per_utterance

    # ----------------------------------------------------------------- decoding / eval
    def decode_ids(self, logits: Tensor, lengths: Tensor | Sequence[int] | None = None) -> list[list[int]]:
        """Label ids per utterance with the configured decoder."""
        if self.decoding.name == "greedy":
            return ctc_greedy_ids(logits.detach(), lengths, blank=self.blank_id)
        log_probs = torch.log_softmax(logits.detach(), dim=-1, dtype=torch.float32)
        if self._lm_decoder is not None:
            return self._lm_decoder.decode_ids(log_probs, _lengths_list(lengths, *log_probs.shape[:2]))
        return ctc_beam_ids(log_probs, lengths, beam_size=self.decoding.beam_size, blank=self.blank_id)

    def predict(self, output: HeadOutput, batch: dict[str, Any] | None = None) -> list[str]:
        """Decoded transcript per utterance (only its valid frames are decoded)."""
        lengths = (output.extras or {}).get("output_lengths")
        return [self.vocab.decode(ids) for ids in self.decode_ids(output.logits, lengths)]

    def describe(self, output: HeadOutput, batch: dict[str, Any], *, top_k: int = 5, decode: Any = None) -> list[dict]:
        """``d2v predict``: the transcript per utterance, decoded with the head's ``decoder``."""
        return [{"text": text} for text in self.predict(output, batch)]

    def references(self, batch: dict[str, Any]) -> list[str]:
        """``batch["text"]`` normalised as the vocabulary sees it (whitespace collapsed, case
        matched), or the decoded ``batch["labels"]``."""
        texts = batch.get("text")
        if texts is not None:
            return [self.vocab.normalize(t) for t in ([texts] if isinstance(texts, str) else texts)]
        labels = batch.get("labels")
        if labels is not None:
            rows = labels.tolist() if isinstance(labels, Tensor) else labels
            return [self.vocab.decode(i for i in row if i != IGNORE_INDEX) for row in rows]
        return super().references(batch)

    def eval_counts(self, output: HeadOutput, batch: dict[str, Any]) -> dict[str, float]:
        """Additive counts: ``word_errors``, ``words``, ``char_errors``, ``chars``,
        ``utterances``, and ``loss_sum`` (summed per-utterance CTC loss) when labels were given."""
        hypotheses = self.predict(output, batch)
        references = self.references(batch)
        counts = {"word_errors": 0.0, "words": 0.0, "char_errors": 0.0, "chars": 0.0,
                  "utterances": float(len(hypotheses))}
        for ref, hyp in zip(references, hypotheses):
            if ref is None:
                continue
            errors, n = word_errors(ref, hyp)
            counts["word_errors"] += errors
            counts["words"] += n
            errors, n = char_errors(ref, hyp)
            counts["char_errors"] += errors
            counts["chars"] += n
        per_utterance = (output.extras or {}).get("utterance_loss")
        if per_utterance is not None:
            counts["loss_sum"] = float(per_utterance.sum())
        return counts

    def summarize(self, counts: dict[str, float]) -> dict[str, float]:
        """``wer`` and ``cer`` in percent (errors / max(reference units, 1) * 100), plus
        ``ctc_loss`` (mean per-utterance loss) when ``loss_sum`` was counted."""
        metrics = {
            "wer": 100.0 * error_rate(counts.get("word_errors", 0.0), counts.get("words", 0.0)),
            "cer": 100.0 * error_rate(counts.get("char_errors", 0.0), counts.get("chars", 0.0)),
        }
        if "loss_sum" in counts:
            metrics["ctc_loss"] = counts["loss_sum"] / max(counts.get("utterances", 0.0), 1.0)
        return metrics


__all__ = [
    "CTCHead",
    "CharVocab",
    "collapse_ctc",
    "ctc_beam_ids",
    "ctc_greedy_ids",
    "ctc_prefix_beam_search",
]
