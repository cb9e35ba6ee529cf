"""The text processor: tokenizes light dataset examples and pads them into the batches the text
model and heads read (the table "What a batch holds" in docs/text.md).

* :meth:`TextProcessor.load` runs in the data-loader workers, one example at a time: it
  tokenizes, truncates (or splits / strides), aligns labels and, with ``masking``, BERT-masks
  the tokens with the per-example generator the loader hands it.
* :meth:`TextProcessor.collate` pads the rows of a list of loaded examples with ``<pad>``.

What an example is comes from its ``task`` field (set by every d2v text dataset; custom
datasets may set it too): ``text`` (``text``: LM / pretraining), ``classification``
(``text``, optional ``text_pair``, ``label``), ``token_classification`` (``words``,
``word_labels``, ``word_label_ids``), ``question_answering`` (``question``, ``context``,
``answers``) or ``multiple_choice`` (``text``, ``choices``, ``label``).

Nothing is dropped: a plain text longer than ``max_length`` is split into consecutive blocks
(``long_text: split``, one row each) or truncated (``long_text: truncate``); QA contexts are
split into overlapping windows; everything else is truncated. Truncations are counted and
reported as warnings (``d2v_text`` logger) whose counts double each time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from d2v.api.errors import BadFile, SpecError, positive_int
from d2v.ssl.masking import BertMask
from d2v_text.tokenizer import Pieces, TextTokenizer, load_tokenizer, train_sentencepiece

logger = logging.getLogger("d2v_text")

TASKS = ("text", "classification", "token_classification", "question_answering", "multiple_choice")
#: what a user's text becomes for each pipeline task (``Head.tasks``); any other task reads plain text
PREDICT_TASKS = {"text-classification": "classification", "token-classification": "token_classification",
                 "question-answering": "question_answering", "multiple-choice": "multiple_choice"}
#: what each kind of example needs from the user
PREDICT_FIELDS = {"question_answering": ("question", "context"), "multiple_choice": ("text", "choices"),
                  "token_classification": ("words",)}
#: pipeline tasks whose texts are prompts to continue (no closing ``</s>``)
PROMPT_TASKS = ("text-generation", "next-token")
LONG_TEXT = ("split", "truncate")
IGNORE_INDEX = -100
TRAIN_TOKENIZER_KEYS = ("corpus", "vocab_size", "out", "model_type")


def _cache_dir() -> Path:
    if os.environ.get("D2V_CACHE_DIR"):
        return Path(os.environ["D2V_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "d2v"
    return Path.home() / ".cache" / "d2v"


def truncate_longest_first(n1: int, n2: int, budget: int) -> tuple[int, int]:
    """Lengths kept when a pair of ``n1`` + ``n2`` tokens must fit ``budget``: tokens are taken
    one at a time from the longer sequence (from the second on ties), as Hugging Face's
    ``truncation="longest_first"``."""
    if n1 + n2 <= budget:
        return n1, n2
    short = min(n1, n2)
    if short <= budget - short:
        return (n1, budget - n1) if n1 <= n2 else (budget - n2, n2)
    return (budget + 1) // 2, budget // 2


def window_starts(n: int, size: int, stride: int) -> list[int]:
    """Start offsets of the windows of ``size`` tokens over ``n`` context tokens, consecutive
    windows sharing ``stride`` tokens (Hugging Face ``return_overflowing_tokens`` with
    ``stride``); the last window ends at the context's end."""
    if n <= size:
        return [0]
    step = size - stride
    starts = list(range(0, n - size, step))
    starts.append(starts[-1] + step)
    return starts


def answer_token_span(offsets: list[tuple[int, int] | None], start_char: int, end_char: int) -> tuple[int, int] | None:
    """Token indices ``(start, end)`` (inclusive) of the answer ``[start_char, end_char)`` among
    the context tokens of one window (``offsets`` None elsewhere), or None when the window does
    not contain the whole answer (Hugging Face's ``run_qa`` rule)."""
    context = [i for i, o in enumerate(offsets) if o is not None]
    if not context:
        return None
    first, last = context[0], context[-1]
    if not (offsets[first][0] <= start_char and offsets[last][1] >= end_char):
        return None
    s = first
    while s <= last and offsets[s][0] <= start_char:
        s += 1
    e = last
    while e >= first and offsets[e][1] >= end_char:
        e -= 1
    return s - 1, e + 1


