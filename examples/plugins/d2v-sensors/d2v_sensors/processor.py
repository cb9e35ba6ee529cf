"""The sensor processor: light examples -> normalised, cropped, padded ``(B, time, channels)`` batches.

:meth:`SensorProcessor.load` runs in the data-loader workers, one recording at a time: it takes
the example's ``signal`` (synthetic datasets) or reads its ``path`` (``.npy``/``.csv``), checks the
channel count, crops long training recordings and normalises. :meth:`SensorProcessor.collate`
pads with zeros (the normalised mean) and builds the padding mask, True at padding, like every
d2v processor; a ``label`` on every example becomes ``labels`` ``(B,)``, which the built-in
classification heads read.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from d2v.api.errors import SpecError
from d2v_sensors.recordings import read_recording

NORMALIZATIONS = ("recording", "channel", "none")
CROPS = ("random", "start", "none")
EPS = 1e-6


def _positive(value: Any, name: str, *, allow_zero: bool = False, number: type = int) -> Any:
    ok = isinstance(value, (int, float) if number is float else int) and not isinstance(value, bool)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise SpecError(f"sensors processor: {name} must be a {'non-negative' if allow_zero else 'positive'} "
                        f"{'number' if number is float else 'integer'}, got {value!r}.")
    return number(value)


def normalize(signal: np.ndarray, mode: str) -> np.ndarray:
    """Remove each channel's mean (gravity, sensor offsets), then divide by one standard
    deviation for the whole recording (``"recording"``: keeps how much each axis moves relative
    to the others) or by each channel's own (``"channel"``); ``"none"`` leaves it as it is."""
    if mode == "none":
        return signal.astype(np.float32)
    x = signal.astype(np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    scale = x.std() if mode == "recording" else x.std(axis=0, keepdims=True)
    return (x / (scale + EPS)).astype(np.float32)


class SensorProcessor:
    """Loading, cropping, normalisation and batching of multichannel sensor recordings.

    Args:
        channels: how many channels every recording must have (3 for an accelerometer).
        sample_rate: samples per second, so ``data.loader.max_batch_seconds`` works.
        normalize: ``"recording"`` (default), ``"channel"`` or ``"none"`` (see :func:`normalize`).
        max_samples: longest training recording; longer ones are cropped (``crop``). Evaluation
            always sees whole recordings.
        min_samples: shorter training recordings are dropped.
        crop: ``"random"`` window (pretraining), ``"start"``, or ``"none"`` (drop long ones instead).
    """

    def __init__(self, *, channels: int = 3, sample_rate: float = 50.0, normalize: str = "recording",
                 max_samples: int | None = None, min_samples: int = 0, crop: str = "random") -> None:
        self.channels = _positive(channels, "channels")
        self.sample_rate = _positive(sample_rate, "sample_rate", number=float)
        if normalize not in NORMALIZATIONS:
            raise SpecError(f"sensors processor: normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}.")
        self.normalize = normalize
        self.max_samples = None if max_samples is None else _positive(max_samples, "max_samples")
        self.min_samples = _positive(min_samples, "min_samples", allow_zero=True)
        if crop not in CROPS:
            raise SpecError(f"sensors processor: crop must be one of {', '.join(CROPS)}, got {crop!r}.")
        self.crop = crop
        if self.max_samples is not None and self.min_samples > self.max_samples:
            raise SpecError(f"sensors processor: min_samples ({self.min_samples}) is larger than max_samples "
                            f"({self.max_samples}), so every recording would be dropped.")

    def __repr__(self) -> str:
        return (f"SensorProcessor(channels={self.channels}, sample_rate={self.sample_rate}, normalize={self.normalize!r}, "
                f"max_samples={self.max_samples}, min_samples={self.min_samples}, crop={self.crop!r})")

    # ------------------------------------------------------------------ lengths (read by the runner)
    @property
    def length_per_second(self) -> float:
        return self.sample_rate

    def clip_length(self, num_samples: int, *, train: bool) -> int:
        """The length a recording has once loaded, so batches are sized by what they hold."""
        if train and self.max_samples is not None and self.crop != "none":
            return min(int(num_samples), self.max_samples)
        return int(num_samples)

    def filter_length(self, num_samples: int) -> bool:
        """Keep a training recording: at least ``min_samples``, and at most ``max_samples`` when not cropping."""
        if num_samples < self.min_samples:
            return False
        return not (self.crop == "none" and self.max_samples is not None and num_samples > self.max_samples)

    # ------------------------------------------------------------------ one example
    def read(self, example: dict[str, Any]) -> np.ndarray:
        """The raw recording ``(time, channels)``: the example's ``signal``, else its file."""
        signal = example.get("signal")
        data = np.asarray(signal, dtype=np.float32) if signal is not None else read_recording(example["path"])
        if data.ndim != 2 or data.shape[1] != self.channels:
            where = example.get("path") or f"example '{example.get('id', '?')}'"
            raise SpecError(f"sensor recording {where} has shape {tuple(data.shape)} but the processor expects "
                            f"(time, {self.channels}); set data.processor.channels to the recordings' channel count.")
        return data

    def load(self, example: dict[str, Any], *, train: bool, rng: np.random.Generator | None = None) -> dict[str, Any]:
        """``example`` with ``signal`` replaced by the normalised float32 tensor ``(time, channels)``."""
        data = self.read(example)
        if train and self.max_samples is not None and self.crop != "none" and len(data) > self.max_samples:
            excess = len(data) - self.max_samples
            start = int((rng or np.random.default_rng()).integers(0, excess + 1)) if self.crop == "random" else 0
            data = data[start:start + self.max_samples]
        loaded = dict(example)
        loaded["signal"] = torch.from_numpy(normalize(data, self.normalize))
        return loaded

    # ------------------------------------------------------------------ batching
    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """``inputs`` ``(B, S, C)`` zero-padded, ``padding_mask`` ``(B, S)`` True at padding,
        ``lengths``, ``ids``, and ``labels`` ``(B,)`` when every example has a ``label``."""
        if not examples:
            raise ValueError("SensorProcessor.collate needs at least one example")
        lengths = torch.tensor([ex["signal"].shape[0] for ex in examples], dtype=torch.long)
        inputs = torch.zeros(len(examples), int(lengths.max()), self.channels, dtype=torch.float32)
        for row, ex in zip(inputs, examples):
            row[: ex["signal"].shape[0]] = ex["signal"]
        batch = {
            "inputs": inputs,
            "padding_mask": torch.arange(inputs.shape[1])[None, :] >= lengths[:, None],
            "lengths": lengths,
            "ids": [str(ex.get("id", "")) for ex in examples],
        }
        if all("label" in ex for ex in examples):
            batch["labels"] = torch.tensor([int(ex["label"]) for ex in examples], dtype=torch.long)
        return batch
