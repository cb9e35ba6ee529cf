"""How the CTC head turns frame scores into text: the ``decoder`` option and the LM-fused beam search.

Three decoders, chosen by name in the head's spec::

    head: {name: ctc, decoder: greedy}                      # best path (the default)
    head: {name: ctc, decoder: {name: beam, beam_size: 16}}  # prefix beam search, no LM
    head: {name: ctc, decoder: {name: lm_beam, lm: lm.arpa, alpha: 0.5, beta: 2.0, beam_size: 50}}

``lm_beam`` is flashlight-text's lexicon beam search (the decoder behind torchaudio's
``ctc_decoder``, shipped as a binary wheel with KenLM built in): hypotheses are spelled through
a lexicon trie, so every output word is a lexicon word, and each finished word adds
``alpha * log10 p_LM(word | history) + beta`` to the acoustic (natural) log-probability
(``alpha``: LM weight on KenLM's log10 scores, ``beta``: word insertion bonus). The lexicon is
``lexicon:`` (a file, one word per line, optionally followed by its spelling in vocabulary
tokens) or, without one, the words of the ARPA file. Without ``lm`` the same search runs with a
zero LM (a lexicon-constrained beam), and without both it is flashlight's lexicon-free beam
search.

Options are checked when the head is built (files exist, words are spellable with the CTC
vocabulary, ``alpha``/``beta`` only with something they weight); the LM itself is loaded on
the first decode, so training with a large LM in the spec does not wait for it.
"""

from __future__ import annotations

import difflib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from d2v.api.errors import SpecError
from d2v_heads.speech.ctc_vocab import CharVocab

DECODER_NAMES = ("greedy", "beam", "lm_beam")
#: options that only the LM-fused decoder reads
LM_OPTIONS = ("lm", "alpha", "beta", "lexicon", "beam_threshold", "log_add")
WHERE = "model.head.decoder"
_SPECIAL_WORDS = ("<s>", "</s>", "<unk>")


@dataclass(frozen=True)
class DecoderOptions:
    """A validated ``decoder`` spec value.

    * ``name``: ``greedy``, ``beam`` (d2v's prefix beam search) or ``lm_beam`` (flashlight-text).
    * ``beam_size``: hypotheses kept per frame (``beam`` and ``lm_beam``).
    * ``lm``: a KenLM model, ARPA text (``.arpa``, e.g. from ``d2v lm build``) or KenLM binary.
    * ``alpha``: LM weight; ``beta``: word insertion bonus (added per word, natural-log units).
    * ``lexicon``: the words allowed (one a line, optionally with their token spelling).
    * ``beam_threshold``: drop hypotheses this far (log-prob) below the best of the frame.
    * ``log_add``: merge hypotheses that reach the same state by adding their probabilities
      (the CTC prefix probability; ``false``: keep the best alignment's, Viterbi).
    """

    name: str = "greedy"
    beam_size: int = 8
    lm: str | None = None
    alpha: float | None = None
    beta: float | None = None
    lexicon: str | None = None
    beam_threshold: float = 25.0
    log_add: bool = True

    @property
    def lm_weight(self) -> float:
        return 0.5 if self.alpha is None else float(self.alpha)

    @property
    def word_score(self) -> float:
        return 0.0 if self.beta is None else float(self.beta)


