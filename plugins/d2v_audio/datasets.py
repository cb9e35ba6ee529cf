"""Speech datasets: LibriSpeech's on-disk layout and a generic TSV manifest.

Both return *light* examples: ``__getitem__(i)`` is a dict describing utterance ``i``
without reading any audio::

    {"id": str, "path": str, "num_samples": int, "text": str, "dataset": str}

``num_samples`` is the number of frames stored in the file (at the file's own sample rate),
``text`` the transcript (``""`` when there is none) and ``dataset`` a short description of
where the example came from, used in error messages by the processor that loads the audio.
``lengths`` (``list[int]``, the ``num_samples`` of every example) serves length bucketing.
The audio itself is read by the ``audio`` processor (:mod:`d2v_audio.processor`) in the
data-loader workers.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import soundfile as sf
from torch.utils.data import Dataset

from d2v.api.errors import SpecError

OPENSLR_HINT = (
    "LibriSpeech is available from https://www.openslr.org/12 (download and extract e.g. "
    "train-clean-100.tar.gz so that <root>/train-clean-100/ exists)"
)

# Splits with at least this many audio files get their index cached (see LibriSpeech).
CACHE_MIN_FILES = 1000
_INDEX_VERSION = "d2v-librispeech-index-v1"


def _natural_key(text: str) -> list[Any]:
    """'103-1240-0000' sorts numerically by speaker, chapter, utterance."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def _check_max_examples(max_examples: Any, where: str) -> int | None:
    if max_examples is None:
        return None
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
        raise SpecError(f"{where}: max_examples must be a positive integer or null, got {max_examples!r}.")
    return max_examples


