"""Character vocabularies for CTC heads, compatible with Hugging Face's ``vocab.json``.

A :class:`CharVocab` is an ordered list of tokens; a token's id is its position. The
conventions are those of ``Wav2Vec2CTCTokenizer`` and the data2vec / wav2vec 2.0 CTC
checkpoints:

* ``<pad>`` is the CTC blank (id 0 in every built-in vocabulary);
* ``<s>``, ``</s>``, ``<unk>`` are the other special tokens (``<unk>`` replaces any character
  the vocabulary does not know);
* ``|`` is the word delimiter: a space in the text is a ``|`` token.

The letter case of the text is matched to the vocabulary: a vocabulary whose letters are all
upper-case (LibriSpeech) upper-cases text before encoding; all lower-case lower-cases it; a
mixed-case vocabulary keeps the text as it is.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

PAD = "<pad>"
BOS = "<s>"
EOS = "</s>"
UNK = "<unk>"
WORD_DELIMITER = "|"
SPECIALS = (PAD, BOS, EOS, UNK, WORD_DELIMITER)

#: The character vocabulary of ``facebook/data2vec-audio-base-960h`` (and the wav2vec 2.0
#: LibriSpeech CTC models), in its ``vocab.json`` order: specials, then letters by frequency.
LIBRISPEECH_TOKENS: tuple[str, ...] = SPECIALS + tuple("ETAONIHSRDLUMWCFGYPBVK'XJQZ")

BUILTIN_VOCABS: dict[str, tuple[str, ...]] = {"librispeech": LIBRISPEECH_TOKENS}


def normalize_text(text: str) -> str:
    """Collapse runs of whitespace to one space and strip the ends."""
    return " ".join(text.split())


class CharVocab:
    """An ordered character vocabulary: ``encode`` text to ids, ``decode`` ids to text.

    ``tokens``: every token, in id order. Multi-character tokens are allowed for the
    specials; text is split into single characters when encoding.
    """

    def __init__(
        self,
        tokens: Sequence[str],
        *,
        pad_token: str = PAD,
        unk_token: str = UNK,
        word_delimiter_token: str = WORD_DELIMITER,
    ) -> None:
        tokens = [str(t) for t in tokens]
        if not tokens:
            raise ValueError("a CTC vocabulary needs at least one token (the blank)")
        duplicates = sorted({t for t in tokens if tokens.count(t) > 1})
        if duplicates:
            raise ValueError(f"vocabulary has duplicate tokens: {duplicates}")
        self.tokens: list[str] = tokens
        self.token_to_id: dict[str, int] = {t: i for i, t in enumerate(tokens)}
        self.pad_token = pad_token
        self.unk_token = unk_token
        self.word_delimiter_token = word_delimiter_token
        letters = [c for t in tokens if len(t) == 1 for c in t if c.isalpha()]
        if letters and all(c.isupper() for c in letters):
            self.case: str | None = "upper"
        elif letters and all(c.islower() for c in letters):
            self.case = "lower"
        else:
            self.case = None

    # ---------------------------------------------------------------- ids of the specials
    @property
    def blank_id(self) -> int:
        """The CTC blank: the id of ``<pad>`` (0 if the vocabulary has no ``<pad>``)."""
        return self.token_to_id.get(self.pad_token, 0)

    @property
    def pad_id(self) -> int:
        return self.blank_id

    @property
    def unk_id(self) -> int | None:
        return self.token_to_id.get(self.unk_token)

    @property
    def word_delimiter_id(self) -> int | None:
        return self.token_to_id.get(self.word_delimiter_token)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids that never appear in decoded text (everything in :data:`SPECIALS` but ``|``)."""
        names = (PAD, BOS, EOS, UNK, self.pad_token, self.unk_token)
        return frozenset(self.token_to_id[t] for t in names if t in self.token_to_id)

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharVocab) and self.tokens == other.tokens

    def __repr__(self) -> str:
        return f"CharVocab({len(self)} tokens: {' '.join(self.tokens)})"

    # ---------------------------------------------------------------- text <-> ids
    def normalize(self, text: str) -> str:
        """The text as the vocabulary sees it: whitespace collapsed, case matched."""
        text = normalize_text(text)
        if self.case == "upper":
            text = text.upper()
        elif self.case == "lower":
            text = text.lower()
        return text

    def encode(self, text: str) -> list[int]:
        """Text -> ids: case matched, spaces -> ``|``, unknown characters -> ``<unk>``."""
        ids = []
        delimiter = self.word_delimiter_id
        for char in self.normalize(text):
            if char == " " and delimiter is not None:
                ids.append(delimiter)
                continue
            token_id = self.token_to_id.get(char)
            if token_id is None:
                if self.unk_id is None:
                    raise ValueError(f"character {char!r} is not in the vocabulary, which has no {self.unk_token}")
                token_id = self.unk_id
            ids.append(token_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Ids (already CTC-collapsed, or plain labels) -> text.

        Special tokens are dropped (as ``skip_special_tokens=True`` in Hugging Face's ASR
        pipeline), ``|`` becomes a space, and whitespace is collapsed and stripped.
        Ids past the vocabulary are dropped too.
        """
        skip = self.special_ids
        delimiter = self.word_delimiter_id
        pieces = []
        for i in ids:
            i = int(i)
            if i in skip or not 0 <= i < len(self.tokens):
                continue
            pieces.append(" " if i == delimiter else self.tokens[i])
        return normalize_text("".join(pieces))

    # ---------------------------------------------------------------- building / files
    @classmethod
    def build(cls, texts: Iterable[str], *, case: str | None = None) -> CharVocab:
        """A vocabulary for ``texts``: ``<pad> <s> </s> <unk> |``, then every character by
        descending frequency (ties alphabetical). ``case="upper"|"lower"`` converts the texts
        first; spaces become ``|`` and are not counted as characters."""
        if case not in (None, "upper", "lower"):
            raise ValueError(f"case must be None, 'upper' or 'lower', not {case!r}")
        counts: Counter[str] = Counter()
        for text in texts:
            text = normalize_text(text)
            if case == "upper":
                text = text.upper()
            elif case == "lower":
                text = text.lower()
            counts.update(text.replace(" ", ""))
        for special in SPECIALS:
            counts.pop(special, None)
        chars = sorted(counts, key=lambda c: (-counts[c], c))
        return cls(list(SPECIALS) + chars)

    @classmethod
    def builtin(cls, name: str) -> CharVocab:
        try:
            return cls(BUILTIN_VOCABS[name])
        except KeyError:
            raise ValueError(f"unknown built-in vocabulary {name!r}; built-ins: {', '.join(sorted(BUILTIN_VOCABS))}") from None

    def to_dict(self) -> dict[str, int]:
        """``{token: id}``, the layout of Hugging Face's ``vocab.json``."""
        return dict(self.token_to_id)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The ``vocab.json`` text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), ensure_ascii=False, indent=2)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    @classmethod
    def from_dict(cls, mapping: dict[str, int]) -> CharVocab:
        ids = sorted(mapping.values())
        if ids != list(range(len(ids))):
            raise ValueError("vocab ids must be 0..N-1 without gaps or repeats")
        return cls(sorted(mapping, key=mapping.__getitem__))

    @classmethod
    def from_json(cls, source: str | os.PathLike) -> CharVocab:
        """Read a ``vocab.json`` (``{token: id}`` or a list of tokens): a file path, a
        directory holding ``vocab.json`` (a Hugging Face checkpoint), or the JSON text."""
        text = str(source)
        if not text.lstrip().startswith(("{", "[")):
            path = Path(source)
            if path.is_dir():
                path = path / "vocab.json"
            if not path.is_file():
                raise FileNotFoundError(f"no vocabulary file at {path}")
            text = path.read_text(encoding="utf-8")
        data = json.loads(text)
        if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
            # multi-lingual vocab.json ({lang: {token: id}}) -- take the only language
            if len(data) != 1:
                raise ValueError(f"vocab.json holds several languages ({', '.join(data)}); pass one as a dict")
            data = next(iter(data.values()))
        if isinstance(data, dict):
            return cls.from_dict({str(k): int(v) for k, v in data.items()})
        if isinstance(data, list):
            return cls(data)
        raise ValueError("vocab.json must hold a {token: id} object or a list of tokens")

    @classmethod
    def resolve(cls, vocab: str | os.PathLike | Sequence[str] | CharVocab) -> CharVocab:
        """A vocabulary from a spec value: a built-in name, a path, a token list, or a vocab."""
        if isinstance(vocab, CharVocab):
            return vocab
        if isinstance(vocab, str) and vocab in BUILTIN_VOCABS:
            return cls.builtin(vocab)
        if isinstance(vocab, (str, os.PathLike)):
            if isinstance(vocab, str) and not os.path.exists(vocab) and not vocab.lstrip().startswith(("{", "[")):
                raise ValueError(
                    f"vocab {vocab!r} is neither a built-in vocabulary ({', '.join(sorted(BUILTIN_VOCABS))}) "
                    f"nor an existing vocab.json file or checkpoint directory"
                )
            return cls.from_json(vocab)
        if isinstance(vocab, dict):
            return cls.from_dict(vocab)
        return cls(list(vocab))
