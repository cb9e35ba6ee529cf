"""Sequence error metrics, modality-agnostic: edit distance, word and character errors.

Heads report *additive counts* (errors and reference units) so the runner can sum them over
batches and processes; the rate is computed once at the end (``errors / units``).

Conventions (those of ``jiwer``, which Hugging Face ``evaluate``'s ``wer``/``cer`` use):

* Words are the whitespace-separated tokens of the text.
* Characters are those of the whitespace-normalised text (runs of whitespace collapsed to
  one space, ends stripped), **spaces included**.
* Comparison is exact: no case folding or punctuation removal here (heads normalise text
  before counting, e.g. the CTC head matches case to its vocabulary).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["edit_distance", "word_errors", "char_errors", "error_rate", "normalize_whitespace"]


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance: the fewest substitutions, insertions and deletions (each cost
    1) turning ``ref`` into ``hyp``. Elements are compared with ``==``.

    Iterative dynamic programming over two rows: O(len(ref) * len(hyp)) time,
    O(min(len)) memory, after trimming the common prefix and suffix.
    """
    ref = list(ref)
    hyp = list(hyp)
    # a shared prefix or suffix never costs anything
    start = 0
    while start < len(ref) and start < len(hyp) and ref[start] == hyp[start]:
        start += 1
    end_ref, end_hyp = len(ref), len(hyp)
    while end_ref > start and end_hyp > start and ref[end_ref - 1] == hyp[end_hyp - 1]:
        end_ref -= 1
        end_hyp -= 1
    ref = ref[start:end_ref]
    hyp = hyp[start:end_hyp]
    if len(ref) < len(hyp):
        ref, hyp = hyp, ref  # the distance is symmetric; keep the shorter one in the row
    if not hyp:
        return len(ref)
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        current = [i]
        for j, h in enumerate(hyp, start=1):
            substitute = previous[j - 1] + (r != h)
            delete = previous[j] + 1
            insert = current[j - 1] + 1
            current.append(min(substitute, delete, insert))
        previous = current
    return previous[-1]


def normalize_whitespace(text: str) -> str:
    """Collapse runs of whitespace to one space and strip both ends."""
    return " ".join(text.split())


def word_errors(ref: str, hyp: str) -> tuple[int, int]:
    """``(word edit distance, number of reference words)``; WER = sum(errors) / sum(words)."""
    ref_words = ref.split()
    return edit_distance(ref_words, hyp.split()), len(ref_words)


def char_errors(ref: str, hyp: str) -> tuple[int, int]:
    """``(character edit distance, number of reference characters)`` on the
    whitespace-normalised strings, spaces counted as characters (as jiwer's CER)."""
    ref = normalize_whitespace(ref)
    return edit_distance(ref, normalize_whitespace(hyp)), len(ref)


def error_rate(errors: float, units: float) -> float:
    """``errors / units`` as a fraction; 0 when there are no errors and no units.

    With no reference units but some errors (only insertions) the rate is ``errors``,
    i.e. the denominator is taken as 1, so the result stays finite.
    """
    return float(errors) / max(float(units), 1.0)