class TextProcessor:
    """Tokenization, truncation, label alignment, BERT masking and padding for text models.

    Args:
        tokenizer: a tokenizer path: a directory with ``vocab.json`` + ``merges.txt`` or a
            ``tokenizer.json`` (byte-level BPE as RoBERTa / data2vec-text), a sentencepiece
            ``.model`` file, or a Hugging Face checkpoint directory holding one of those.
        train_tokenizer: instead of ``tokenizer``, train a sentencepiece vocabulary once and
            reuse it: ``{corpus: file(s) or dir, vocab_size: N, out: DIR, model_type:
            unigram|bpe}``. Without ``out`` it is cached under ``$D2V_CACHE_DIR`` (default
            ``~/.cache/d2v/text-tokenizers/``), keyed by the corpus files (paths, sizes,
            modification times) and settings; name ``out: runs/<name>/tokenizer`` to keep it
            with the run. A changed corpus or setting trains again.
        max_length: most tokens per row, special tokens included (512 for RoBERTa models).
        stride: question answering: tokens shared by consecutive windows of a long context.
        max_query_length: question answering: longest question (tokens); longer ones are
            truncated (and counted).
        masking: ``{name: bert, ...}`` (the core ``bert`` masking component) to BERT-mask plain
            text for masked LM / data2vec 1.0: the batch then has ``inputs`` (corrupted),
            ``teacher_inputs``, ``corrupted_mask``, ``labels`` and ``mask_token_id``. Special
            tokens and padding are never selected.
        long_text: plain texts longer than ``max_length``: ``split`` into consecutive blocks
            (one row each, every block framed by ``<s> ... </s>``) or ``truncate``.
    """

    def __init__(
        self,
        *,
        tokenizer: str | None = None,
        train_tokenizer: dict | None = None,
        max_length: int = 512,
        stride: int = 128,
        max_query_length: int = 64,
        masking: Any = None,
        long_text: str = "split",
    ) -> None:
        self.max_length = positive_int(max_length, "max_length", "text processor")
        if self.max_length < 8:
            raise SpecError(f"text processor: max_length must be at least 8 tokens, got {max_length}.")
        self.stride = positive_int(stride, "stride", "text processor", allow_zero=True)
        self.max_query_length = positive_int(max_query_length, "max_query_length", "text processor")
        if long_text not in LONG_TEXT:
            raise SpecError(f"text processor: long_text must be one of {', '.join(LONG_TEXT)}, got {long_text!r}.")
        self.long_text = long_text
        if masking is not None and not isinstance(masking, BertMask):
            raise SpecError(
                f"text processor: masking must be the token-level masking component {{name: bert, ...}}, got "
                f"{masking!r}. (data2vec 2.0's random/block masks belong to the data2vec2 objective, not the processor.)"
            )
        self.masking = masking
        if (tokenizer is None) == (train_tokenizer is None):
            raise SpecError(
                "text processor: set exactly one of tokenizer (a path to vocab.json+merges.txt, tokenizer.json or a "
                "sentencepiece model) and train_tokenizer ({corpus: ..., vocab_size: N})."
            )
        self.tokenizer: TextTokenizer = (
            load_tokenizer(tokenizer) if tokenizer is not None else self._trained_tokenizer(train_tokenizer)
        )
        self.truncated_examples = 0
        self.truncated_tokens = 0
        self._next_report = 1

    def __repr__(self) -> str:
        return (f"TextProcessor({self.tokenizer!r}, max_length={self.max_length}, stride={self.stride}, "
                f"masking={self.masking!r}, long_text={self.long_text!r})")

    # ------------------------------------------------------------------ tokenizer
    @staticmethod
    def _trained_tokenizer(spec: Any) -> TextTokenizer:
        where = "text processor: train_tokenizer"
        if not isinstance(spec, dict):
            raise SpecError(f"{where} must be a mapping {{corpus: ..., vocab_size: N}}, got {spec!r}.")
        unknown = sorted(set(spec) - set(TRAIN_TOKENIZER_KEYS))
        if unknown or "corpus" not in spec or "vocab_size" not in spec:
            raise SpecError(f"{where}: needs corpus and vocab_size (optional: out, model_type); got keys {sorted(spec)}.")
        corpus = spec["corpus"]
        files = [corpus] if isinstance(corpus, str) else list(corpus)
        model_type = spec.get("model_type", "unigram")
        corpus_files = [str(Path(f).expanduser().resolve()) for f in files]
        # a corpus file that changed (size, modification time) means a new vocabulary
        stamps = [[os.path.getsize(f), os.path.getmtime(f)] if os.path.isfile(f) else None for f in corpus_files]
        settings = {"corpus": corpus_files, "stamps": stamps, "vocab_size": spec["vocab_size"], "model_type": model_type}
        out = spec.get("out")
        if out is None:
            digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
            out = _cache_dir() / "text-tokenizers" / digest
        out = Path(out).expanduser()
        record = out / "train_settings.json"
        if (out / "spm.model").is_file() and record.is_file() and json.loads(record.read_text()) == settings:
            return load_tokenizer(out / "spm.model")
        logger.warning("text processor: training a %s-token sentencepiece vocabulary on %s into %s",
                       settings["vocab_size"], ", ".join(map(str, files)), out)
        # replace a stale vocabulary; a fresh one is written once even when several processes race
        train_sentencepiece(files, vocab_size=spec["vocab_size"], out=out, model_type=model_type,
                            overwrite=(out / "spm.model").exists())
        record.write_text(json.dumps(settings, indent=2) + "\n")
        return load_tokenizer(out / "spm.model")

    @classmethod
    def from_pretrained(cls, directory: str | Path, **params: Any) -> "TextProcessor":
        """The processor of a saved checkpoint: the tokenizer :meth:`save_pretrained` wrote beside
        its weights replaces ``tokenizer`` / ``train_tokenizer`` (which may name files that are
        gone, or a corpus to train on again); without one, the settings as given."""
        try:
            load_tokenizer(directory)
        except SpecError:
            return cls(**params)
        params = {k: v for k, v in params.items() if k not in ("tokenizer", "train_tokenizer")}
        return cls(tokenizer=str(directory), **params)

    @property
    def vocab_size(self) -> int:
        """The tokenizer's size: the runner checks the model embeds at least this many ids."""
        return self.tokenizer.vocab_size

    def save_pretrained(self, directory: str | Path) -> None:
        """The tokenizer files beside a run's final weights, so the run is usable on its own
        (``d2v convert ... --to hf`` exports them with the model)."""
        self.tokenizer.save(directory)

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def mask_token_id(self) -> int:
        return self.tokenizer.mask_token_id

    def clip_length(self, n: int, *, train: bool) -> int:
        """Dataset lengths (estimated tokens) as batched: at most ``max_length`` per row."""
        return min(int(n), self.max_length)

    # ------------------------------------------------------------------ bookkeeping
    def _note_truncation(self, tokens: int, what: str) -> None:
        if tokens <= 0:
            return
        self.truncated_examples += 1
        self.truncated_tokens += tokens
        if self.truncated_examples >= self._next_report:
            logger.warning(
                "text processor: %d example(s) truncated so far (%d tokens cut; latest: %s). Raise max_length "
                "(now %d)%s to keep more.", self.truncated_examples, self.truncated_tokens, what, self.max_length,
                " or max_query_length" if "question" in what else "")
            self._next_report *= 2

    # ------------------------------------------------------------------ user inputs
    #: what ``d2v predict`` picks from a directory: one example per non-empty line
    file_suffixes = (".txt",)

    def examples_from(self, item: Any, *, task: str = "", fields: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Examples for ``d2v predict`` / :func:`d2v.pipeline`: a ``pathlib.Path`` is a text file
        read as one example per non-empty line; a string is one text; a dict is an example
        already (``{"question": ..., "context": ...}``, ``{"text": ..., "choices": [...]}``,
        ``{"text": ..., "text_pair": ...}``). ``fields`` are added to every example (a question
        asked of every text); ``task`` (the head's pipeline task) says what each text becomes
        (:data:`PREDICT_TASKS`)."""
        if isinstance(item, os.PathLike):
            try:
                lines = Path(item).read_bytes().decode("utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as err:
                raise BadFile(f"cannot read text file '{item}': {err}") from None
            return [dict(self._predict_example(line, task, fields), line=n)
                    for n, line in enumerate(lines, start=1) if line.strip()]
        return [self._predict_example(item, task, fields)]

    def _predict_example(self, item: str | dict[str, Any], task: str, fields: dict[str, Any] | None) -> dict[str, Any]:
        kind = PREDICT_TASKS.get(task, "text")
        example = {**(fields or {}), **(dict(item) if isinstance(item, dict) else {"text": str(item)})}
        if kind == "token_classification" and "words" not in example and isinstance(example.get("text"), str):
            example["words"] = example["text"].split()
        if kind == "question_answering" and "context" not in example:
            example["context"] = example.pop("text", None)
        needed = PREDICT_FIELDS.get(kind, ("text",))
        missing = [key for key in needed if not example.get(key)]
        if missing:
            raise SpecError(f"{task or 'this task'} needs {' and '.join(needed)} for each input, but "
                            f"{', '.join(missing)} is missing (d2v predict: --question, --choice; Python: a dict "
                            f"such as {{{', '.join(repr(k) + ': ...' for k in needed)}}}).")
        # estimated tokens (UTF-8 bytes / 4 + specials, as the datasets' lengths): batches of similar length
        size = sum(len(v.encode("utf-8")) for v in example.values() if isinstance(v, str))
        size += sum(len(str(c).encode("utf-8")) for c in example.get("choices") or [])
        example.update(task=kind, predict=True, prompt=task in PROMPT_TASKS, length=size // 4 + 4)
        return example

    def decode(self, ids: Any) -> str:
        """Token ids back to text (special tokens left out), for heads that predict tokens."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    # ------------------------------------------------------------------ loading
    def load(self, example: dict[str, Any], *, train: bool, rng: np.random.Generator | None = None) -> dict[str, Any]:
        """Tokenize one example into ``rows`` (one per model input row); see the module docstring."""
        task = example.get("task") or _infer_task(example)
        if task not in TASKS:
            raise SpecError(f"text processor: example '{example.get('id', '?')}' has task {task!r}; known: {', '.join(TASKS)}.")
        if self.masking is not None and task != "text" and not example.get("predict"):
            raise SpecError(
                f"text processor: masking applies to plain text (task 'text', e.g. the text_lines dataset), but "
                f"example '{example.get('id', '?')}' is {task!r}. Remove data.processor.masking for this task."
            )
        out = {"id": str(example.get("id", "")), "task": task, "predict": bool(example.get("predict"))}
        out.update(getattr(self, f"_load_{task}")(example, rng))
        if "text" in example and task == "token_classification":
            out["text"] = example["text"]
        return out

    def _load_text(self, example: dict[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
        pieces = self.tokenizer.pieces(example["text"])
        budget = self.max_length - 2
        if example.get("prompt"):  # a generation prompt: <s> and its last tokens, no closing </s>
            self._note_truncation(len(pieces.ids) - (budget + 1), f"prompt '{example.get('id', '?')}'")
            ids = [self.tokenizer.bos_token_id, *pieces.ids[-(budget + 1):]]
            return {"rows": [{"input_ids": np.asarray(ids, dtype=np.int64)}]}
        if example.get("predict") and len(pieces.ids) > budget:  # one result per user text: truncate
            self._note_truncation(len(pieces.ids) - budget, f"text '{example.get('id', '?')}'")
            pieces = pieces.head(budget)
        if len(pieces.ids) <= budget:
            blocks = [pieces]
        elif self.long_text == "split":
            blocks = [pieces.slice(s, s + budget) for s in range(0, len(pieces.ids), budget)]
        else:
            self._note_truncation(len(pieces.ids) - budget, f"text '{example.get('id', '?')}'")
            blocks = [pieces.head(budget)]
        rows = [{"input_ids": np.asarray(self.tokenizer.assemble(b).ids, dtype=np.int64)} for b in blocks]
        if self.masking is not None and not example.get("predict"):
            if rng is None:  # called outside the loader: a fixed generator per example
                rng = np.random.default_rng(zlib.crc32(str(example.get("id", "")).encode()))
            for row in rows:
                self._mask_row(row, rng)
        return {"rows": rows}

    def _mask_row(self, row: dict[str, Any], rng: np.random.Generator) -> None:
        ids = row["input_ids"]
        special = np.isin(ids, self.tokenizer.all_special_ids)
        corrupted, selected = self.masking(torch.from_numpy(ids), mask_token_id=self.mask_token_id,
                                           vocab_size=self.vocab_size, special_tokens_mask=special, rng=rng,
                                           special_ids=self.tokenizer.all_special_ids)
        row["teacher_ids"] = ids
        row["input_ids"] = corrupted.numpy()
        row["selected"] = selected.numpy()

    def _pair_pieces(self, first: Pieces, second: Pieces | None, what: str) -> tuple[Pieces, Pieces | None]:
        if second is None:
            budget = self.max_length - 2
            self._note_truncation(len(first.ids) - budget, what)
            return first.head(budget), None
        n1, n2 = truncate_longest_first(len(first.ids), len(second.ids), self.max_length - 4)
        self._note_truncation(len(first.ids) + len(second.ids) - n1 - n2, what)
        return first.head(n1), second.head(n2)

    def _load_classification(self, example: dict[str, Any], rng: Any) -> dict[str, Any]:
        pair = example.get("text_pair")
        first, second = self._pair_pieces(self.tokenizer.pieces(example["text"]),
                                          self.tokenizer.pieces(pair) if pair else None,
                                          f"example '{example.get('id', '?')}'")
        ids = self.tokenizer.assemble(first, second).ids
        return {"rows": [{"input_ids": np.asarray(ids, dtype=np.int64)}], "label": example.get("label")}

    def _load_token_classification(self, example: dict[str, Any], rng: Any) -> dict[str, Any]:
        words = list(example["words"])
        label_ids = example.get("word_label_ids")
        if label_ids is not None and len(label_ids) != len(words):
            raise SpecError(f"text processor: example '{example.get('id', '?')}' has {len(words)} words but "
                            f"{len(label_ids)} word labels.")
        pieces = self.tokenizer.word_pieces(words)
        budget = self.max_length - 2
        if len(pieces.ids) > budget:
            self._note_truncation(len(pieces.ids) - budget, f"sentence '{example.get('id', '?')}'")
            pieces = pieces.head(budget)
        enc = self.tokenizer.assemble(pieces)
        labels = np.full(len(enc.ids), IGNORE_INDEX, dtype=np.int64)
        previous = None
        for i, word in enumerate(enc.word_ids):
            if word is not None and word != previous and label_ids is not None:
                labels[i] = int(label_ids[word])
            previous = word
        row = {"input_ids": np.asarray(enc.ids, dtype=np.int64), "word_ids": enc.word_ids}
        if label_ids is not None:
            row["labels"] = labels
        return {"rows": [row], "words": words, "word_labels": list(example.get("word_labels") or [])}

    def _load_question_answering(self, example: dict[str, Any], rng: Any) -> dict[str, Any]:
        question = self.tokenizer.pieces(example["question"].lstrip())
        if len(question.ids) > self.max_query_length:
            self._note_truncation(len(question.ids) - self.max_query_length, f"question '{example.get('id', '?')}'")
            question = question.head(self.max_query_length)
        context_text = example["context"]
        context = self.tokenizer.pieces(context_text)
        size = self.max_length - len(question.ids) - 4
        if size <= self.stride:
            raise SpecError(
                f"text processor: max_length={self.max_length} leaves {size} context tokens per window after the "
                f"question ({len(question.ids)} tokens) and specials, not more than stride={self.stride}; raise "
                f"max_length or lower stride/max_query_length."
            )
        answers = list(example.get("answers") or [])
        gold = answers[0] if answers and not example.get("is_impossible") else None
        rows = []
        for start in window_starts(len(context.ids), size, self.stride):
            enc = self.tokenizer.assemble(question, context.slice(start, start + size))
            offsets = [o if s == 1 else None for o, s in zip(enc.offsets, enc.sequence_ids)]
            span = None
            if gold is not None:
                begin = int(gold["answer_start"])
                span = answer_token_span(offsets, begin, begin + len(gold["text"]))
            rows.append({"input_ids": np.asarray(enc.ids, dtype=np.int64), "offsets": offsets,
                         "start": 0 if span is None else span[0], "end": 0 if span is None else span[1]})
        return {"rows": rows, "context": context_text, "answers": [a["text"] for a in answers]}

    def _load_multiple_choice(self, example: dict[str, Any], rng: Any) -> dict[str, Any]:
        first = self.tokenizer.pieces(example["text"])
        choices = []
        for k, choice in enumerate(example["choices"]):
            a, b = self._pair_pieces(first, self.tokenizer.pieces(choice), f"choice {k} of '{example.get('id', '?')}'")
            choices.append(np.asarray(self.tokenizer.assemble(a, b).ids, dtype=np.int64))
        return {"rows": [{"choices": choices}], "label": example.get("label")}

    # ------------------------------------------------------------------ batching
    def _pad(self, seqs: list[np.ndarray], value: int, length: int | None = None) -> torch.Tensor:
        length = length or max(len(s) for s in seqs)
        out = torch.full((len(seqs), length), value, dtype=torch.long)
        for row, seq in zip(out, seqs):
            row[: len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        return out

    #: fixed-shape inference pads batches to a multiple of this many tokens (``d2v predict --compile``)
    length_bucket = 32

    def pad_batch(self, batch: dict[str, Any], length: int) -> dict[str, Any]:
        """A collated batch padded further to ``length`` tokens (never beyond ``max_length``):
        the per-token tensors :meth:`collate` makes, each with its padding value. Named, not
        guessed from shapes: a ``(B, L)`` multi-label target whose ``L`` happens to equal the
        batch's length is not a per-token tensor."""
        current = batch["inputs"].shape[-1]
        extra = min(length, max(self.max_length, current)) - current
        if extra <= 0:
            return batch
        fills = {"inputs": self.pad_token_id, "padding_mask": True, "teacher_inputs": self.pad_token_id,
                 "corrupted_mask": False}
        labels = batch.get("labels")
        if isinstance(labels, torch.Tensor) and labels.shape == batch["inputs"].shape and not labels.is_floating_point():
            fills["labels"] = IGNORE_INDEX  # token ids or tags per token (masked/causal LM, token classification)
        padded = dict(batch)
        for key, fill in fills.items():
            if isinstance(batch.get(key), torch.Tensor):
                padded[key] = torch.nn.functional.pad(batch[key], (0, extra), value=fill)
        return padded

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Pad loaded examples into one batch (see "What a batch holds" in docs/text.md)."""
        if not examples:
            raise ValueError("TextProcessor.collate needs at least one example")
        tasks = {ex["task"] for ex in examples}
        if len(tasks) != 1:
            raise SpecError(f"text processor: one batch mixes example kinds {sorted(tasks)}; use one task per dataset.")
        task = tasks.pop()
        rows = [row for ex in examples for row in ex["rows"]]
        if task == "multiple_choice":
            return self._collate_choices(examples)
        inputs = self._pad([r["input_ids"] for r in rows], self.pad_token_id)
        padding_mask = torch.zeros_like(inputs, dtype=torch.bool)
        for i, row in enumerate(rows):
            padding_mask[i, len(row["input_ids"]):] = True
        batch: dict[str, Any] = {"inputs": inputs, "padding_mask": padding_mask}
        if all(ex.get("predict") for ex in examples):  # what fill-mask and generation look for
            batch.update(mask_token_id=self.mask_token_id, eos_token_id=self.tokenizer.eos_token_id)
        if task == "token_classification" and all("text" in ex for ex in examples):
            batch["texts"] = [ex["text"] for ex in examples]
        if task == "text":
            batch["ids"] = [ex["id"] if k == 0 else f"{ex['id']}#{k}" for ex in examples for k in range(len(ex["rows"]))]
            if "teacher_ids" in rows[0]:
                teacher = self._pad([r["teacher_ids"] for r in rows], self.pad_token_id)
                selected = torch.zeros_like(padding_mask)
                for i, row in enumerate(rows):
                    selected[i, : len(row["selected"])] = torch.from_numpy(row["selected"])
                batch.update(teacher_inputs=teacher, corrupted_mask=selected,
                             labels=torch.where(selected, teacher, torch.full_like(teacher, IGNORE_INDEX)),
                             mask_token_id=self.mask_token_id)
            else:
                batch["labels"] = inputs.masked_fill(padding_mask, IGNORE_INDEX)
        elif task == "classification":
            batch["ids"] = [ex["id"] for ex in examples]
            labels = _stack_labels([ex["label"] for ex in examples])
            if labels is not None:
                batch["labels"] = labels
        elif task == "token_classification":
            batch["ids"] = [ex["id"] for ex in examples]
            if all("labels" in r for r in rows):
                batch["labels"] = self._pad([r["labels"] for r in rows], IGNORE_INDEX, inputs.shape[1])
            batch["word_ids"] = [r["word_ids"] for r in rows]
            batch["words"] = [ex["words"] for ex in examples]
            batch["word_labels"] = [ex["word_labels"] for ex in examples]
        else:  # question_answering: one row per window, all windows of an example together
            batch["ids"] = [ex["id"] for ex in examples]
            batch["example_ids"] = [ex["id"] for ex in examples for _ in ex["rows"]]
            batch["start_positions"] = torch.tensor([r["start"] for r in rows], dtype=torch.long)
            batch["end_positions"] = torch.tensor([r["end"] for r in rows], dtype=torch.long)
            batch["offsets"] = [r["offsets"] for r in rows]
            batch["contexts"] = [ex["context"] for ex in examples for _ in ex["rows"]]
            batch["answers"] = [list(ex["answers"]) for ex in examples for _ in ex["rows"]]
        return batch

    def _collate_choices(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        choices = [ex["rows"][0]["choices"] for ex in examples]
        counts = {len(c) for c in choices}
        if len(counts) != 1:
            raise SpecError(f"text processor: multiple-choice examples of one batch have {sorted(counts)} choices; "
                            f"every example needs the same number.")
        (C,) = counts
        flat = [c for cs in choices for c in cs]
        inputs = self._pad(flat, self.pad_token_id)
        lengths = torch.tensor([len(c) for c in flat])
        padding_mask = torch.arange(inputs.shape[1])[None, :] >= lengths[:, None]
        B = len(examples)
        batch = {"inputs": inputs.view(B, C, -1), "padding_mask": padding_mask.view(B, C, -1),
                 "ids": [ex["id"] for ex in examples]}
        labels = _stack_labels([ex["label"] for ex in examples])
        if labels is not None:
            batch["labels"] = labels
        return batch


def _stack_labels(labels: list[Any]) -> torch.Tensor | None:
    """Class ids -> (B,) long; floats -> (B,) float (regression); lists -> (B, L) float."""
    if all(label is None for label in labels):
        return None
    if any(label is None for label in labels):
        raise SpecError("text processor: some examples of a batch have labels and some do not.")
    if isinstance(labels[0], (list, tuple, np.ndarray)):
        return torch.tensor(np.asarray(labels, dtype=np.float32))
    if any(isinstance(label, float) for label in labels):
        return torch.tensor(labels, dtype=torch.float32)
    return torch.tensor([int(label) for label in labels], dtype=torch.long)


def _infer_task(example: dict[str, Any]) -> str:
    if "question" in example and "context" in example:
        return "question_answering"
    if "choices" in example:
        return "multiple_choice"
    if "words" in example:
        return "token_classification"
    if "label" in example or "text_pair" in example:
        return "classification"
    if "text" in example:
        return "text"
    raise SpecError(f"text processor: cannot tell what example '{example.get('id', '?')}' is (keys {sorted(example)}); "
                    f"set its 'task' to one of {', '.join(TASKS)}.")