def decoder_options(value: str | dict[str, Any] | DecoderOptions, *, beam_size: int = 8) -> DecoderOptions:
    """Validate the head's ``decoder`` value (a name or ``{name: ..., ...}``); ``beam_size`` is
    the head's own parameter, used when the mapping does not set one."""
    if isinstance(value, DecoderOptions):
        return value
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise SpecError(f"{WHERE}: expected a decoder name ({', '.join(DECODER_NAMES)}) or a mapping with 'name:', "
                        f"got {value!r}.")
    known = [f.name for f in fields(DecoderOptions)]
    for key in value:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f". Options: {', '.join(known)}."
            raise SpecError(f"{WHERE}.{key}: unknown decoder option{hint}")
    name = value.get("name", "greedy")
    if name not in DECODER_NAMES:
        close = difflib.get_close_matches(str(name), DECODER_NAMES, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise SpecError(f"{WHERE}.name: unknown decoder {name!r}; choose one of {', '.join(DECODER_NAMES)}.{hint}")
    options = DecoderOptions(**{"beam_size": beam_size, **value})
    if not isinstance(options.beam_size, int) or isinstance(options.beam_size, bool) or options.beam_size < 1:
        raise SpecError(f"{WHERE}.beam_size: must be an integer >= 1, not {options.beam_size!r}.")
    given = [key for key in LM_OPTIONS if key in value]
    if name != "lm_beam" and given:
        raise SpecError(f"{WHERE}: {', '.join(given)} only apply to the LM-fused decoder; set "
                        f"{WHERE}.name: lm_beam (or remove them).")
    if name == "lm_beam":
        _check_lm_options(options)
    return options


def _check_lm_options(options: DecoderOptions) -> None:
    for key in ("alpha", "beta", "beam_threshold"):
        number = getattr(options, key)
        if number is not None and (isinstance(number, bool) or not isinstance(number, (int, float))
                                   or not math.isfinite(number)):
            raise SpecError(f"{WHERE}.{key}: must be a finite number, not {number!r}.")
    if not isinstance(options.log_add, bool):
        raise SpecError(f"{WHERE}.log_add: must be true or false, not {options.log_add!r}.")
    if options.alpha is not None and options.lm is None:
        raise SpecError(f"{WHERE}.alpha: the LM weight needs a language model; set {WHERE}.lm to an ARPA or KenLM "
                        f"binary file (build one with `d2v lm build`) or remove alpha.")
    if options.beta is not None and options.lm is None and options.lexicon is None:
        raise SpecError(f"{WHERE}.beta: the word insertion bonus needs words: set {WHERE}.lm or {WHERE}.lexicon, "
                        f"or remove beta.")
    for key in ("lm", "lexicon"):
        path = getattr(options, key)
        if path is not None and not Path(path).is_file():
            hint = " Build one with `d2v lm build TRANSCRIPTS --out lm.arpa`." if key == "lm" else ""
            raise SpecError(f"{WHERE}.{key}: no file at '{path}' (resolved: {Path(path).absolute()}).{hint}")
    if options.lm is not None and options.lexicon is None and _is_kenlm_binary(options.lm):
        raise SpecError(f"{WHERE}.lexicon: the KenLM binary '{options.lm}' does not list its words; give a lexicon "
                        f"(one word a line) or use the ARPA file.")


def _is_kenlm_binary(path: str) -> bool:
    with open(path, "rb") as handle:
        return handle.read(7) == b"mmap lm"


# --------------------------------------------------------------------------- lexicons
def read_lexicon(path: str | Path, vocab: CharVocab) -> dict[str, list[int]]:
    """``word -> token ids`` from a lexicon file: each line a word, optionally followed by its
    spelling in vocabulary tokens (a trailing ``|`` is allowed); a bare word is spelled with
    the vocabulary (case matched). Words that cannot be spelled are an error naming them."""
    lexicon: dict[str, list[int]] = {}
    bad: list[str] = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            parts = line.split()
            if not parts or parts[0] in _SPECIAL_WORDS:
                continue
            word, tokens = parts[0], parts[1:]
            spelling = _spell_tokens(tokens, vocab) if tokens else _spell_word(word, vocab)
            if spelling is None:
                bad.append(f"{word!r} (line {number})")
            elif word not in lexicon:
                lexicon[word] = spelling
    if bad:
        raise SpecError(f"{WHERE}.lexicon: {len(bad)} words of '{path}' cannot be spelled with the CTC vocabulary "
                        f"({' '.join(vocab.tokens)}): {', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}. "
                        f"Remove them, normalise the lexicon, or extend head.vocab.")
    if not lexicon:
        raise SpecError(f"{WHERE}.lexicon: '{path}' holds no words.")
    return lexicon


def lm_lexicon(path: str | Path, vocab: CharVocab) -> dict[str, list[int]]:
    """``word -> token ids`` for the words of an ARPA file's unigram section; words the CTC
    vocabulary cannot spell (punctuation, other scripts) are left out, as they could never be
    recognised anyway."""
    lexicon: dict[str, list[int]] = {}
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if line.strip() == "\\1-grams:":
                break
        for line in lines:  # "log10 p  word  [backoff]" up to the blank line that ends the section
            parts = line.split()
            if len(parts) < 2 or parts[0].startswith("\\"):
                break
            word = parts[1]
            spelling = None if word in _SPECIAL_WORDS else _spell_word(word, vocab)
            if spelling is not None:
                lexicon.setdefault(word, spelling)
    if not lexicon:
        raise SpecError(f"{WHERE}.lm: no word of '{path}' can be spelled with the CTC vocabulary "
                        f"({' '.join(vocab.tokens)}); is it an ARPA file of this language and letter set?")
    return lexicon


def _spell_word(word: str, vocab: CharVocab) -> list[int] | None:
    spelling = []
    for char in vocab.normalize(word):
        token = vocab.token_to_id.get(char)
        if token is None or token in vocab.special_ids or token == vocab.word_delimiter_id:
            return None
        spelling.append(token)
    return spelling or None


def _spell_tokens(tokens: Sequence[str], vocab: CharVocab) -> list[int] | None:
    if tokens and tokens[-1] == vocab.word_delimiter_token:
        tokens = tokens[:-1]
    ids = [vocab.token_to_id.get(t) for t in tokens]
    if not ids or any(i is None or i in vocab.special_ids or i == vocab.word_delimiter_id for i in ids):
        return None
    return ids


# --------------------------------------------------------------------------- the LM-fused decoder
class LexiconBeamDecoder:
    """flashlight-text's CTC beam search with a KenLM word LM over a lexicon trie (or, without
    LM and lexicon, its lexicon-free beam search). Built from checked options; the LM and the
    trie are made on the first :meth:`decode_ids` call."""

    def __init__(self, options: DecoderOptions, vocab: CharVocab) -> None:
        _import_flashlight()
        if vocab.word_delimiter_id is None:
            raise SpecError(f"{WHERE}: lm_beam needs a word delimiter token ('{vocab.word_delimiter_token}') in the "
                            f"CTC vocabulary to find word boundaries.")
        self.options = options
        self.vocab = vocab
        if options.lexicon is not None:
            self.lexicon: dict[str, list[int]] | None = read_lexicon(options.lexicon, vocab)
        elif options.lm is not None:
            self.lexicon = lm_lexicon(options.lm, vocab)
        else:
            self.lexicon = None
        #: word index (flashlight's) -> spelling, listed once rather than per decoded utterance
        self._spellings = None if self.lexicon is None else list(self.lexicon.values())
        self._decoder: Any = None

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave the native decoder behind; it is rebuilt on first use."""
        return {**self.__dict__, "_decoder": None}

    def _build(self) -> Any:
        fl = _import_flashlight()
        o = self.options
        sil = self.vocab.word_delimiter_id
        blank = self.vocab.blank_id
        if self.lexicon is None:
            free = fl.LexiconFreeDecoderOptions(
                beam_size=o.beam_size, beam_size_token=len(self.vocab), beam_threshold=float(o.beam_threshold),
                lm_weight=0.0, sil_score=0.0, log_add=bool(o.log_add), criterion_type=fl.CriterionType.CTC)
            return fl.LexiconFreeDecoder(free, fl.ZeroLM(), sil, blank, [])
        words = fl.Dictionary()
        for word in self.lexicon:
            words.add_entry(word)
        words.add_entry("<unk>")
        lm = fl.KenLM(str(o.lm), words) if o.lm is not None else fl.ZeroLM()
        trie = fl.Trie(len(self.vocab), sil)
        start = lm.start(False)
        for word, spelling in self.lexicon.items():
            index = words.get_index(word)
            _, score = lm.score(start, index)
            trie.insert(spelling + [sil], index, score)
        trie.smear(fl.SmearingMode.MAX)
        settings = fl.LexiconDecoderOptions(
            beam_size=o.beam_size, beam_size_token=len(self.vocab), beam_threshold=float(o.beam_threshold),
            lm_weight=o.lm_weight if o.lm is not None else 0.0, word_score=o.word_score, unk_score=-math.inf,
            sil_score=0.0, log_add=bool(o.log_add), criterion_type=fl.CriterionType.CTC)
        return fl.LexiconDecoder(settings, trie, lm, sil, blank, words.get_index("<unk>"), [], False)

    def decode_ids(self, log_probs: Tensor, lengths: Sequence[int]) -> list[list[int]]:
        """Best token ids (CTC-collapsed, ``|`` between words) per utterance of ``log_probs``
        ``(B, T, V)``, each restricted to its first ``lengths[b]`` frames."""
        if self._decoder is None:
            self._decoder = self._build()
        table = log_probs.detach().to(device="cpu", dtype=torch.float32)
        out = []
        for b, frames in enumerate(lengths):
            if frames == 0:
                out.append([])
                continue
            emissions = table[b, :frames].contiguous()
            results = self._decoder.decode(emissions.data_ptr(), frames, emissions.shape[-1])
            out.append(self._ids(results[0]) if results else [])
        return out

    def _ids(self, result: Any) -> list[int]:
        """A flashlight result as CTC label ids: with a lexicon, the spellings of its words
        (its frame path may end inside a word the search had not finished); without one, the
        frame path collapsed (the path has one token per frame plus a word boundary before
        and after)."""
        if self._spellings is not None:
            spellings = self._spellings
            ids: list[int] = []
            for word in (w for w in result.words if 0 <= w < len(spellings)):
                ids += ([self.vocab.word_delimiter_id] if ids else []) + spellings[word]
            return ids
        collapsed = (token for token, _ in itertools.groupby(result.tokens[1:-1]))
        return [int(t) for t in collapsed if 0 <= t != self.vocab.blank_id]


def _import_flashlight() -> SimpleNamespace:
    """The flashlight-text classes the decoder uses, in one namespace (a clear error when the
    package is missing)."""
    try:
        from flashlight.lib.text.decoder import (
            CriterionType,
            LexiconDecoder,
            LexiconDecoderOptions,
            LexiconFreeDecoder,
            LexiconFreeDecoderOptions,
            SmearingMode,
            Trie,
            ZeroLM,
        )
        from flashlight.lib.text.decoder.kenlm import KenLM
        from flashlight.lib.text.dictionary import Dictionary
    except ImportError as exc:
        raise SpecError(f"{WHERE}: decoder lm_beam needs the flashlight-text package (a binary wheel with KenLM "
                        f"built in): pip install flashlight-text. ({exc})") from None
    return SimpleNamespace(
        CriterionType=CriterionType, KenLM=KenLM, LexiconDecoder=LexiconDecoder,
        LexiconDecoderOptions=LexiconDecoderOptions, LexiconFreeDecoder=LexiconFreeDecoder,
        LexiconFreeDecoderOptions=LexiconFreeDecoderOptions, SmearingMode=SmearingMode, Trie=Trie, ZeroLM=ZeroLM,
        Dictionary=Dictionary)


__all__ = ["DECODER_NAMES", "DecoderOptions", "LexiconBeamDecoder", "decoder_options", "lm_lexicon", "read_lexicon"]
