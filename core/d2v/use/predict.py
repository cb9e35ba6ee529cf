"""``d2v predict MODEL INPUT...``: a trained model on your own files, one JSON line per result.

MODEL is a run directory, a ``final/`` checkpoint or a Hugging Face checkpoint directory; INPUT
are files, directories (searched for the files the model's processor reads) or globs, and
``--text`` gives texts on the command line. The task follows from the model's head (``--task``
picks another it serves, or checks it). Results go to stdout or ``--out`` as JSON lines in input
order; a result that is a file (a segmentation mask) is written beside them and named in its
line. An input that cannot be read is reported on stderr and in its line (``"error"``), and the
others go on; the exit status is then 1 (:data:`FAILED_INPUTS_EXIT_CODE`), or 0 with
``--allow-failures`` as long as one input got a result.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from d2v.api.errors import SpecError

#: ``d2v predict``'s exit status when an input had no result (unreadable, missing, wrong kind)
FAILED_INPUTS_EXIT_CODE = 1
EXIT_STATUS = (f"exit status: 0 when every input got a result; {FAILED_INPUTS_EXIT_CODE} when any input failed "
               "(unreadable, missing, wrong kind: listed on stderr and as \"error\" in its line), or with "
               "--allow-failures only when none got a result; 2 for a bad request (model, options).")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``d2v predict`` subcommand."""
    p = subparsers.add_parser(
        "predict", help="run a trained model on your own files (JSON lines out)",
        description="Transcribe, classify, fill masks, generate text, segment images, embed or verify speakers "
                    "with a trained model: one JSON line per input.", epilog=EXIT_STATUS)
    p.add_argument("model", help="a run directory (runs/<name>), its final/ checkpoint or a Hugging Face "
                                 "checkpoint directory")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="files, directories or globs: audio, images, or .txt files (one text per line)")
    p.add_argument("--text", action="append", default=[], help="a text to predict on (repeatable)")
    p.add_argument("--task", default=None, help="the task, when the model's head serves several (e.g. next-token "
                                                "instead of text-generation); checked against the head")
    p.add_argument("--question", action="append", default=[],
                   help="question answering: asked of every context, or one per --text, in order")
    p.add_argument("--choice", action="append", default=[], help="multiple choice: a candidate (repeatable)")
    p.add_argument("--verify", nargs=2, action="append", default=[], metavar=("A", "B"),
                   help="speaker verification: score whether A and B are the same speaker (repeatable)")
    p.add_argument("--out", default=None, help="write the JSON lines to this file instead of stdout")
    p.add_argument("--files-dir", default=None,
                   help="where result files (segmentation masks) go; default: beside --out, else ./predictions")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: a GPU when there is one)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per batch (batched by length; default 8)")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the model for fixed shapes (CUDA graphs on a GPU); batches are padded to a "
                        "few bucket lengths so each compiles once (default backend: inductor)")
    p.add_argument("--pad-to-multiple-of", type=int, default=None, metavar="N",
                   help="bucket length for --compile (audio: samples, default half a second; text: tokens, default 32)")
    p.add_argument("--allow-failures", action="store_true",
                   help="exit 0 when some inputs failed (they stay listed), as long as one got a result")
    p.add_argument("--top-k", type=int, default=5, help="candidates listed per result (labels, tokens, next "
                                                        "tokens; default 5)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="text generation: most new tokens (default 20)")
    p.add_argument("--sample", action="store_true", help="text generation: sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None, help="text generation with --sample")
    p.add_argument("--sample-top-k", type=int, default=None,
                   help="text generation with --sample: draw from the K most probable tokens (default 50, as "
                        "Hugging Face's generate; 0: no limit)")
    p.add_argument("--top-p", type=float, default=None, help="text generation with --sample: nucleus mass")
    p.add_argument("--seed", type=int, default=None, help="text generation with --sample: random seed")
    p.add_argument("--decoder", default=None,
                   help="replace the head's decoder for this run (CTC: greedy, beam, or a YAML mapping such as "
                        "'{name: lm_beam, lm: lm.arpa, alpha: 0.5, beta: 2.0}')")
    p.set_defaults(fn=predict_command)
    return p


# --------------------------------------------------------------------------- inputs


def expand_inputs(patterns: list[str], suffixes: tuple[str, ...] | None) -> list[Path]:
    """Files named by ``patterns``: a file as given, a directory's files (recursively, those with
    one of ``suffixes``), a glob's matches; anything else is kept so that it is reported as
    unreadable by name."""
    wanted = tuple(s.lower() for s in suffixes or ())
    found: list[Path] = []
    for pattern in patterns:
        matches = [Path(pattern)] if Path(pattern).exists() or not glob.has_magic(pattern) else \
            [Path(m) for m in sorted(glob.glob(pattern, recursive=True))]
        if not matches:
            found.append(Path(pattern))
        for path in matches:
            if path.is_dir():
                found.extend(sorted(p for p in path.rglob("*")
                                    if p.is_file() and (not wanted or p.suffix.lower() in wanted)))
            else:
                found.append(path)
    return found


def _question_items(texts: list[str], files: list[Path], questions: list[str]) -> tuple[list[Any], dict | None]:
    """Items and shared fields for question answering: one question for every context, or one
    question per ``--text`` context (paired in order)."""
    if len(questions) == 1:
        return [*texts, *files], {"question": questions[0]}
    if files or len(questions) != len(texts):
        raise SpecError(f"--question: give one question (asked of every context) or one per --text context; got "
                        f"{len(questions)} question(s), {len(texts)} --text and {len(files)} file(s).")
    return [{"question": q, "context": t, "id": t} for q, t in zip(questions, texts)], None


# --------------------------------------------------------------------------- output


def _jsonable(value: Any) -> Any:
    """numpy/torch scalars and arrays, paths: as JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class ResultWriter:
    """JSON lines to a stream; :class:`d2v.api.interfaces.ResultFile` values written as files in
    ``files_dir`` (named after the input and the field, e.g. ``cat.mask.png``)."""

    def __init__(self, stream: Any, files_dir: Path):
        self.stream = stream
        self.files_dir = files_dir
        self.taken: set[str] = set()

    def file_name(self, record: dict[str, Any], key: str, suffix: str) -> Path:
        # a text's label is "<file>:<line>": only that line number is dropped (a --text or a path may hold ":")
        stem = Path(re.sub(r":\d+$", "", str(record.get("input", "result")))).stem or "result"
        name, n = f"{stem}.{key}{suffix}", 1
        while name in self.taken:
            n += 1
            name = f"{stem}-{n}.{key}{suffix}"
        self.taken.add(name)
        return self.files_dir / name

    def write(self, record: dict[str, Any]) -> None:
        from d2v.api.interfaces import ResultFile

        line = {}
        for key, value in record.items():
            if isinstance(value, ResultFile):
                self.files_dir.mkdir(parents=True, exist_ok=True)
                path = self.file_name(record, key, value.suffix)
                value.save(path)
                value = str(path)
            line[key] = value
        self.stream.write(json.dumps(line, ensure_ascii=False, default=_jsonable) + "\n")
        self.stream.flush()


# --------------------------------------------------------------------------- the command


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """Generation options the user set (the others keep the head's defaults)."""
    options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
               "sample_top_k": args.sample_top_k, "seed": args.seed, "strategy": "sample" if args.sample else None}
    return {k: v for k, v in options.items() if v is not None}


class _StderrReport(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        print(f"d2v predict: {record.getMessage()}", file=sys.stderr)


def use_decoder(head: Any, text: str) -> None:
    """``--decoder``: a head's decoding option (e.g. CTC's ``decoder``), as YAML, checked by the head."""
    import yaml

    if not hasattr(head, "decoder"):
        raise SpecError(f"--decoder: this model's head ({type(head).__name__}) has no decoder option.")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"--decoder: not a name or a YAML mapping ({exc}).") from None
    head.decoder = value


def predict_command(args: argparse.Namespace) -> int:
    """Run ``d2v predict``; the exit status is :data:`EXIT_STATUS`."""
    from d2v.use.pipeline import pipeline

    if not (args.inputs or args.text or args.verify):
        raise SpecError("d2v predict: give inputs (files, directories or globs), --text or --verify A B.")
    if args.verify and (args.inputs or args.text):
        raise SpecError("d2v predict: --verify scores pairs; give inputs or --verify, not both.")
    compile_setting = {"backend": args.compile} if args.compile else False
    pipe = pipeline(args.task, model=args.model, device=args.device, batch_size=args.batch_size, top_k=args.top_k,
                    progress=True, compile=compile_setting, pad_to_multiple_of=args.pad_to_multiple_of,
                    **_options(args))
    if args.verify and not pipe.is_pair_task:
        pair_tasks = tuple(getattr(pipe.head, "pair_tasks", ()) or ())
        if not pair_tasks or args.task is not None:
            raise SpecError(f"--verify: this model's head ({type(pipe.head).__name__}) does not score pairs; it does "
                            f"{', '.join(pipe.tasks)}.")
        pipe.task = pair_tasks[0]
    elif not args.verify and pipe.is_pair_task:
        raise SpecError(f"task '{pipe.task}' scores pairs of inputs: use --verify A B.")
    if args.decoder is not None:
        use_decoder(pipe.head, args.decoder)

    handler = _StderrReport()
    logger = logging.getLogger("d2v.pipeline")
    logger.addHandler(handler)
    try:
        if args.verify:
            records = pipe.verify([tuple(pair) for pair in args.verify])
        else:
            files = expand_inputs(args.inputs, getattr(pipe.processor, "file_suffixes", None))
            items, fields = list(args.text) + files, None
            if args.question:
                items, fields = _question_items(list(args.text), files, args.question)
            if args.choice:
                fields = {**(fields or {}), "choices": list(args.choice)}
            if not items:
                raise SpecError(f"d2v predict: no input files found in {', '.join(args.inputs)}.")
            names = [item["id"] if isinstance(item, dict) else str(item) for item in items]
            records = pipe.run(items, names=names, fields=fields)
    finally:
        logger.removeHandler(handler)

    out_path = Path(args.out) if args.out else None
    files_dir = Path(args.files_dir) if args.files_dir else (out_path.parent if out_path else Path("predictions"))
    if out_path:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    stream = open(out_path, "w", encoding="utf-8") if out_path else sys.stdout
    try:
        writer = ResultWriter(stream, files_dir)
        for record in records:
            writer.write(record)
    finally:
        if out_path:
            stream.close()
    failed = sum("error" in r for r in records)
    if failed:
        print(f"d2v predict: {failed} of {len(records)} inputs failed", file=sys.stderr)
    return FAILED_INPUTS_EXIT_CODE if failed and not (args.allow_failures and failed < len(records)) else 0


__all__ = ["EXIT_STATUS", "FAILED_INPUTS_EXIT_CODE", "ResultWriter", "add_parser", "expand_inputs",
           "predict_command"]
