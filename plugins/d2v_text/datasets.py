"""Text datasets in their standard on-disk layouts: raw text lines, GLUE, SQuAD, CoNLL-2003, SWAG.

Every dataset returns *light* examples (dicts of strings and label ids, nothing tokenized)
with a ``task`` field telling the ``text`` processor what to build (see
:mod:`d2v_text.processor`), an ``id`` and a ``dataset`` description for error messages.
``lengths`` estimates each example's size in tokens for length bucketing
(``data.loader.max_batch_length``): :func:`approx_tokens`, one token per 4 UTF-8 bytes (what
byte-level BPE averages on English) plus the special tokens; the processor clips it to its
``max_length``. Label names, where a dataset has them, are in ``labels`` (give the same list
to the head's ``labels`` parameter).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from d2v.api.errors import SpecError

GLUE_HINT = ("GLUE is available from https://gluebenchmark.com/tasks (e.g. with the download_glue_data.py "
             "script, which writes <root>/<TASK>/{train,dev,test}.tsv)")
SQUAD_HINT = "SQuAD is available from https://rajpurkar.github.io/SQuAD-explorer/ (train-v1.1.json, dev-v1.1.json, ...)"
CONLL_HINT = ("CoNLL-2003 is distributed by https://www.clips.uantwerpen.be/conll2003/ner/ (Reuters text needs a "
              "licence); files eng.train/eng.testa/eng.testb or train.txt/valid.txt/test.txt")
SWAG_HINT = "SWAG is available from https://github.com/rowanz/swagaf (data/train.csv, data/val.csv, data/test.csv)"

# Hugging Face's conll2003 "ner_tags" order
CONLL2003_NER = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]


def approx_tokens(*texts: str | None) -> int:
    """Estimated tokens of ``texts`` encoded together: UTF-8 bytes / 4, plus 4 specials."""
    return sum(math.ceil(len(t.encode("utf-8")) / 4) for t in texts if t) + 4


def _check_max_examples(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(f"{where}: max_examples must be a positive integer or null, got {value!r}.")
    return value


def _existing_file(path: str | Path, where: str, hint: str) -> Path:
    p = Path(path).expanduser()
    p = p.resolve() if p.exists() else p.absolute()
    if not p.is_file():
        parent = p.parent
        listing = ", ".join(sorted(c.name for c in parent.iterdir())[:12]) if parent.is_dir() else "the directory does not exist"
        raise SpecError(f"{where}: file '{p}' not found (in '{parent}': {listing or 'nothing'}). {hint}.")
    return p


class _Examples(Dataset):
    """Shared storage: a list of example dicts and their length estimates."""

    examples: list[dict[str, Any]]
    lengths: list[int]

    def _keep(self, examples: list[dict[str, Any]], max_examples: int | None) -> None:
        self.examples = examples[:max_examples] if max_examples is not None else examples
        self.lengths = [self._estimate(ex) for ex in self.examples]

    @staticmethod
    def _estimate(ex: dict[str, Any]) -> int:
        return approx_tokens(ex.get("text"), ex.get("text_pair"), ex.get("question"), ex.get("context"),
                             " ".join(ex.get("words") or []), max(ex.get("choices") or [""], key=len))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.examples[i]


# ---------------------------------------------------------------------------------------- raw text
class TextLines(_Examples):
    """Raw text for language modelling and pretraining: one document per line, or (with
    ``paragraphs: true``) documents separated by blank lines, their lines joined with spaces.

    ``path``: a file, a directory (every ``*.txt`` in it, sorted) or a list of those. Empty
    documents are skipped. Documents longer than the processor's ``max_length`` are split into
    consecutive ``max_length`` blocks by the processor (``long_text: split``), not here.
    """

    def __init__(self, path: str | list, *, paragraphs: bool = False, max_examples: int | None = None,
                 on_bad_example: str = "error"):
        where = "text_lines"
        #: ``(id, reason)`` of lines that are not valid UTF-8 (``on_bad_example: skip``)
        self.skipped: list[tuple[str, str]] = []
        max_examples = _check_max_examples(max_examples, where)
        files: list[Path] = []
        for item in [path] if isinstance(path, str) else list(path):
            p = Path(item).expanduser()
            if p.is_dir():
                found = sorted(p.glob("*.txt"))
                if not found:
                    raise SpecError(f"{where}: directory '{p.resolve()}' holds no *.txt files.")
                files += found
            else:
                files.append(_existing_file(p, where, "Point path at a UTF-8 text file (one document per line)"))
        examples = []
        for f in files:
            lines = self._decoded_lines(f, where, on_bad_example)
            for n, doc in self._documents(lines, paragraphs):
                examples.append({"id": f"{f.stem}:{n}", "task": "text", "text": doc, "dataset": f"{where} '{f}'"})
                if max_examples is not None and len(examples) >= max_examples:
                    break
        if not examples:
            raise SpecError(f"{where}: no text found in {', '.join(map(str, files))}.")
        self._keep(examples, max_examples)

    def _decoded_lines(self, file: Path, where: str, on_bad_example: str) -> list[str]:
        """The file's lines; a line that is not UTF-8 stops the build naming it, or (skip) is
        left out as an empty line (line numbers, hence ids, stay those of the file)."""
        lines = []
        for n, raw in enumerate(file.read_bytes().splitlines(), start=1):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                reason = f"line {n} is not valid UTF-8 (byte {err.start}: {raw[err.start:err.start + 4]!r})"
                if on_bad_example != "skip":
                    raise SpecError(f"{where}: '{file}' {reason}; fix the encoding or set data.on_bad_example: skip.") from None
                self.skipped.append((f"{file.stem}:{n}", reason))
                lines.append("")
        return lines

    @staticmethod
    def _documents(lines: list[str], paragraphs: bool):
        if not paragraphs:
            for n, line in enumerate(lines, start=1):
                if line.strip():
                    yield n, line.strip()
            return
        start, current = 0, []
        for n, line in enumerate(lines + [""], start=1):
            if line.strip():
                if not current:
                    start = n
                current.append(line.strip())
            elif current:
                yield start, " ".join(current)
                current = []


# ---------------------------------------------------------------------------------------- GLUE
# task -> (directory, text column, pair column or None, label column, label values in the file
# (id order; None = regression), label names (Hugging Face's glue names))
GLUE_TASKS: dict[str, tuple[str, str | int, str | int | None, str | int, list[str] | None, list[str]]] = {
    "cola": ("CoLA", 3, None, 1, ["0", "1"], ["unacceptable", "acceptable"]),
    "sst2": ("SST-2", "sentence", None, "label", ["0", "1"], ["negative", "positive"]),
    "mrpc": ("MRPC", "#1 String", "#2 String", "Quality", ["0", "1"], ["not_equivalent", "equivalent"]),
    "stsb": ("STS-B", "sentence1", "sentence2", "score", None, ["score"]),
    "qqp": ("QQP", "question1", "question2", "is_duplicate", ["0", "1"], ["not_duplicate", "duplicate"]),
    "mnli": ("MNLI", "sentence1", "sentence2", "gold_label", ["entailment", "neutral", "contradiction"],
             ["entailment", "neutral", "contradiction"]),
    "qnli": ("QNLI", "question", "sentence", "label", ["entailment", "not_entailment"], ["entailment", "not_entailment"]),
    "rte": ("RTE", "sentence1", "sentence2", "label", ["entailment", "not_entailment"], ["entailment", "not_entailment"]),
    "wnli": ("WNLI", "sentence1", "sentence2", "label", ["0", "1"], ["not_entailment", "entailment"]),
}
_GLUE_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-mm": "mnli"}


class GlueTSV(_Examples):
    """A GLUE task in the layout GLUE's download script writes: ``<root>/<TASK>/<split>.tsv``.

    ``task``: ``cola``, ``sst2``, ``mrpc``, ``stsb`` (regression: float labels), ``qqp``,
    ``mnli``, ``qnli``, ``rte``, ``wnli`` (case-insensitive; ``SST-2``/``STS-B`` work too).
    ``split``: the file name without ``.tsv``: ``train``, ``dev``, ``test``; MNLI has
    ``dev_matched``, ``dev_mismatched``, ``test_matched``, ``test_mismatched``. Test files
    have no labels (examples get ``label: None``). CoLA's train/dev files have no header
    (columns: source, label, original label, sentence); every other file is read by its
    header's column names. Fields are TAB-separated with no quoting (GLUE's sentences contain
    quotes). ``label_names`` lists the label names in id order (HF ``glue`` names).
    """

    def __init__(self, root: str, task: str, split: str, *, max_examples: int | None = None):
        key = _GLUE_ALIASES.get(task.lower(), task.lower().replace("-", ""))
        if key not in GLUE_TASKS:
            raise SpecError(f"glue_tsv: unknown task '{task}'; GLUE tasks: {', '.join(GLUE_TASKS)}.")
        directory, text_col, pair_col, label_col, values, names = GLUE_TASKS[key]
        self.task, self.split = key, split
        self.label_names = names
        self.is_regression = values is None
        where = f"glue_tsv {directory}/{split}"
        path = Path(root).expanduser() / directory / f"{split}.tsv"
        if not path.is_file():
            task_dir = path.parent
            present = sorted(p.stem for p in task_dir.glob("*.tsv")) if task_dir.is_dir() else []
            found = f"splits present: {', '.join(present)}" if present else f"'{task_dir.resolve()}' does not exist"
            raise SpecError(f"{where}: '{path.resolve()}' not found ({found}). {GLUE_HINT}.")
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # MRPC's files start with a BOM
        if not lines:
            raise SpecError(f"{where}: '{path.resolve()}' is empty. {GLUE_HINT}.")
        headerless = key == "cola" and not lines[0].startswith("index\t")
        if headerless:
            header, body, first = None, lines, 1
        else:
            header, body, first = lines[0].split("\t"), lines[1:], 2
            text_col, pair_col = self._column(header, "sentence" if key == "cola" else text_col, path), \
                (None if pair_col is None else self._column(header, pair_col, path))
            label_col = label_col if label_col in header else None
            label_col = None if label_col is None else header.index(label_col)
        examples = []
        for n, line in enumerate(body, start=first):
            if not line.strip():
                continue
            fields = line.split("\t")
            needed = max(c for c in (text_col, pair_col, label_col) if c is not None)
            if len(fields) <= needed:
                raise SpecError(f"{where}: line {n} of '{path}' has {len(fields)} fields, expected at least {needed + 1}.")
            label = None
            if label_col is not None:
                raw = fields[label_col].strip()
                if values is None:
                    label = float(raw)
                elif raw in values:
                    label = values.index(raw)
                else:
                    raise SpecError(f"{where}: line {n} of '{path}' has label {raw!r}; {directory} labels are {values}.")
            ex_id = fields[0] if header is not None and header[0] in ("index", "id", "pairID") else str(n)
            ex = {"id": f"{key}-{split}-{ex_id}", "task": "classification", "text": fields[text_col],
                  "label": label, "dataset": where}
            if pair_col is not None:
                ex["text_pair"] = fields[pair_col]
            examples.append(ex)
        self._keep(examples, _check_max_examples(max_examples, "glue_tsv"))

    @staticmethod
    def _column(header: list[str], name: str | int, path: Path) -> int:
        if isinstance(name, int):
            return name
        if name not in header:
            raise SpecError(f"glue_tsv: '{path}' has no column '{name}' (header: {', '.join(header)}).")
        return header.index(name)


# ---------------------------------------------------------------------------------------- SQuAD
class SquadJSON(_Examples):
    """SQuAD v1.1 / v2.0 json (``{"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}``).

    One example per question: ``question``, ``context``, ``answers`` (list of ``{text,
    answer_start}``; dev files list several) and ``is_impossible`` (v2.0; v1.1 questions are
    always answerable). With ``version_2_with_negative`` unset it is read from the file's
    ``version`` (``v2.0``) or from the presence of ``is_impossible``.
    """

    def __init__(self, path: str, *, max_examples: int | None = None):
        where = "squad_json"
        p = _existing_file(path, where, SQUAD_HINT)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SpecError(f"{where}: '{p}' is not valid JSON: {err}.") from None
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise SpecError(f"{where}: '{p}' has no top-level 'data' list; is it a SQuAD file? {SQUAD_HINT}.")
        self.version = str(data.get("version", ""))
        examples = []
        for article in data["data"]:
            for paragraph in article.get("paragraphs", []):
                context = paragraph["context"]
                for qa in paragraph.get("qas", []):
                    impossible = bool(qa.get("is_impossible", False))
                    answers = [] if impossible else [{"text": a["text"], "answer_start": int(a["answer_start"])}
                                                     for a in qa.get("answers", [])]
                    for a in answers:
                        if context[a["answer_start"]: a["answer_start"] + len(a["text"])] != a["text"]:
                            raise SpecError(f"{where}: question '{qa['id']}' in '{p}': answer {a['text']!r} is not at "
                                            f"character {a['answer_start']} of its context.")
                    examples.append({"id": str(qa["id"]), "task": "question_answering", "question": qa["question"],
                                     "context": context, "answers": answers, "is_impossible": impossible,
                                     "title": article.get("title", ""), "dataset": f"{where} '{p}'"})
        if not examples:
            raise SpecError(f"{where}: '{p}' holds no questions.")
        self._keep(examples, _check_max_examples(max_examples, where))


# ---------------------------------------------------------------------------------------- CoNLL
class CoNLL(_Examples):
    """CoNLL-2003 column files: one ``word POS chunk NER`` line per token, blank lines between
    sentences, ``-DOCSTART-`` lines between documents (skipped).

    ``tag_column``: which column holds the tags (``-1``, the last = NER; 1 = POS, 2 = chunk).
    ``labels``: the tag set in id order (default CoNLL-2003 NER in Hugging Face's order, BIO);
    a tag outside it is an error naming the line. Examples: ``words``, ``word_labels`` (names)
    and ``word_label_ids``.
    """

    def __init__(self, path: str, *, tag_column: int = -1, labels: list[str] | None = None,
                 max_examples: int | None = None):
        where = "conll"
        p = _existing_file(path, where, CONLL_HINT)
        self.label_names = list(labels) if labels is not None else list(CONLL2003_NER)
        index = {name: i for i, name in enumerate(self.label_names)}
        examples: list[dict[str, Any]] = []
        words: list[str] = []
        tags: list[str] = []
        start = 0

        def flush() -> None:
            if words:
                examples.append({"id": f"{p.stem}-{len(examples)}", "task": "token_classification",
                                 "words": list(words), "word_labels": list(tags),
                                 "word_label_ids": [index[t] for t in tags], "line": start,
                                 "dataset": f"{where} '{p}'"})
                words.clear()
                tags.clear()

        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
            fields = line.split()
            if not fields:
                flush()
                continue
            if fields[0] == "-DOCSTART-":
                flush()
                continue
            if len(fields) < 2:
                raise SpecError(f"{where}: line {n} of '{p}' has one column; expected 'word ... TAG' (CoNLL-2003 columns).")
            try:
                tag = fields[tag_column]
            except IndexError:
                raise SpecError(f"{where}: line {n} of '{p}' has no column {tag_column}.") from None
            if tag not in index:
                raise SpecError(f"{where}: line {n} of '{p}' has tag {tag!r}, not in labels {self.label_names}; "
                                f"pass labels: [...] with the full tag set.")
            if not words:
                start = n
            words.append(fields[0])
            tags.append(tag)
        flush()
        if not examples:
            raise SpecError(f"{where}: '{p}' holds no sentences.")
        self._keep(examples, _check_max_examples(max_examples, where))


# ---------------------------------------------------------------------------------------- SWAG
class SwagCSV(_Examples):
    """SWAG csv (``train.csv``/``val.csv``/``test.csv`` of rowanz/swagaf): columns ``sent1``,
    ``sent2``, ``ending0..3`` and ``label`` (absent in test). As Hugging Face's ``run_swag``,
    the first segment is ``sent1`` and choice ``k`` is ``sent2 + " " + ending<k>``."""

    def __init__(self, path: str, *, num_choices: int = 4, max_examples: int | None = None):
        where = "swag_csv"
        p = _existing_file(path, where, SWAG_HINT)
        with p.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            needed = ["sent1", "sent2", *[f"ending{k}" for k in range(num_choices)]]
            missing = [c for c in needed if c not in (reader.fieldnames or [])]
            if missing:
                raise SpecError(f"{where}: '{p}' lacks column(s) {', '.join(missing)} (header: {reader.fieldnames}).")
            examples = []
            for n, row in enumerate(reader, start=2):
                label = row.get("label")
                if label not in (None, ""):
                    label = int(label)
                    if not 0 <= label < num_choices:
                        raise SpecError(f"{where}: row {n} of '{p}' has label {label}, outside 0..{num_choices - 1}.")
                else:
                    label = None
                ex_id = row.get("") or row.get("fold-ind") or str(n)
                examples.append({"id": f"{p.stem}-{ex_id}", "task": "multiple_choice", "text": row["sent1"],
                                 "choices": [f"{row['sent2']} {row[f'ending{k}']}" for k in range(num_choices)],
                                 "label": label, "dataset": f"{where} '{p}'"})
        if not examples:
            raise SpecError(f"{where}: '{p}' holds no rows.")
        self._keep(examples, _check_max_examples(max_examples, where))


__all__ = ["TextLines", "GlueTSV", "SquadJSON", "CoNLL", "SwagCSV", "approx_tokens"]
