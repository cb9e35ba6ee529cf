"""Word n-gram language models in ARPA format: estimate one from transcripts, read one back.

KenLM's ``lmplz`` is the usual tool for building an ARPA file, but it is a compiled binary that
pip cannot install. This module estimates the same kind of model in pure Python, small enough
for the transcripts of a fine-tuning set (an LM for CTC beam search, see ``d2v lm build``):

* **Interpolated modified Kneser-Ney** (Chen & Goodman 1998), with lmplz's conventions: the
  highest order and every n-gram that starts with ``<s>`` use raw counts; the other orders use
  continuation counts (how many distinct words precede the n-gram). Each order has three
  discounts ``D1, D2, D3+`` estimated from its count-of-counts; where the data are too few for
  that estimate (a count-of-count is zero, or a discount leaves ``(0, k)``) the discounts of
  lmplz's ``--discount_fallback`` (0.5, 1, 1.5) are used.
* Unigrams interpolate with the uniform distribution over the vocabulary (every word seen,
  ``</s>`` and ``<unk>``), so ``<unk>`` gets a small probability and every context's
  distribution sums to one.
* The ARPA file stores each n-gram's interpolated ``log10`` probability and, for n-grams that
  are contexts of longer ones, the ``log10`` back-off weight (the interpolation weight
  ``gamma``), so that back-off queries reproduce the interpolated model exactly.

Sentences are whitespace-split words; ``<s>`` and ``</s>`` are added around each.
"""

from __future__ import annotations

import argparse
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from d2v.api.errors import SpecError

BOS = "<s>"
EOS = "</s>"
UNK = "<unk>"

#: lmplz's ``--discount_fallback`` defaults, used where count-of-counts cannot estimate D1, D2, D3+
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)

Ngram = tuple[str, ...]


# --------------------------------------------------------------------------- estimation
def raw_counts(sentences: Iterable[Sequence[str]], order: int) -> list[Counter[Ngram]]:
    """``counts[n - 1][ngram]``: how often each n-gram (n = 1..order) occurs in the sentences
    padded with ``<s>`` and ``</s>`` (those two inside a sentence are dropped)."""
    counts: list[Counter[Ngram]] = [Counter() for _ in range(order)]
    for words in sentences:
        padded = (BOS, *(w for w in words if w not in (BOS, EOS)), EOS)
        for n in range(1, order + 1):
            for start in range(len(padded) - n + 1):
                counts[n - 1][padded[start:start + n]] += 1
    return counts


def adjusted_counts(counts: list[Counter[Ngram]]) -> list[Counter[Ngram]]:
    """Kneser-Ney's counts: raw at the highest order and for n-grams starting with ``<s>``
    (nothing can precede them); elsewhere the number of distinct words seen before the n-gram."""
    order = len(counts)
    adjusted = [Counter() for _ in range(order)]
    adjusted[-1] = Counter(counts[-1])
    for n in range(order - 1):
        for longer in counts[n + 1]:
            adjusted[n][longer[1:]] += 1
        for ngram, count in counts[n].items():
            if ngram[0] == BOS:
                adjusted[n][ngram] = count
    return adjusted


def discounts(adjusted: Counter[Ngram]) -> tuple[float, float, float]:
    """Modified Kneser-Ney discounts ``(D1, D2, D3+)`` from one order's count-of-counts."""
    t = Counter(min(c, 4) for g, c in adjusted.items() if g != (BOS,))
    t1, t2, t3, t4 = (t[k] for k in (1, 2, 3, 4))
    if t1 == 0 or t2 == 0 or t3 == 0:
        return FALLBACK_DISCOUNTS
    y = t1 / (t1 + 2 * t2)
    found = (1 - 2 * y * t2 / t1, 2 - 3 * y * t3 / t2, 3 - 4 * y * t4 / t3)
    return tuple(d if 0 < d < k else fb for k, (d, fb) in enumerate(zip(found, FALLBACK_DISCOUNTS), start=1))