def _problem_list(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def cache_dir() -> Path:
    """d2v's user cache directory: ``$D2V_CACHE_DIR``, else ``$XDG_CACHE_HOME/d2v``, else
    ``~/.cache/d2v``."""
    if os.environ.get("D2V_CACHE_DIR"):
        return Path(os.environ["D2V_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "d2v"
    return Path.home() / ".cache" / "d2v"


class _SplitIndex:
    """Parallel lists describing the utterances of one LibriSpeech split, in natural id order."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.paths: list[str] = []
        self.lengths: list[int] = []
        self.texts: list[str] = []


class LibriSpeech(Dataset):
    """LibriSpeech in its distributed layout (https://www.openslr.org/12)::

        <root>/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac
        <root>/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt   (lines "ID TRANSCRIPT")

    ``root`` is the ``LibriSpeech`` directory the tarballs extract to; ``splits`` one split
    name or a list of them (``train-clean-100``, ``dev-other``, ...). Examples are ordered by
    split (in the order given), then by speaker, chapter and utterance number; with
    ``max_examples`` only the first that many are kept.

    The index (ids, paths, transcripts and the number of samples of every file, read from the
    file headers with ``soundfile.info``) is built when the dataset is created. For large
    splits that takes a while (LibriSpeech 960 h has 281k files), so the sample counts of a
    split with at least ``CACHE_MIN_FILES`` files are cached in a TSV under the user cache
    directory (``$D2V_CACHE_DIR``, else ``$XDG_CACHE_HOME/d2v``, else ``~/.cache/d2v``; in
    ``librispeech-index/``), keyed by the split's absolute path. The cache never goes stale:
    a file is re-read when its size or modification time changed, and only files still on
    disk are used. ``cache_index=True``/``False`` forces caching on/off; an unwritable cache
    directory just means no cache.

    Every audio file must have a transcript line and every transcript line an audio file;
    otherwise (e.g. an interrupted extraction) the dataset refuses to build and the error
    names the first offending ids, so nothing is silently dropped.
    """

    def __init__(
        self,
        root: str,
        splits: list[str] | str,
        max_examples: int | None = None,
        *,
        cache_index: bool | None = None,
        on_bad_example: str = "error",
    ) -> None:
        self.root = Path(root).expanduser()
        self.on_bad_example = on_bad_example
        #: ``(id, reason)`` of audio files whose header cannot be read (``on_bad_example: skip``)
        self.skipped: list[tuple[str, str]] = []
        if isinstance(splits, str):
            splits = [splits]
        if (
            not isinstance(splits, (list, tuple))
            or not splits
            or not all(isinstance(s, str) and s and "/" not in s for s in splits)
        ):
            raise SpecError(
                f"librispeech: splits must be a split name or a non-empty list of split names "
                f"(e.g. [train-clean-100, train-clean-360]), got {splits!r}."
            )
        self.splits = list(splits)
        self.max_examples = _check_max_examples(max_examples, "librispeech")
        if cache_index is not None and not isinstance(cache_index, bool):
            raise SpecError(f"librispeech: cache_index must be true, false or null, got {cache_index!r}.")
        self.cache_index = cache_index
        self._check_layout()

        self.ids: list[str] = []
        self.paths: list[str] = []
        self.lengths: list[int] = []
        self.texts: list[str] = []
        self._split_of: list[int] = []
        for k, split in enumerate(self.splits):
            index = self._index_split(split)
            self.ids += index.ids
            self.paths += index.paths
            self.lengths += index.lengths
            self.texts += index.texts
            self._split_of += [k] * len(index.ids)
        if self.max_examples is not None:
            for name in ("ids", "paths", "lengths", "texts", "_split_of"):
                setattr(self, name, getattr(self, name)[: self.max_examples])

    # ------------------------------------------------------------------ Dataset API
    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "id": self.ids[i],
            "path": self.paths[i],
            "num_samples": self.lengths[i],
            "text": self.texts[i],
            "dataset": self._describe(self.splits[self._split_of[i]]),
        }

    def __repr__(self) -> str:
        return f"LibriSpeech(root={str(self.root)!r}, splits={self.splits!r}, examples={len(self)})"

    # ------------------------------------------------------------------ internals
    def _describe(self, split: str) -> str:
        return f"librispeech split '{split}' at {self.root}"

    def _check_layout(self) -> None:
        root = self.root.resolve() if self.root.exists() else self.root.absolute()
        if not root.is_dir():
            what = "is not a directory" if root.exists() else "does not exist"
            raise SpecError(f"librispeech: root '{root}' {what}. {OPENSLR_HINT}.")
        present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        for split in self.splits:
            if (root / split).is_dir():
                continue
            hint = ""
            if (root / "LibriSpeech" / split).is_dir():
                hint = f" It exists under '{root / 'LibriSpeech'}': set root to that directory."
            else:
                close = difflib.get_close_matches(split, present, n=1, cutoff=0.6)
                if close:
                    hint = f" Did you mean '{close[0]}'?"
            listing = ", ".join(present) if present else "none"
            raise SpecError(
                f"librispeech: split '{split}' not found: looked for directory '{root / split}'. "
                f"Splits present in '{root}': {listing}.{hint} {OPENSLR_HINT}."
            )

    def _scan(self, split_dir: Path) -> tuple[dict[str, tuple[str, int, int]], dict[str, str], list[Path]]:
        """Walk <split>/<speaker>/<chapter>/: audio files (id -> (relpath, size, mtime_ns)),
        transcripts (id -> text) and the transcript files read."""
        audio: dict[str, tuple[str, int, int]] = {}
        texts: dict[str, str] = {}
        trans_files: list[Path] = []
        for speaker in os.scandir(split_dir):
            if not speaker.is_dir() or speaker.name.startswith("."):
                continue
            for chapter in os.scandir(speaker.path):
                if not chapter.is_dir() or chapter.name.startswith("."):
                    continue
                for entry in os.scandir(chapter.path):
                    name = entry.name
                    if name.endswith(".flac") and not name.startswith("."):
                        st = entry.stat()
                        rel = f"{speaker.name}/{chapter.name}/{name}"
                        audio[name[: -len(".flac")]] = (rel, st.st_size, st.st_mtime_ns)
                    elif name.endswith(".trans.txt"):
                        trans_files.append(Path(entry.path))
        for path in trans_files:
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as err:
                raise SpecError(f"librispeech: cannot read transcript file '{path}': {err}.") from None
            for line in lines:
                line = line.strip()
                if line:
                    utt_id, _, text = line.partition(" ")
                    texts[utt_id] = text.strip()
        return audio, texts, trans_files

    def _cache_file(self, split_dir: Path) -> Path:
        digest = hashlib.sha1(str(split_dir).encode()).hexdigest()[:16]
        return cache_dir() / "librispeech-index" / f"{split_dir.name}-{digest}.tsv"

    @staticmethod
    def _read_cache(path: Path, split_dir: Path) -> dict[str, tuple[int, int, int]]:
        """relpath -> (size, mtime_ns, num_samples); empty when absent or unusable."""
        try:
            with open(path, encoding="utf-8") as f:
                header = f.readline().rstrip("\n").split("\t")
                if header != [_INDEX_VERSION, str(split_dir)]:
                    return {}
                cached = {}
                for line in f:
                    rel, size, mtime, frames = line.rstrip("\n").split("\t")
                    cached[rel] = (int(size), int(mtime), int(frames))
                return cached
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _write_cache(path: Path, split_dir: Path, rows: list[tuple[str, int, int, int]]) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(f"{_INDEX_VERSION}\t{split_dir}\n")
                    for rel, size, mtime, frames in rows:
                        f.write(f"{rel}\t{size}\t{mtime}\t{frames}\n")
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError:
            pass  # a cache is an optimisation: no cache directory, no cache

    def _index_split(self, split: str) -> _SplitIndex:
        split_dir = (self.root / split).resolve()
        audio, texts, trans_files = self._scan(split_dir)
        where = self._describe(split)
        if not audio:
            raise SpecError(
                f"librispeech: no .flac files found in '{split_dir}' (expected "
                f"<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac). Is the extraction complete? "
                f"{OPENSLR_HINT}."
            )
        no_text = sorted((i for i in audio if i not in texts), key=_natural_key)
        if no_text:
            raise SpecError(
                f"{where}: {len(no_text)} audio file(s) have no transcript line in any "
                f"<speaker>-<chapter>.trans.txt: {_problem_list(no_text)}. Re-extract the split "
                f"(or remove those files)."
            )
        no_audio = sorted((i for i in texts if i not in audio), key=_natural_key)
        if no_audio:
            raise SpecError(
                f"{where}: {len(no_audio)} transcript line(s) have no .flac file next to their "
                f"transcript: {_problem_list(no_audio)}. The extraction looks incomplete: re-extract "
                f"the split."
            )

        use_cache = self.cache_index if self.cache_index is not None else len(audio) >= CACHE_MIN_FILES
        cached = self._read_cache(self._cache_file(split_dir), split_dir) if use_cache else {}
        index = _SplitIndex()
        rows: list[tuple[str, int, int, int]] = []
        misses = 0
        for utt_id in sorted(audio, key=_natural_key):
            rel, size, mtime = audio[utt_id]
            path = split_dir / rel
            hit = cached.get(rel)
            if hit is not None and hit[0] == size and hit[1] == mtime:
                frames = hit[2]
            else:
                misses += 1
                try:
                    frames = sf.info(str(path)).frames
                except (RuntimeError, OSError, ValueError) as err:
                    if self.on_bad_example == "skip":
                        self.skipped.append((utt_id, f"cannot read the header of '{path}': {err}"))
                        continue
                    raise SpecError(
                        f"{where}: cannot read the header of audio file '{path}': {err}. "
                        f"Re-download or remove the file, or set data.on_bad_example: skip."
                    ) from None
            rows.append((rel, size, mtime, frames))
            index.ids.append(utt_id)
            index.paths.append(str(path))
            index.lengths.append(int(frames))
            index.texts.append(texts[utt_id])
        if use_cache and (misses or len(cached) != len(rows)):
            self._write_cache(self._cache_file(split_dir), split_dir, rows)
        return index


class AudioManifest(Dataset):
    """A speech corpus listed in a TSV manifest, one utterance per line::

        path<TAB>n_samples[<TAB>transcript]

    ``n_samples`` is the number of frames in the file; the transcript is optional (``""`` when
    absent, e.g. for unlabeled pretraining data). Two flavours are accepted:

    * plain: every line is an utterance;
    * fairseq (``wav2vec_manifest.py``): the first line is a root directory (a line without
      any TAB) and the following lines are ``relative/path<TAB>n_samples``.

    Relative audio paths are resolved against, in order of precedence: the ``root`` argument,
    the manifest's root line, the directory containing the manifest. (A relative root line is
    itself resolved against the manifest's directory.) Examples keep the manifest's order; an
    example's id is its path as written, without the extension. Blank lines are ignored. With
    ``max_examples`` only the first that many utterances are kept. All listed files must
    exist (checked when the dataset is built).
    """

    def __init__(self, path: str, root: str | None = None, max_examples: int | None = None) -> None:
        self.path = Path(path).expanduser()
        self.max_examples = _check_max_examples(max_examples, "audio_manifest")
        manifest = self.path.resolve() if self.path.exists() else self.path.absolute()
        fmt = "lines 'path<TAB>n_samples[<TAB>transcript]', optionally preceded by a root-directory line"
        if not manifest.is_file():
            raise SpecError(f"audio_manifest: manifest file '{manifest}' does not exist. Expected a TSV of {fmt}.")
        self._where = f"audio_manifest '{manifest}'"
        try:
            lines = manifest.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise SpecError(f"{self._where}: cannot read the manifest: {err}.") from None

        numbered = [(n, line.rstrip("\r")) for n, line in enumerate(lines, start=1) if line.strip()]
        base = manifest.parent
        if numbered and "\t" not in numbered[0][1]:
            n, line = numbered.pop(0)
            base = (manifest.parent / line.strip()).resolve()
            if not base.is_dir() and root is None:
                raise SpecError(
                    f"{self._where}, line {n}: '{line.strip()}' has no TAB, so it is read as the "
                    f"fairseq-style root directory, but '{base}' is not a directory. Fix the line, "
                    f"or pass root=... to the dataset, or use {fmt}."
                )
        if root is not None:
            base = Path(root).expanduser().resolve()
            if not base.is_dir():
                raise SpecError(f"audio_manifest: root '{base}' is not a directory.")
        self.root = base

        self.ids: list[str] = []
        self.paths: list[str] = []
        self.lengths: list[int] = []
        self.texts: list[str] = []
        for n, line in numbered:
            fields = line.split("\t", 2)
            if len(fields) < 2:
                raise SpecError(f"{self._where}, line {n}: {line!r} has no TAB; expected {fmt}.")
            rel, frames = fields[0].strip(), fields[1].strip()
            try:
                num_samples = int(frames)
                if num_samples < 0:
                    raise ValueError
            except ValueError:
                raise SpecError(
                    f"{self._where}, line {n}: n_samples {frames!r} is not a non-negative integer; "
                    f"expected {fmt}."
                ) from None
            if not rel:
                raise SpecError(f"{self._where}, line {n}: empty audio path; expected {fmt}.")
            self.ids.append(os.path.splitext(rel)[0])
            self.paths.append(str(base / rel))
            self.lengths.append(num_samples)
            self.texts.append(fields[2].strip() if len(fields) > 2 else "")
            if self.max_examples is not None and len(self.ids) == self.max_examples:
                break
        if not self.ids:
            raise SpecError(f"{self._where}: the manifest lists no utterances; expected {fmt}.")
        missing = [p for p in self.paths if not os.path.isfile(p)]
        if missing:
            raise SpecError(
                f"{self._where}: {len(missing)} listed audio file(s) do not exist: "
                f"{_problem_list(missing)}. Relative paths are resolved against '{base}'; pass "
                f"root=... if the audio lives elsewhere."
            )

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "id": self.ids[i],
            "path": self.paths[i],
            "num_samples": self.lengths[i],
            "text": self.texts[i],
            "dataset": self._where,
        }

    def __repr__(self) -> str:
        return f"AudioManifest(path={str(self.path)!r}, root={str(self.root)!r}, examples={len(self)})"
