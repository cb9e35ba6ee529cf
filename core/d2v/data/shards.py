"""Corpora as tar shards (the WebDataset layout), read by index so runs stay exact.

Millions of small files strain shared file systems; a few thousand tar shards do not. ``d2v
shards make SPEC OUT`` turns any d2v dataset into shards: each example becomes one WebDataset
sample -- ``<key>.json`` (the example's fields: id, text, label, num_samples, ...) plus, when
the example points at a file (audio, an image), that file's bytes as ``<key>.<ext>`` -- written
by ``webdataset.ShardWriter``, and ``OUT/index.json`` lists the shards, their sample counts and
every example's length.

The ``shards`` dataset reads them back with random access (``wids.IndexedTarSamples``: a
memory-mapped index of each tar), so it is an ordinary map-style dataset: the length-bucketing
sampler, the ``(seed, epoch, index)`` randomness, exact resume and Accelerate's split across
processes work unchanged. The payload reaches the processor as a named in-memory file, which
``soundfile`` and PIL read like a path; examples are identical to the source dataset's, so a run
on shards equals a run on the files.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from d2v.api.errors import BadFile, SpecError

INDEX_NAME = "index.json"
FORMAT = "d2v-shards/1"


class NamedBytes(io.BytesIO):
    """An in-memory file that prints as where it came from (error messages name the sample)."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name

    def __str__(self) -> str:
        return self.name

    __repr__ = __str__


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise SpecError(f"d2v shards make: example field of type {type(value).__name__} cannot be stored as JSON.")


def make_shards(dataset: Any, out: str | Path, *, max_count: int = 1000, source: str = "") -> dict[str, Any]:
    """Write ``dataset`` as shards under ``out``; returns the index (also written to ``index.json``)."""
    import webdataset as wds

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SpecError(f"d2v shards make: '{out}' exists and is not empty; choose a new directory.")
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # ShardWriter announces every shard on stdout
        with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=max_count) as sink:
            for index in range(len(dataset)):
                example = dict(dataset[index])
                sample: dict[str, Any] = {"__key__": f"{index:09d}"}
                path = example.pop("path", None)
                if path is not None:
                    file = Path(path)
                    if not file.is_file():
                        raise SpecError(f"d2v shards make: example '{example.get('id', index)}' names '{path}', "
                                        f"which is not a file.")
                    sample[file.suffix.lstrip(".").lower() or "bin"] = file.read_bytes()
                    example["source_path"] = str(path)
                sample["json"] = json.dumps(_jsonable(example)).encode()
                sink.write(sample)
                name = Path(sink.fname).name
                counts[name] = counts.get(name, 0) + 1
    lengths = getattr(dataset, "lengths", None)
    index = {"format": FORMAT, "source": source, "num_examples": len(dataset),
             "shards": [{"url": name, "nsamples": n} for name, n in counts.items()],
             "lengths": None if lengths is None else [int(n) for n in lengths]}
    (out / INDEX_NAME).write_text(json.dumps(index))
    return index


class ShardedDataset:
    """Examples from shards written by ``d2v shards make`` (registered as dataset ``shards``).

    ``index``: the shard directory (or its ``index.json``). ``open_shards``: how many shards each
    data-loader worker keeps memory-mapped (the least recently used is closed).
    """

    def __init__(self, index: str, max_examples: int | None = None, open_shards: int = 64,
                 on_bad_example: str = "error"):
        path = Path(index).expanduser()
        path = path / INDEX_NAME if path.is_dir() else path
        if not path.is_file():
            raise SpecError(f"shards: '{path}' does not exist; make shards with `d2v shards make SPEC OUT`.")
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise SpecError(f"shards: '{path}' cannot be read: {err}.") from None
        if meta.get("format") != FORMAT:
            raise SpecError(f"shards: '{path}' is not a d2v shard index (format {meta.get('format')!r}, "
                            f"expected {FORMAT!r}).")
        self.root = path.parent
        self.on_bad_example = on_bad_example
        self.skipped: list[tuple[str, str]] = []
        self.shards = [self.root / s["url"] for s in meta["shards"]]
        missing = [str(p) for p in self.shards if not p.is_file()]
        if missing:
            raise SpecError(f"shards: {len(missing)} shard files listed in '{path}' are missing: "
                            f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}.")
        self.ends = np.cumsum([int(s["nsamples"]) for s in meta["shards"]])
        total = int(self.ends[-1]) if len(self.ends) else 0
        self.size = total if max_examples is None else min(total, int(max_examples))
        if meta.get("lengths") is not None:
            self.lengths = [int(n) for n in meta["lengths"][: self.size]]
        self.open_shards = max(1, int(open_shards))
        self._open: OrderedDict[int, Any] = OrderedDict()

    def __len__(self) -> int:
        return self.size

    def __getstate__(self) -> dict[str, Any]:  # workers open their own memory maps
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()
        return state

    def _shard(self, number: int) -> Any:
        from wids.wids import IndexedTarSamples

        if number in self._open:
            self._open.move_to_end(number)
            return self._open[number]
        if len(self._open) >= self.open_shards:
            _, oldest = self._open.popitem(last=False)
            oldest.close()
        try:
            samples = IndexedTarSamples(path=str(self.shards[number]))
        except Exception as err:  # noqa: BLE001 -- a damaged tar: name it
            raise BadFile(f"shards: '{self.shards[number]}' cannot be read: {type(err).__name__}: {err}.") from None
        self._open[number] = samples
        return samples

    def _sample(self, index: int) -> tuple[int, dict[str, Any], dict[str, Any]]:
        """``(shard number, the example's fields, the raw sample)``."""
        if not 0 <= index < self.size:
            raise IndexError(index)
        number = int(np.searchsorted(self.ends, index, side="right"))
        sample = self._shard(number)[index - (int(self.ends[number - 1]) if number else 0)]
        fields = sample.pop(".json")
        return number, json.loads(fields.read() if hasattr(fields, "read") else fields), sample

    def light_example(self, index: int) -> dict[str, Any]:
        """The example's fields without its file (what a look over the whole corpus needs)."""
        return self._sample(index)[1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        number, example, sample = self._sample(index)
        payload = [ext for ext in sample if ext.startswith(".")]
        if payload:
            data = sample[payload[0]]
            data = data.read() if hasattr(data, "read") else bytes(data)
            example["path"] = NamedBytes(data, f"{self.shards[number].name}:{sample['__key__']}{payload[0]}")
        return example
