"""The speech processor: turns light dataset examples into normalised, padded waveform batches.

Two halves, matching where they run:

* :meth:`AudioProcessor.load` runs in the data-loader workers, one example at a time: it
  reads the audio with soundfile, mixes it down to mono, resamples it, crops it (training
  only) and normalises it to zero mean and unit variance, exactly like Hugging Face's
  ``Wav2Vec2FeatureExtractor(do_normalize=True)``.
* :meth:`AudioProcessor.collate` pads a list of loaded examples to the longest one (with
  zeros, as HF does after normalising) and builds the padding mask. Labels that task datasets
  attach to examples travel along: ``label`` (a class id) becomes ``labels`` ``(B,)``,
  ``segments`` (seconds, class id) become frame labels ``labels`` ``(B, F, num_labels)`` at the
  model's frame rate (see :mod:`d2v_audio.frame_labels`), ``speaker`` becomes ``speakers``.
"""

from __future__ import annotations

import os

from typing import Any

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

from d2v.api.errors import BadFile, SpecError, positive_int
from d2v_audio.frame_labels import pad_frame_labels, segments_to_frames, shift_segments

CROPS = ("random", "start", "none")
NORM_EPS = 1e-7  # added to the variance, as in Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm


def normalize_waveform(waveform: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance over the whole (unpadded) utterance: ``(x - mean) /
    sqrt(var + 1e-7)`` with the population variance, computed in float64, returned as float32."""
    x = waveform.to(torch.float64)
    mean = x.mean()
    var = ((x - mean) ** 2).mean()
    return ((x - mean) / torch.sqrt(var + NORM_EPS)).to(torch.float32)


def _check_exists(path: Any, where: str) -> None:
    """libsndfile says only 'System error.' for a missing file: say what is wrong (a file-like
    object, as shards hand over, is not a path and is left to the decoder)."""
    if isinstance(path, (str, os.PathLike)) and not os.path.exists(path):
        raise BadFile(f"audio file '{path}'{where} does not exist (looked at {os.path.abspath(path)}).")

class AudioProcessor:
    """Waveform loading, resampling, cropping, normalisation and batching for speech models.

    Args:
        sample_rate: the rate the model expects; files at another rate are resampled with
            ``torchaudio.functional.resample``.
        normalize: zero-mean/unit-variance normalisation per utterance (data2vec-audio and
            wav2vec 2.0 Large/LV-60 models expect it; the original wav2vec 2.0 Base does not).
        max_samples: longest training waveform (at ``sample_rate``). What happens to longer
            ones depends on ``crop``. Never applied in evaluation (``train=False``).
        min_samples: examples shorter than this are dropped by :meth:`filter_length`.
        crop: how training examples longer than ``max_samples`` are shortened: ``"random"``
            (a random window, the self-supervised pretraining recipe), ``"start"`` (the first
            ``max_samples``), or ``"none"`` (never crop; :meth:`filter_length` drops them
            instead). Cropping cuts the audio but not the transcript, so use ``"none"`` for
            supervised (e.g. CTC) training. Frame-label segments are cropped with the audio.
        label_frame_shift, label_frame_length: hop and receptive field (in samples) of the
            model's frames, for frame labels built from segments (data2vec-audio: 320 and 400).

    Example dicts come from a speech dataset (``id``, ``path``, ``num_samples``, ``text`` and
    optionally ``dataset``, a description used in error messages). Random crops draw from
    the ``generator`` passed to :meth:`load`, else from torch's global RNG (which PyTorch's
    DataLoader seeds per worker), so a seeded run crops identically.
    """

    def __init__(
        self,
        *,
        sample_rate: int = 16000,
        normalize: bool = True,
        max_samples: int | None = None,
        min_samples: int = 0,
        crop: str = "random",
        label_frame_shift: int = 320,
        label_frame_length: int = 400,
    ) -> None:
        self.sample_rate = positive_int(sample_rate, "sample_rate", "audio processor")
        if not isinstance(normalize, bool):
            raise SpecError(f"audio processor: normalize must be true or false, got {normalize!r}.")
        self.normalize = normalize
        self.max_samples = None if max_samples is None else positive_int(max_samples, "max_samples", "audio processor")
        self.min_samples = positive_int(min_samples, "min_samples", "audio processor", allow_zero=True)
        if crop is None:
            crop = "none"
        if crop not in CROPS:
            raise SpecError(f"audio processor: crop must be one of {', '.join(CROPS)}, got {crop!r}.")
        self.crop = crop
        self.label_frame_shift = positive_int(label_frame_shift, "label_frame_shift", "audio processor")
        self.label_frame_length = positive_int(label_frame_length, "label_frame_length", "audio processor")
        if self.max_samples is not None and self.min_samples > self.max_samples:
            raise SpecError(
                f"audio processor: min_samples ({self.min_samples}) is larger than max_samples "
                f"({self.max_samples}), so every example would be dropped."
            )

    def __repr__(self) -> str:
        return (
            f"AudioProcessor(sample_rate={self.sample_rate}, normalize={self.normalize}, "
            f"max_samples={self.max_samples}, min_samples={self.min_samples}, crop={self.crop!r})"
        )

    @property
    def length_per_second(self) -> int:
        """Dataset lengths are counted in samples: ``sample_rate`` of them per second."""
        return self.sample_rate

    def clip_length(self, num_samples: int, *, train: bool) -> int:
        """The length an example will have once loaded (training crops to ``max_samples``), so
        batches are sized by what they will hold, not by the uncropped file."""
        if train and self.max_samples is not None and self.crop != "none":
            return min(int(num_samples), self.max_samples)
        return int(num_samples)

    # ------------------------------------------------------------------ filtering
    def filter_length(self, num_samples: int) -> bool:
        """True if an example of ``num_samples`` samples should be kept for training:
        at least ``min_samples`` long, and, when ``crop="none"``, at most ``max_samples``
        (with cropping, long examples are kept and cropped by :meth:`load`)."""
        if num_samples < self.min_samples:
            return False
        if self.crop == "none" and self.max_samples is not None and num_samples > self.max_samples:
            return False
        return True

    # ------------------------------------------------------------------ user inputs
    #: what ``d2v predict`` picks from a directory (anything libsndfile decodes)
    file_suffixes = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif", ".au")

    def examples_from(self, item: Any, *, task: str = "", fields: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """One example for ``d2v predict`` / :func:`d2v.pipeline` (with ``fields`` added): a file (path), an array of
        samples at ``sample_rate`` (``(samples,)`` or ``(samples, channels)``, as soundfile
        returns), or ``{"array": ..., "sampling_rate": ...}`` (Hugging Face's form). Files are
        only probed here; :meth:`read` decodes, mixes channels down and resamples any rate to
        ``sample_rate``. ``length`` (samples at ``sample_rate``) sizes the batches."""
        if isinstance(item, dict) and "array" in item:
            array, rate = np.asarray(item["array"], dtype=np.float32), int(item.get("sampling_rate", self.sample_rate))
        elif isinstance(item, np.ndarray) or torch.is_tensor(item):
            array, rate = np.asarray(item, dtype=np.float32), self.sample_rate
        else:
            path = str(item)
            _check_exists(path, "")
            try:
                info = sf.info(path)
            except (RuntimeError, OSError, ValueError, TypeError) as err:
                raise BadFile(f"cannot read audio file '{path}': {err}") from None
            length = int(info.frames) * self.sample_rate // max(int(info.samplerate), 1)
            return [{**(fields or {}), "path": path, "length": length, "dataset": "the inputs"}]
        return [{**(fields or {}), "array": array, "sampling_rate": rate, "length": array.shape[0] * self.sample_rate // rate}]

    # ------------------------------------------------------------------ loading
    def _decode(self, example: dict[str, Any]) -> tuple[np.ndarray, int]:
        """``(frames, channels)`` float32 samples and their rate, from the file or the array."""
        if "array" in example:
            data = np.asarray(example["array"], dtype=np.float32)
            return (data[:, None] if data.ndim == 1 else data), int(example["sampling_rate"])
        path = example["path"]
        where = example.get("dataset") or "the dataset"
        _check_exists(path, f" (example '{example.get('id', '?')}' of {where})")
        try:
            return sf.read(path, dtype="float32", always_2d=True)
        except (RuntimeError, OSError, ValueError, TypeError) as err:
            raise BadFile(
                f"cannot read audio file '{path}' (example '{example.get('id', '?')}' of {where}): "
                f"{err}. Check that the file exists and is a valid audio file (FLAC, WAV, OGG, ...), "
                f"or remove it from the dataset."
            ) from None

    def read(self, example: dict[str, Any]) -> torch.Tensor:
        """The example's audio as a float32 mono waveform at ``sample_rate`` (no crop, no
        normalisation)."""
        data, rate = self._decode(example)
        if data.shape[0] == 0:
            raise BadFile(
                f"audio file '{example.get('path', '<array>')}' (example '{example.get('id', '?')}' of "
                f"{example.get('dataset') or 'the dataset'}) has no samples. Remove it from the dataset."
            )
        mono = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float64).astype(np.float32)
        waveform = torch.from_numpy(np.ascontiguousarray(mono))
        if rate != self.sample_rate:
            import torchaudio.functional as AF

            waveform = AF.resample(waveform, orig_freq=int(rate), new_freq=self.sample_rate)
        return waveform

    def load(
        self, example: dict[str, Any], *, train: bool, generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        """``example`` plus ``"waveform"``: float32 ``(S,)``, mono, at ``sample_rate``, cropped
        to ``max_samples`` when training (see ``crop``) and normalised if ``normalize``."""
        waveform = self.read(example)
        loaded = dict(example)
        if train and self.max_samples is not None and self.crop != "none":
            start = self.crop_start(waveform.shape[0], generator=generator)
            waveform = waveform[start : start + self.max_samples]
            if "segments" in example:
                loaded["segments"] = shift_segments(example["segments"], start / self.sample_rate,
                                                    waveform.shape[0] / self.sample_rate)
        if self.normalize:
            waveform = normalize_waveform(waveform)
        loaded["waveform"] = waveform
        return loaded

    def crop_start(self, num_samples: int, *, generator: torch.Generator | None = None) -> int:
        """Where a training crop of ``max_samples`` starts (0 when nothing needs cropping)."""
        excess = num_samples - (self.max_samples or num_samples)
        if excess <= 0 or self.crop != "random":
            return 0
        return int(torch.randint(0, excess + 1, (1,), generator=generator))

    def crop_waveform(self, waveform: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """At most ``max_samples`` of ``waveform``: a random window (``crop="random"``) or the
        start (``crop="start"``)."""
        if waveform.shape[0] <= (self.max_samples or waveform.shape[0]):
            return waveform
        start = self.crop_start(waveform.shape[0], generator=generator)
        return waveform[start : start + self.max_samples]

    # ------------------------------------------------------------------ batching
    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Pad loaded examples to the longest one.

        Returns ``inputs`` (B, S) float32 zero-padded, ``padding_mask`` (B, S) bool True at
        padding, ``lengths`` (B,) int64, ``text`` and ``ids`` (lists of str), in input order.
        """
        if not examples:
            raise ValueError("AudioProcessor.collate needs at least one example")
        waveforms = [ex["waveform"] for ex in examples]
        lengths = torch.tensor([w.shape[0] for w in waveforms], dtype=torch.long)
        longest = int(lengths.max())
        inputs = torch.zeros(len(waveforms), longest, dtype=torch.float32)
        for row, waveform in zip(inputs, waveforms):
            row[: waveform.shape[0]] = waveform
        padding_mask = torch.arange(longest)[None, :] >= lengths[:, None]
        batch = {
            "inputs": inputs,
            "padding_mask": padding_mask,
            "lengths": lengths,
            "text": [ex.get("text", "") for ex in examples],
            "ids": [ex.get("id", "") for ex in examples],
        }
        batch.update(self.collate_labels(examples))
        return batch

    @property
    def length_bucket(self) -> int:
        """Fixed-shape inference pads batches to whole half-seconds (``d2v predict --compile``)."""
        return self.sample_rate // 2

    def pad_batch(self, batch: dict[str, Any], length: int) -> dict[str, Any]:
        """A collated batch padded further to ``length`` samples (zeros, masked)."""
        extra = length - batch["inputs"].shape[1]
        if extra <= 0:
            return batch
        return {**batch, "inputs": F.pad(batch["inputs"], (0, extra)),
                "padding_mask": F.pad(batch["padding_mask"], (0, extra), value=True)}

    def collate_labels(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Task labels carried by the examples (all of them or none): ``label`` -> ``labels``
        ``(B,)``; ``segments`` + ``num_labels`` -> ``labels`` ``(B, F, num_labels)`` (padded
        frames -100); ``speaker`` -> ``speakers`` (list of str)."""
        out: dict[str, Any] = {}
        if all("label" in ex for ex in examples):
            out["labels"] = torch.tensor([int(ex["label"]) for ex in examples], dtype=torch.long)
        elif all("segments" in ex for ex in examples):
            rows = [segments_to_frames(ex["segments"], ex["waveform"].shape[0], int(ex["num_labels"]),
                                       sample_rate=self.sample_rate, shift=self.label_frame_shift,
                                       length=self.label_frame_length) for ex in examples]
            out["labels"] = pad_frame_labels(rows)
        if all("speaker" in ex for ex in examples):
            out["speakers"] = [str(ex["speaker"]) for ex in examples]
        return out
