"""Labelled speech datasets for the audio task heads, in the on-disk layouts of the real corpora.

* :class:`AudioFolder` (``audio_folder``): ``<root>/[<split>/]<label>/*.wav|flac``, the layout of
  keyword-spotting (Speech Commands) and emotion corpora; one class per utterance.
* :class:`AudioSegments` (``audio_segments``): frame labels from segments, either a TSV of
  ``path, start, end, label`` lines or RTTM (diarization: ``SPEAKER <file> 1 <start> <dur> ...``).
* :class:`VoxCeleb` (``voxceleb``): ``<root>/<speaker id>/<video>/<utt>.wav`` plus a trial list;
  speakers of the trial list form the test split, the others the training split.

Examples are light dicts like the other speech datasets (``id``, ``path``, ``num_samples``,
``text``, ``dataset``) plus the task's label fields, which the ``audio`` processor collates:
``label`` (class id), ``segments`` + ``num_labels`` (frame labels), ``speaker``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import soundfile as sf
from torch.utils.data import Dataset

from d2v.api.errors import SpecError

AUDIO_EXTENSIONS = (".wav", ".flac")


def _num_samples(path: Path, where: str) -> int:
    try:
        return int(sf.info(str(path)).frames)
    except (RuntimeError, OSError, ValueError) as err:
        raise SpecError(f"{where}: cannot read the header of audio file '{path}': {err}. Re-download or remove it, or set data.on_bad_example: skip.") from None


def _directory(path: str | Path, where: str, hint: str) -> Path:
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise SpecError(f"{where}: '{directory.absolute()}' is not a directory. {hint}")
    return directory


def _audio_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and not p.name.startswith("."))


def _read_list(path: str | Path, where: str) -> set[str]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise SpecError(f"{where}: file list '{file}' does not exist.")
    return {line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()}


class _LabelledAudio(Dataset):
    """Parallel lists + ``__getitem__`` shared by the datasets below."""

    where = "dataset"

    def _init_lists(self, on_bad_example: str = "error") -> None:
        self.on_bad_example = on_bad_example
        #: ``(id, reason)`` of files whose header cannot be read (``on_bad_example: skip``)
        self.skipped: list[tuple[str, str]] = []
        self.ids: list[str] = []
        self.paths: list[str] = []
        self.lengths: list[int] = []
        self.fields: list[dict[str, Any]] = []

    def _add(self, utt_id: str, path: Path, **fields: Any) -> None:
        try:
            length = _num_samples(path, self.where)
        except SpecError as err:
            if self.on_bad_example != "skip":
                raise
            self.skipped.append((utt_id, str(err)))
            return
        self.ids.append(utt_id)
        self.paths.append(str(path))
        self.lengths.append(length)
        self.fields.append(fields)

    def _limit(self, max_examples: int | None) -> None:
        if max_examples is not None:
            if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
                raise SpecError(f"{self.where}: max_examples must be a positive integer or null, got {max_examples!r}.")
            for name in ("ids", "paths", "lengths", "fields"):
                setattr(self, name, getattr(self, name)[:max_examples])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"id": self.ids[i], "path": self.paths[i], "num_samples": self.lengths[i], "text": "",
                "dataset": self.where, **self.fields[i]}


class AudioFolder(_LabelledAudio):
    """One class per utterance, the class being the audio file's directory::

        <root>/[<split>/]<label>/**/*.wav|flac

    ``labels``: the class list (its order gives the ids). Give it explicitly so that every
    split numbers classes the same way; by default it is the sorted directory names of this
    split (names starting with ``_`` excluded, e.g. Speech Commands' ``_background_noise_``).
    Directories not in ``labels`` are skipped, or mapped to ``unknown_label`` when that is set
    (and listed in ``labels``): Speech Commands' "unknown word" class.
    ``include_list``/``exclude_lists``: text files of paths relative to the split directory
    (Speech Commands' ``validation_list.txt``/``testing_list.txt``) keeping or dropping files.
    """

    def __init__(
        self,
        root: str,
        split: str | None = None,
        labels: list[str] | None = None,
        unknown_label: str | None = None,
        include_list: str | None = None,
        exclude_lists: list[str] | None = None,
        max_examples: int | None = None,
        on_bad_example: str = "error",
    ) -> None:
        self.where = f"audio_folder '{root}'" + (f" split '{split}'" if split else "")
        base = _directory(Path(root) / split if split else root, self.where,
                          "Expected <root>/<split>/<label>/*.wav (e.g. a keyword-spotting or emotion corpus).")
        dirs = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith(("_", ".")))
        self.label_names = [str(x) for x in labels] if labels is not None else dirs
        if not self.label_names:
            raise SpecError(f"{self.where}: no class directories in '{base}'.")
        absent = [name for name in self.label_names if name not in dirs and name != unknown_label]
        if absent:
            raise SpecError(
                f"{self.where}: labels {absent} have no directory in '{base}' (present: {dirs}). In YAML, quote "
                f"words such as \"yes\", \"no\", \"on\", \"off\" (unquoted they are booleans)."
            )
        if unknown_label is not None and unknown_label not in self.label_names:
            raise SpecError(f"{self.where}: unknown_label '{unknown_label}' must be one of labels {self.label_names}.")
        include = _read_list(include_list, self.where) if include_list else None
        exclude: set[str] = set()
        for path in exclude_lists or []:
            exclude |= _read_list(path, self.where)
        index = {name: i for i, name in enumerate(self.label_names)}
        self._init_lists(on_bad_example)
        for directory in dirs:
            label = directory if directory in index else unknown_label
            if label is None:
                continue
            for path in _audio_files(base / directory):
                rel = path.relative_to(base).as_posix()
                if (include is not None and rel not in include) or rel in exclude:
                    continue
                self._add(os.path.splitext(rel)[0], path, label=index[label])
        if not self.ids:
            raise SpecError(f"{self.where}: no .wav/.flac files found under the class directories of '{base}' "
                            f"(classes {self.label_names}).")
        self._limit(max_examples)


class AudioSegments(_LabelledAudio):
    """Frame labels from time segments.

    ``format: tsv`` -- ``manifest`` lines ``path<TAB>start<TAB>end<TAB>label`` (seconds); a line
    with only ``path`` lists a file without any labelled segment. Classes: ``labels`` (their
    order gives the ids), else the sorted labels of the manifest.

    ``format: rttm`` -- diarization: ``SPEAKER <file> <chan> <start> <duration> <NA> <NA>
    <speaker> ...`` lines; audio at ``<audio_dir>/<file>.wav|flac``. Speaker identities do not
    carry across recordings, so within a recording speakers are numbered in order of first
    appearance, up to ``max_speakers`` (the head's ``num_labels``).

    Relative paths resolve against ``root`` (default: the manifest's directory).
    """

    def __init__(
        self,
        manifest: str,
        format: str = "tsv",
        root: str | None = None,
        labels: list[str] | None = None,
        audio_dir: str | None = None,
        max_speakers: int = 2,
        max_examples: int | None = None,
        on_bad_example: str = "error",
    ) -> None:
        file = Path(manifest).expanduser()
        self.where = f"audio_segments '{file}'"
        if not file.is_file():
            raise SpecError(f"{self.where}: the manifest does not exist.")
        if format not in ("tsv", "rttm"):
            raise SpecError(f"{self.where}: format must be 'tsv' or 'rttm', got {format!r}.")
        base = Path(root).expanduser() if root else file.parent
        lines = [(n, line) for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
        segments: dict[str, list[tuple[float, float, str]]] = {}
        if format == "tsv":
            for n, line in lines:
                fields = line.split("\t")
                segments.setdefault(fields[0], [])
                if len(fields) == 1:
                    continue
                if len(fields) != 4:
                    raise SpecError(f"{file}:{n}: expected 'path<TAB>start<TAB>end<TAB>label' or just 'path', got {line!r}.")
                segments[fields[0]].append((self._seconds(fields[1], file, n), self._seconds(fields[2], file, n), fields[3]))
            names = sorted({label for segs in segments.values() for _, _, label in segs})
            self.label_names = [str(x) for x in labels] if labels is not None else names
            unknown = sorted(set(names) - set(self.label_names))
            if unknown:
                raise SpecError(f"{self.where}: labels {unknown} are not in the dataset's labels {self.label_names}.")
            index = {name: i for i, name in enumerate(self.label_names)}
            paths = {rel: base / rel for rel in segments}
            ids = {rel: os.path.splitext(rel)[0] for rel in segments}
        else:
            audio = Path(audio_dir).expanduser() if audio_dir else base
            for n, line in lines:
                fields = line.split()
                if fields[0] != "SPEAKER":
                    continue
                if len(fields) < 8:
                    raise SpecError(f"{file}:{n}: an RTTM SPEAKER line has at least 8 fields, got {line!r}.")
                start, duration = self._seconds(fields[3], file, n), self._seconds(fields[4], file, n)
                segments.setdefault(fields[1], []).append((start, start + duration, fields[7]))
            self.label_names = [f"speaker{i}" for i in range(int(max_speakers))]
            paths, ids = {}, {}
            for rec in segments:
                found = [audio / f"{rec}{ext}" for ext in AUDIO_EXTENSIONS if (audio / f"{rec}{ext}").is_file()]
                if not found:
                    raise SpecError(f"{self.where}: no audio for recording '{rec}' (looked for {audio / rec}.wav|.flac); "
                                    f"set audio_dir.")
                paths[rec], ids[rec] = found[0], rec
        self.num_labels = len(self.label_names)
        self._init_lists(on_bad_example)
        for key in sorted(segments):
            if not paths[key].is_file():
                raise SpecError(f"{self.where}: audio file '{paths[key]}' does not exist; relative paths resolve "
                                f"against '{base}' (set root).")
            if format == "tsv":
                numbered = [(s, e, index[label]) for s, e, label in segments[key]]
            else:
                numbered = self._number_speakers(segments[key], key)
            self._add(ids[key], paths[key], segments=numbered, num_labels=self.num_labels)
        if not self.ids:
            raise SpecError(f"{self.where}: the manifest lists no recordings.")
        self._limit(max_examples)

    @staticmethod
    def _seconds(text: str, file: Path, n: int) -> float:
        try:
            value = float(text)
        except ValueError:
            raise SpecError(f"{file}:{n}: {text!r} is not a time in seconds.") from None
        if value < 0:
            raise SpecError(f"{file}:{n}: negative time {value}.")
        return value

    def _number_speakers(self, segments: Iterable[tuple[float, float, str]], rec: str) -> list[tuple[float, float, int]]:
        order: dict[str, int] = {}
        out = []
        for start, end, speaker in sorted(segments):
            k = order.setdefault(speaker, len(order))
            if k >= self.num_labels:
                raise SpecError(f"{self.where}: recording '{rec}' has more than max_speakers={self.num_labels} speakers; "
                                f"raise max_speakers (and the head's num_labels).")
            out.append((start, end, k))
        return out


class VoxCeleb(_LabelledAudio):
    """VoxCeleb's layout ``<root>/<speaker id>/<video id>/<utt>.wav`` (``vox1_dev_wav`` and
    ``vox1_test_wav`` both extract to ``wav/``; pass that directory as ``root``).

    Utterance ids are the paths relative to ``root`` (``id10270/x6uYqmx31kE/00001.wav``), the
    names trial lists use. ``split``: ``train`` (speakers absent from ``trials``), ``test`` (the
    utterances the trial list names) or ``all``. ``label`` is the speaker's index among the
    split's sorted speakers (the x-vector head's training classes; not given for ``test``,
    whose speakers are unseen); ``speaker`` its name.
    """

    def __init__(
        self,
        root: str,
        split: str = "all",
        trials: str | None = None,
        max_examples: int | None = None,
        on_bad_example: str = "error",
    ) -> None:
        self.where = f"voxceleb '{root}' split '{split}'"
        base = _directory(root, self.where, "Expected <root>/<speaker id>/<video id>/*.wav (VoxCeleb1's wav/ directory).")
        if split not in ("train", "test", "all"):
            raise SpecError(f"{self.where}: split must be train, test or all, got {split!r}.")
        if split != "all" and not trials:
            raise SpecError(f"{self.where}: split '{split}' is defined by a trial list; set trials (e.g. veri_test2.txt).")
        in_trials: set[str] = set()
        if trials:
            trial_file = Path(trials).expanduser()
            lines = trial_file.read_text(encoding="utf-8").splitlines() if trial_file.is_file() else []
            in_trials = {name for line in lines if len(line.split()) == 3 for name in line.split()[1:]}
            if not in_trials:
                raise SpecError(f"{self.where}: trial list '{trials}' is missing or has no '<1|0> <enroll> <test>' lines.")
        test_speakers = {u.split("/")[0] for u in in_trials}
        chosen = []
        for path in _audio_files(base):
            rel = path.relative_to(base).as_posix()
            speaker = rel.split("/")[0]
            if split == "test" and rel not in in_trials:
                continue
            if split == "train" and speaker in test_speakers:
                continue
            chosen.append((rel, speaker, path))
        if split == "test":
            missing = sorted(in_trials - {rel for rel, _, _ in chosen})
            if missing:
                raise SpecError(f"{self.where}: {len(missing)} trial utterance(s) are not under '{base}', e.g. "
                                f"{', '.join(missing[:3])}.")
        self.label_names = sorted({speaker for _, speaker, _ in chosen})
        if not self.label_names:
            raise SpecError(f"{self.where}: no utterances found under '{base}'.")
        index = {name: i for i, name in enumerate(self.label_names)}
        self._init_lists(on_bad_example)
        for rel, speaker, path in chosen:
            # test speakers are unseen in training: no class id, only the name for trial pairing
            label = {} if split == "test" else {"label": index[speaker]}
            self._add(rel, path, speaker=speaker, **label)
        self._limit(max_examples)
