"""Text tokenizers: published byte-level BPE vocabularies and sentencepiece models, one API.

:class:`TextTokenizer` wraps either backend and always speaks RoBERTa:

* special tokens ``<s>`` (``bos``/``cls``), ``<pad>``, ``</s>`` (``eos``/``sep``), ``<unk>``
  and ``<mask>`` (ids 0, 1, 2, 3 and the last id in RoBERTa's and the demo vocabulary);
* single texts as ``<s> A </s>``, pairs as ``<s> A </s></s> B </s>``;
* every encoding carries ids, character offsets (into the text the token came from,
  ``(0, 0)`` for special tokens, leading spaces trimmed as ``trim_offsets=True``), word ids,
  sequence ids and the special-tokens mask;
* pre-split words (token classification) are encoded as RoBERTa's ``add_prefix_space=True``
  does: every word as if a space preceded it, offsets relative to each word.

A byte-level BPE vocabulary (``vocab.json`` + ``merges.txt`` beside a published checkpoint, or
a ``tokenizer.json``) runs on the ``tokenizers`` library, so it tokenizes exactly as
``transformers``' ``RobertaTokenizer`` (tests/unit/test_text_data.py checks ids and offsets).
As in RoBERTa's own tokenizer, ``<mask>`` strips the space before it (``lstrip``), so
``"a <mask>."`` has no separate space token. A sentencepiece model runs on ``sentencepiece``;
specials it lacks (e.g. ``<mask>``) get ids after its own pieces.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from d2v.api.errors import SpecError

BOS, PAD, EOS, UNK, MASK = "<s>", "<pad>", "</s>", "<unk>", "<mask>"
SPECIALS = (BOS, PAD, EOS, UNK, MASK)
SENTENCEPIECE_NAMES = ("spm.model", "sentencepiece.bpe.model", "sentencepiece.model", "tokenizer.model")
FORMATS = (
    "a directory with vocab.json + merges.txt (byte-level BPE, as beside RoBERTa/GPT-2 checkpoints), "
    "a tokenizer.json, a sentencepiece .model file, or a directory holding one of those"
)


@dataclass
class Encoding:
    """One encoded text or pair; all lists have one entry per token."""

    ids: list[int]
    offsets: list[tuple[int, int]]
    word_ids: list[int | None]
    sequence_ids: list[int | None]
    special_tokens_mask: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


class Pieces(NamedTuple):
    """The tokens of one text without special tokens (what encodings are assembled from)."""

    ids: list[int]
    offsets: list[tuple[int, int]]
    word_ids: list[int | None]

    def head(self, n: int) -> "Pieces":
        return Pieces(self.ids[:n], self.offsets[:n], self.word_ids[:n])

    def slice(self, start: int, stop: int) -> "Pieces":
        return Pieces(self.ids[start:stop], self.offsets[start:stop], self.word_ids[start:stop])


# ---------------------------------------------------------------------------------------- backends
class ByteLevelBPE:
    """A ``tokenizers`` byte-level BPE set up exactly as ``RobertaTokenizer``: ByteLevel
    pre-tokenizer and decoder, no normalizer, specials as added tokens (``<mask>`` lstrip)."""

    kind = "byte_level_bpe"

    def __init__(self, tokenizer: Any):
        from tokenizers import AddedToken, pre_tokenizers

        self.tokenizer = tokenizer
        missing = [t for t in SPECIALS if tokenizer.token_to_id(t) is None]
        if missing:
            raise SpecError(
                f"the BPE vocabulary has no {', '.join(missing)} token(s); d2v's text models use RoBERTa's specials "
                f"{' '.join(SPECIALS)}. Add them to vocab.json (RoBERTa: <s>=0 <pad>=1 </s>=2 <unk>=3, <mask> last)."
            )
        tokenizer.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in (BOS, PAD, EOS, UNK)]
            + [AddedToken(MASK, special=True, normalized=False, lstrip=True)]
        )
        tokenizer.no_truncation()
        tokenizer.no_padding()
        # the post-processor trims offsets exactly as RobertaTokenizer's (spaces excluded, also
        # when called without special tokens); d2v adds the special tokens itself
        prefix = isinstance(tokenizer.pre_tokenizer, pre_tokenizers.ByteLevel) and tokenizer.pre_tokenizer.add_prefix_space
        tokenizer.post_processor = self._roberta_processing(tokenizer, add_prefix_space=bool(prefix))
        # words of pre-split text are encoded as if a space preceded each (add_prefix_space=True)
        self.word_tokenizer = type(tokenizer).from_str(tokenizer.to_str())
        if isinstance(tokenizer.pre_tokenizer, pre_tokenizers.ByteLevel):
            self.word_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
            self.word_tokenizer.post_processor = self._roberta_processing(tokenizer, add_prefix_space=True)

    @staticmethod
    def _roberta_processing(tokenizer: Any, *, add_prefix_space: bool) -> Any:
        from tokenizers import processors

        return processors.RobertaProcessing((EOS, tokenizer.token_to_id(EOS)), (BOS, tokenizer.token_to_id(BOS)),
                                            trim_offsets=True, add_prefix_space=add_prefix_space)

    @classmethod
    def from_files(cls, vocab: Path, merges: Path) -> "ByteLevelBPE":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        try:
            model = models.BPE.from_file(str(vocab), str(merges), dropout=None, continuing_subword_prefix="",
                                         end_of_word_suffix="", fuse_unk=False)
        except Exception as exc:
            raise SpecError(f"cannot read BPE vocabulary {vocab} + {merges}: {exc}") from None
        tokenizer = Tokenizer(model)
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        return cls(tokenizer)

    @classmethod
    def from_json(cls, path: Path) -> "ByteLevelBPE":
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_file(str(path)))
        except SpecError:
            raise
        except Exception as exc:
            raise SpecError(f"cannot read tokenizer file {path}: {exc}") from None

    def __getstate__(self) -> dict:
        return {"json": self.tokenizer.to_str()}

    def __setstate__(self, state: dict) -> None:
        from tokenizers import Tokenizer

        self.__init__(Tokenizer.from_str(state["json"]))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, index: int) -> str | None:
        return self.tokenizer.id_to_token(index)

    def pieces(self, text: str) -> Pieces:
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        return Pieces(list(enc.ids), [tuple(o) for o in enc.offsets], list(enc.word_ids))

    def word_pieces(self, words: Sequence[str]) -> Pieces:
        if not words:
            return Pieces([], [], [])
        enc = self.word_tokenizer.encode(list(words), is_pretokenized=True, add_special_tokens=False)
        return Pieces(list(enc.ids), [tuple(o) for o in enc.offsets], list(enc.word_ids))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, directory: Path) -> list[Path]:
        """``tokenizer.json`` plus, for a BPE model, ``vocab.json`` + ``merges.txt`` -- the files
        ``transformers``' ``RobertaTokenizer.from_pretrained`` reads beside a checkpoint."""
        from tokenizers import models

        path = directory / "tokenizer.json"
        self.tokenizer.save(str(path))
        written = [path]
        if isinstance(self.tokenizer.model, models.BPE):
            written += [Path(p) for p in self.tokenizer.model.save(str(directory))]
        return written