@dataclass
class NGramLM:
    """A back-off n-gram model: ``log10`` probabilities and back-off weights per n-gram.

    ``probs[n - 1][ngram]`` is ``log10 p(ngram[-1] | ngram[:-1])``; ``backoffs[ngram]`` the
    ``log10`` weight applied when a context ``ngram`` has no entry for the next word.
    """

    order: int
    probs: list[dict[Ngram, float]]
    backoffs: dict[Ngram, float] = field(default_factory=dict)

    @property
    def vocabulary(self) -> list[str]:
        """Every unigram (``<s>``, ``</s>`` and ``<unk>`` included), in file order."""
        return [g[0] for g in self.probs[0]]

    def log10_prob(self, word: str, context: Sequence[str] = ()) -> float:
        """``log10 p(word | context)`` by the ARPA back-off rule (only the last ``order - 1``
        words of the context count; unknown words are ``<unk>``)."""
        if (word,) not in self.probs[0]:
            word = UNK
        context = tuple(w if (w,) in self.probs[0] else UNK for w in context)[len(context) - self.order + 1:]
        penalty = 0.0
        while True:
            ngram = (*context, word)
            found = self.probs[len(ngram) - 1].get(ngram)
            if found is not None:
                return penalty + found
            if not context:
                return -math.inf
            penalty += self.backoffs.get(context, 0.0)
            context = context[1:]

    def sentence_log10_prob(self, words: Sequence[str]) -> float:
        """``log10 p(words </s> | <s>)``."""
        history = [BOS]
        total = 0.0
        for word in (*words, EOS):
            total += self.log10_prob(word, history)
            history.append(word)
        return total

    # ------------------------------------------------------------------ ARPA files
    def write_arpa(self, path: str | Path) -> None:
        """Write the standard ARPA text (what KenLM, SRILM and the decoders read)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as out:
            out.write("\n\\data\\\n")
            for n, table in enumerate(self.probs, start=1):
                out.write(f"ngram {n}={len(table)}\n")
            for n, table in enumerate(self.probs, start=1):
                out.write(f"\n\\{n}-grams:\n")
                for ngram, logp in table.items():
                    line = f"{logp:.6f}\t{' '.join(ngram)}"
                    if n < self.order and ngram in self.backoffs:
                        line += f"\t{self.backoffs[ngram]:.6f}"
                    out.write(line + "\n")
            out.write("\n\\end\\\n")

    @classmethod
    def read_arpa(cls, path: str | Path) -> NGramLM:
        """Read an ARPA file (plain text; what :meth:`write_arpa` writes, or lmplz's output)."""
        path = Path(path)
        if not path.is_file():
            raise SpecError(f"no ARPA language model at '{path}'. Build one with `d2v lm build`.")
        probs: list[dict[Ngram, float]] = []
        backoffs: dict[Ngram, float] = {}
        section = 0
        with open(path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                line = line.strip()
                if not line or line.startswith("ngram ") or line == "\\data\\":
                    continue
                if line == "\\end\\":
                    break
                if line.startswith("\\") and line.endswith("-grams:"):
                    section = int(line[1:-len("-grams:")])
                    probs.append({})
                    continue
                fields = line.split()
                if section == 0 or len(fields) not in (section + 1, section + 2):
                    raise SpecError(f"{path}:{number}: not an ARPA n-gram line: {line[:80]!r}")
                ngram = tuple(fields[1:section + 1])
                probs[section - 1][ngram] = float(fields[0])
                if len(fields) == section + 2:
                    backoffs[ngram] = float(fields[-1])
        if not probs:
            raise SpecError(f"{path}: no n-gram sections; is this an ARPA file?")
        return cls(order=len(probs), probs=probs, backoffs=backoffs)


def estimate(sentences: Iterable[Sequence[str]], order: int = 3) -> NGramLM:
    """An interpolated modified Kneser-Ney model of ``order`` from tokenised sentences."""
    if order < 1:
        raise SpecError(f"n-gram order must be >= 1, not {order}")
    counts = raw_counts(sentences, order)
    if not counts[0]:
        raise SpecError("no sentences to estimate a language model from")
    adjusted = adjusted_counts(counts)
    vocabulary = sorted({g[0] for g in counts[0]} - {BOS} | {EOS, UNK})
    uniform = 1.0 / len(vocabulary)
    probs: list[dict[Ngram, float]] = []  # interpolated probabilities (not logs) per order
    backoffs: dict[Ngram, float] = {}
    for n in range(1, order + 1):
        table = adjusted[n - 1]
        d = discounts(table)
        by_context: dict[Ngram, list[Ngram]] = defaultdict(list)
        for ngram in table:
            if ngram != (BOS,):
                by_context[ngram[:-1]].append(ngram)
        current: dict[Ngram, float] = {}
        for context, ngrams in by_context.items():
            total = sum(table[g] for g in ngrams)
            gamma = sum(d[min(table[g], 3) - 1] for g in ngrams) / total
            for ngram in ngrams:
                # the suffix of a seen n-gram is always a seen (n-1)-gram
                lower = probs[-1][ngram[1:]] if n > 1 else uniform
                current[ngram] = (table[ngram] - d[min(table[ngram], 3) - 1]) / total + gamma * lower
            if n == 1:
                for word in vocabulary:  # words never seen (<unk>) keep only their uniform share
                    current.setdefault((word,), gamma * uniform)
            else:
                backoffs[context] = math.log10(gamma) if gamma > 0 else -99.0
        probs.append(current)
    log_probs = [{g: math.log10(p) for g, p in sorted(table.items())} for table in probs]
    log_probs[0] = {(BOS,): -99.0, **log_probs[0]}  # never predicted; listed so it can be a context
    return NGramLM(order=order, probs=log_probs, backoffs={g: backoffs[g] for g in sorted(backoffs)})


# --------------------------------------------------------------------------- sources and CLI
def read_sentences(sources: Sequence[str], *, split: str = "train",
                   overrides: Sequence[str] = ()) -> Iterator[list[str]]:
    """Tokenised sentences from text files (one sentence per line) or from specs (``*.yaml``:
    the transcripts, ``text`` field, of the spec's ``data.<split>`` dataset)."""
    for source in sources:
        if source.endswith((".yaml", ".yml")):
            yield from (text.split() for text in _spec_transcripts(source, split, overrides))
            continue
        path = Path(source)
        if not path.is_file():
            raise SpecError(f"lm build: no text file '{path}' (give text files with one sentence per line, or a spec).")
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                if line.split():
                    yield line.split()


def _spec_transcripts(path: str, split: str, overrides: Sequence[str]) -> Iterator[str]:
    from d2v.spec.model import spec_dataset

    dataset = spec_dataset(path, split, list(overrides), "to read transcripts from")
    light = getattr(dataset, "light_example", dataset.__getitem__)
    found = 0
    for index in range(len(dataset)):
        text = light(index).get("text")
        if text:
            found += 1
            yield text
    if not found:
        raise SpecError(f"{path}: the examples of data.{split} have no 'text' transcripts to build a language "
                        f"model from.")


def _cmd_build(args: argparse.Namespace) -> int:
    sentences = list(read_sentences(args.sources, split=args.split, overrides=args.overrides))
    if args.case == "upper":
        sentences = [[w.upper() for w in s] for s in sentences]
    elif args.case == "lower":
        sentences = [[w.lower() for w in s] for s in sentences]
    lm = estimate(sentences, order=args.order)
    lm.write_arpa(args.out)
    sizes = ", ".join(f"{len(t)} {n}-grams" for n, t in enumerate(lm.probs, start=1))
    print(f"wrote {args.out}: order {lm.order} from {len(sentences)} sentences ({sizes})")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """``d2v lm build SOURCES... --order 3 --out lm.arpa``."""
    p = subparsers.add_parser("lm", help="word n-gram language models (ARPA) for decoding")
    lm = p.add_subparsers(dest="lm_command", required=True)
    q = lm.add_parser("build", help="estimate a modified Kneser-Ney ARPA model from transcripts")
    q.add_argument("sources", nargs="+", help="text files with one sentence per line, or specs (*.yaml) whose "
                                              "data.<split> transcripts are read")
    q.add_argument("--out", required=True, help="the ARPA file to write")
    q.add_argument("--order", type=int, default=3, help="n-gram order (default: 3)")
    q.add_argument("--split", default="train", help="which data.<split> of a spec (default: train)")
    q.add_argument("--case", choices=("keep", "upper", "lower"), default="keep",
                   help="change the case of the words (default: keep)")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override in the spec, e.g. --set data.train.root=/data/LibriSpeech (repeatable)")
    q.set_defaults(fn=_cmd_build)


__all__ = ["BOS", "EOS", "UNK", "NGramLM", "add_parser", "adjusted_counts", "discounts", "estimate",
           "raw_counts", "read_sentences"]
