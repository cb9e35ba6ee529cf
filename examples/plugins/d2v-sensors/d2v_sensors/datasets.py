"""Sensor datasets: a deterministic synthetic activity corpus, and recordings in class folders.

* :class:`SyntheticActivities` (``sensor_synthetic``): recordings made at indexing time from
  ``(seed, split, index)`` by :func:`d2v_sensors.signals.synthesize`; nothing on disk, the same
  corpus on every machine. Labels are interleaved (example ``i`` has class ``i % K``), so any
  prefix is balanced: ``num_examples: 48`` is 8 labelled recordings per class.
* :class:`SensorFolder` (``sensor_folder``): your own data, ``<root>/[<split>/]<label>/*.npy|*.csv``
  (one recording per file, see :mod:`d2v_sensors.recordings`).

Examples are light dicts: ``id``, ``label`` (class id), ``num_samples`` and either ``signal``
(synthetic) or ``path`` (files); the ``sensors`` processor loads them.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from d2v.api.errors import SpecError
from d2v_sensors.recordings import EXTENSIONS, count_samples
from d2v_sensors.signals import ACTIVITIES, SAMPLE_RATE, synthesize


def _positive_int(value: Any, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(f"{where}: {name} must be a positive integer, got {value!r}.")
    return value


class SyntheticActivities(Dataset):
    """``num_examples`` synthetic 3-axis accelerometer recordings of ``activities``.

    ``split`` and ``seed`` pick the corpus (different splits never share a recording); each
    recording lasts ``min_seconds`` to ``max_seconds`` at ``sample_rate`` Hz.
    """

    def __init__(self, *, split: str = "train", num_examples: int = 600, seed: int = 0,
                 activities: list[str] | None = None, min_seconds: float = 4.0, max_seconds: float = 8.0,
                 sample_rate: float = SAMPLE_RATE) -> None:
        self.where = f"sensor_synthetic split '{split}'"
        _positive_int(num_examples, "num_examples", self.where)
        self.label_names = list(activities) if activities is not None else list(ACTIVITIES)
        unknown = [a for a in self.label_names if a not in ACTIVITIES]
        if unknown or not self.label_names or len(set(self.label_names)) != len(self.label_names):
            raise SpecError(f"{self.where}: activities must be distinct names among {list(ACTIVITIES)}, "
                            f"got {activities!r}.")
        if not 0 < min_seconds <= max_seconds:
            raise SpecError(f"{self.where}: need 0 < min_seconds <= max_seconds, got {min_seconds} and {max_seconds}.")
        self.split, self.seed, self.sample_rate = str(split), int(seed), float(sample_rate)
        self._split_key = zlib.crc32(self.split.encode())
        lengths = np.random.default_rng([self.seed, self._split_key]).uniform(min_seconds, max_seconds, num_examples)
        self.lengths = [int(round(s * self.sample_rate)) for s in lengths]

    def __len__(self) -> int:
        return len(self.lengths)

    def light_example(self, i: int) -> dict[str, Any]:
        label = i % len(self.label_names)
        return {"id": f"{self.split}-{i:05d}-{self.label_names[label]}", "label": label,
                "num_samples": self.lengths[i], "dataset": self.where}

    def __getitem__(self, i: int) -> dict[str, Any]:
        example = self.light_example(i)
        rng = np.random.default_rng([self.seed, self._split_key, i])
        example["signal"] = synthesize(self.label_names[example["label"]], self.lengths[i], rng,
                                       sample_rate=self.sample_rate)
        return example


class SensorFolder(Dataset):
    """One class per recording, the class being the file's directory::

        <root>/[<split>/]<label>/**/*.npy|*.csv

    ``labels``: the class list (its order gives the ids); give it so every split numbers classes
    the same way. By default it is the sorted directory names. ``max_per_class`` keeps the first
    recordings (sorted by path) of each class: a balanced few-label subset.
    """

    def __init__(self, *, root: str, split: str | None = None, labels: list[str] | None = None,
                 max_per_class: int | None = None, on_bad_example: str = "error") -> None:
        self.where = f"sensor_folder '{root}'" + (f" split '{split}'" if split else "")
        base = Path(root).expanduser() / (split or "")
        if not base.is_dir():
            raise SpecError(f"{self.where}: '{base.absolute()}' is not a directory. Expected "
                            f"<root>/<split>/<label>/*.npy or *.csv (write a demo corpus with `d2v sensors synth`).")
        dirs = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith((".", "_")))
        self.label_names = [str(x) for x in labels] if labels is not None else dirs
        missing = [name for name in self.label_names if name not in dirs]
        if missing or not self.label_names:
            raise SpecError(f"{self.where}: labels {missing or self.label_names} have no directory in '{base}' "
                            f"(present: {dirs}).")
        if max_per_class is not None:
            _positive_int(max_per_class, "max_per_class", self.where)
        #: ``(id, reason)`` of files left out (``on_bad_example: skip``)
        self.skipped: list[tuple[str, str]] = []
        self.examples: list[dict[str, Any]] = []
        self.lengths: list[int] = []
        for label, name in enumerate(self.label_names):
            files = sorted(p for p in (base / name).rglob("*") if p.suffix.lower() in EXTENSIONS and not p.name.startswith("."))
            kept = 0
            for path in files:
                if max_per_class is not None and kept >= max_per_class:
                    break
                example_id = str(path.relative_to(base).with_suffix(""))
                try:
                    length = count_samples(path)
                except SpecError as err:
                    if on_bad_example != "skip":
                        raise SpecError(f"{self.where}: {err} Fix or remove it, or set data.on_bad_example: skip.") from None
                    self.skipped.append((example_id, str(err)))
                    continue
                self.examples.append({"id": example_id, "path": str(path), "label": label, "num_samples": length,
                                      "dataset": self.where})
                self.lengths.append(length)
                kept += 1
        if not self.examples:
            raise SpecError(f"{self.where}: no {' or '.join(EXTENSIONS)} recordings under '{base}'.")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return dict(self.examples[i])