class SentencePiece:
    """A ``sentencepiece`` model; RoBERTa specials it lacks are appended after its pieces."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, *, source: str = "sentencepiece model"):
        import sentencepiece as spm

        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load_from_serialized_proto(model_proto)
        except Exception as exc:
            raise SpecError(f"cannot read sentencepiece model {source}: {exc}") from None
        self.base_size = self.sp.get_piece_size()
        self.extra: dict[str, int] = {}
        for token in SPECIALS:
            if self._sp_id(token) is None:
                self.extra[token] = self.base_size + len(self.extra)
        self.extra_by_id = {i: t for t, i in self.extra.items()}

    @classmethod
    def from_file(cls, path: Path) -> "SentencePiece":
        return cls(path.read_bytes(), source=str(path))

    def __getstate__(self) -> dict:
        return {"proto": self.proto}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["proto"])

    def _sp_id(self, token: str) -> int | None:
        index = self.sp.piece_to_id(token)
        if index == self.sp.unk_id() and token != self.sp.id_to_piece(index):
            return None
        return index

    @property
    def vocab_size(self) -> int:
        return self.base_size + len(self.extra)

    def token_to_id(self, token: str) -> int | None:
        return self.extra.get(token, self._sp_id(token))

    def id_to_token(self, index: int) -> str | None:
        if index in self.extra_by_id:
            return self.extra_by_id[index]
        return self.sp.id_to_piece(index) if 0 <= index < self.base_size else None

    def pieces(self, text: str) -> Pieces:
        out = self.sp.encode_as_offset_mapping(text)
        offsets, words, word = [], [], -1
        for piece, (start, end) in zip(out["pieces"], out["offsets"]):
            if piece.startswith("\u2581") or word < 0:
                word += 1
            while start < end and text[start].isspace():  # trim_offsets: no leading space
                start += 1
            offsets.append((start, end))
            words.append(word)
        return Pieces(list(out["ids"]), offsets, words)

    def word_pieces(self, words: Sequence[str]) -> Pieces:
        ids, offsets, word_ids = [], [], []
        for k, word in enumerate(words):
            part = self.pieces(word)
            ids += part.ids
            offsets += part.offsets
            word_ids += [k] * len(part.ids)
        return Pieces(ids, offsets, word_ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        specials = {self.token_to_id(t) for t in SPECIALS}
        out, run = [], []
        for index in ids:
            index = int(index)
            if index in specials or index >= self.base_size:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    out.append(self.id_to_token(index) or "")
            else:
                run.append(index)
        if run:
            out.append(self.sp.decode(run))
        return " ".join(s for s in out if s) if not skip_special_tokens else "".join(out)

    def save(self, directory: Path) -> list[Path]:
        path = directory / "spm.model"
        path.write_bytes(self.proto)
        return [path]


# ---------------------------------------------------------------------------------------- the API
class TextTokenizer:
    """RoBERTa-style encoding over a :class:`ByteLevelBPE` or :class:`SentencePiece` backend.

    Build one with :func:`load_tokenizer`. ``source`` says where it came from (error messages).
    """

    def __init__(self, backend: ByteLevelBPE | SentencePiece, *, source: str = ""):
        self.backend = backend
        self.source = source
        ids = {t: backend.token_to_id(t) for t in SPECIALS}
        self.bos_token_id, self.pad_token_id, self.eos_token_id = ids[BOS], ids[PAD], ids[EOS]
        self.unk_token_id, self.mask_token_id = ids[UNK], ids[MASK]
        self.all_special_ids = sorted(set(ids.values()))

    # RoBERTa's names for the same tokens
    @property
    def cls_token_id(self) -> int:
        return self.bos_token_id

    @property
    def sep_token_id(self) -> int:
        return self.eos_token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids (the largest id + 1), the size the model's embedding table needs."""
        return self.backend.vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"TextTokenizer({self.backend.kind}, vocab_size={self.vocab_size}, source={self.source!r})"

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, index: int) -> str | None:
        return self.backend.id_to_token(index)

    # ------------------------------------------------------------------ encoding
    def pieces(self, text: str) -> Pieces:
        """Tokens of ``text`` without special tokens."""
        return self.backend.pieces(text)

    def word_pieces(self, words: Sequence[str]) -> Pieces:
        """Tokens of pre-split ``words`` (``add_prefix_space=True``), word ids = word index."""
        return self.backend.word_pieces(words)

    def assemble(self, first: Pieces, second: Pieces | None = None) -> Encoding:
        """``<s> first </s>`` or ``<s> first </s></s> second </s>``."""
        bos, eos = self.bos_token_id, self.eos_token_id
        ids, offsets = [bos, *first.ids, eos], [(0, 0), *first.offsets, (0, 0)]
        words = [None, *first.word_ids, None]
        seqs = [None, *[0] * len(first.ids), None]
        if second is not None:
            ids += [eos, *second.ids, eos]
            offsets += [(0, 0), *second.offsets, (0, 0)]
            words += [None, *second.word_ids, None]
            seqs += [None, *[1] * len(second.ids), None]
        special = [int(s is None) for s in seqs]
        return Encoding(ids, offsets, words, seqs, special)

    def encode(self, text: str, pair: str | None = None, *, add_special_tokens: bool = True) -> Encoding:
        """Encode a text (or a pair) as RoBERTa does; an empty ``pair`` counts as none (as in
        ``transformers``)."""
        first = self.pieces(text)
        second = self.pieces(pair) if pair else None
        if add_special_tokens:
            return self.assemble(first, second)
        parts = [first] + ([second] if second is not None else [])
        return Encoding(
            [i for p in parts for i in p.ids],
            [o for p in parts for o in p.offsets],
            [w for p in parts for w in p.word_ids],
            [k for k, p in enumerate(parts) for _ in p.ids],
            [0] * sum(len(p.ids) for p in parts),
        )

    def encode_words(self, words: Sequence[str], pair: Sequence[str] | None = None) -> Encoding:
        """Encode pre-split words (``is_split_into_words=True, add_prefix_space=True``)."""
        return self.assemble(self.word_pieces(words), None if pair is None else self.word_pieces(pair))

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids if int(i) != self.pad_token_id or not skip_special_tokens]
        return self.backend.decode(ids, skip_special_tokens)

    # ------------------------------------------------------------------ files
    def save(self, directory: str | os.PathLike) -> list[Path]:
        """Write the tokenizer files into ``directory`` (``tokenizer.json`` + ``vocab.json`` +
        ``merges.txt``, or ``spm.model``) and return their paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        return self.backend.save(directory)


def load_tokenizer(path: str | os.PathLike) -> TextTokenizer:
    """A tokenizer from ``path``: a directory with ``tokenizer.json``, or ``vocab.json`` +
    ``merges.txt``, or a sentencepiece model (``spm.model``, ``sentencepiece.bpe.model``, ...);
    or one of those files itself (a Hugging Face checkpoint directory works as it is)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise SpecError(f"tokenizer '{p}' does not exist; expected {FORMATS}.")
    if p.is_file():
        if p.suffix == ".json" and p.name != "vocab.json":
            return TextTokenizer(ByteLevelBPE.from_json(p), source=str(p))
        if p.name == "vocab.json" and (p.parent / "merges.txt").is_file():
            return TextTokenizer(ByteLevelBPE.from_files(p, p.parent / "merges.txt"), source=str(p.parent))
        if p.suffix == ".model":
            return TextTokenizer(SentencePiece.from_file(p), source=str(p))
        raise SpecError(f"tokenizer '{p}': unknown file type; expected {FORMATS}.")
    if (p / "tokenizer.json").is_file():
        return TextTokenizer(ByteLevelBPE.from_json(p / "tokenizer.json"), source=str(p))
    if (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
        return TextTokenizer(ByteLevelBPE.from_files(p / "vocab.json", p / "merges.txt"), source=str(p))
    for name in SENTENCEPIECE_NAMES:
        if (p / name).is_file():
            return TextTokenizer(SentencePiece.from_file(p / name), source=str(p / name))
    models = sorted(p.glob("*.model"))
    if len(models) == 1:
        return TextTokenizer(SentencePiece.from_file(models[0]), source=str(models[0]))
    present = ", ".join(sorted(c.name for c in p.iterdir())[:12]) or "nothing"
    raise SpecError(f"tokenizer directory '{p}' holds no tokenizer files (it has: {present}); expected {FORMATS}.")


# ---------------------------------------------------------------------------------------- training
def _corpus_files(corpus: str | os.PathLike | Sequence[str | os.PathLike], where: str) -> list[Path]:
    items = [corpus] if isinstance(corpus, (str, os.PathLike)) else list(corpus)
    if not items:
        raise SpecError(f"{where}: no corpus files given.")
    files: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(q for q in path.rglob("*") if q.is_file() and q.suffix in (".txt", ".raw", ".tokens"))
            if not found:
                raise SpecError(f"{where}: directory '{path}' holds no .txt/.raw/.tokens files.")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise SpecError(f"{where}: corpus file '{path}' does not exist.")
    return files


def train_sentencepiece(
    corpus: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    vocab_size: int,
    out: str | os.PathLike,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    max_sentences: int = 10_000_000,
    seed: int = 1,
    overwrite: bool = False,
) -> Path:
    """Train a sentencepiece model on text files with RoBERTa's specials at ids ``<s>`` 0,
    ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, ``<mask>`` 4; byte fallback keeps every string
    encodable. Writes ``out/spm.model`` (+ ``spm.vocab``, ``tokenizer_info.json``) atomically
    (an existing ``out`` is replaced only with ``overwrite``) and returns the directory."""
    import sentencepiece as spm

    where = "tokenizer train"
    files = _corpus_files(corpus, where)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 300:
        raise SpecError(f"{where}: vocab_size must be an integer >= 300 (256 byte pieces + specials), got {vocab_size!r}.")
    if model_type not in ("unigram", "bpe"):
        raise SpecError(f"{where}: model_type must be 'unigram' or 'bpe', got {model_type!r}.")
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            input=[str(f) for f in files],
            model_prefix=str(tmp / "spm"),
            vocab_size=vocab_size,
            model_type=model_type,
            bos_id=0, pad_id=1, eos_id=2, unk_id=3,
            bos_piece=BOS, pad_piece=PAD, eos_piece=EOS, unk_piece=UNK,
            user_defined_symbols=[MASK],
            byte_fallback=True,
            character_coverage=character_coverage,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SpecError(f"{where}: sentencepiece training failed on {len(files)} file(s): {exc}") from None
    (tmp / "tokenizer_info.json").write_text(json.dumps(
        {"trainer": "sentencepiece", "model_type": model_type, "vocab_size": vocab_size,
         "corpus": [str(f) for f in files]}, indent=2) + "\n")
    if out.exists() and overwrite:
        shutil.rmtree(out)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished the same training first: keep its files
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "spm.model").is_file():
            raise SpecError(f"{where}: cannot write '{out}' (it exists and is not a trained tokenizer).") from None
    return out


def train_byte_level_bpe(
    corpus: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    vocab_size: int,
    out: str | os.PathLike,
    min_frequency: int = 2,
) -> Path:
    """Train a RoBERTa-layout byte-level BPE with ``tokenizers``: ``<s> <pad> </s> <unk>`` at
    0-3, the 256 byte symbols, merges, then ``<mask>`` as the last id. Writes ``out/vocab.json``
    and ``out/merges.txt`` (the files published checkpoints ship) and returns ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    files = _corpus_files(corpus, "byte-level BPE training")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=[BOS, PAD, EOS, UNK],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(f) for f in files], trainer)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.model.save(str(out))
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    vocab = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    vocab[MASK] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    return out
