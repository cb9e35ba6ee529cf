"""From dataset + processor to batches: length-bucketed batch sampling and loaders.

Every random choice in the data pipeline (batch order, crops, precomputed masks) is a
function of ``(seed, epoch, index)``, so a resumed run sees exactly the batches an
uninterrupted run would have seen, whatever the number of workers.
"""

from __future__ import annotations

import inspect
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from d2v.spec.config import LoaderConfig
from d2v.api.errors import BadFile, SpecError


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of similar length whose padded size stays under a budget.

    ``max_length`` bounds ``batch_size * longest`` (fairseq's ``max_tokens``), so a batch
    of short utterances holds more of them. With ``batch_size`` set instead, batches have
    a fixed number of (length-sorted) examples. Batch order is shuffled per epoch from
    ``seed + epoch``; call :meth:`set_epoch` before iterating.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        *,
        max_length: int | None = None,
        batch_size: int | None = None,
        max_batch_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
    ):
        if (max_length is None) == (batch_size is None):
            raise SpecError("data.loader: set exactly one of batch_size and max_batch_seconds/max_batch_length.")
        lengths = np.asarray(lengths, dtype=np.int64)
        if max_length is not None and len(lengths) and lengths.max() > max_length:
            raise SpecError(
                f"data.loader: the longest example has length {int(lengths.max())}, more than the batch budget "
                f"{max_length}; raise max_batch_seconds/max_batch_length or crop examples (processor max_samples)."
            )
        self.lengths = lengths
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.batches = self._make_batches(max_length, batch_size, max_batch_size)

    def _make_batches(self, max_length, batch_size, max_batch_size) -> list[list[int]]:
        order = np.argsort(self.lengths, kind="stable")
        batches: list[list[int]] = []
        current: list[int] = []
        longest = 0
        for index in order.tolist():
            length = int(self.lengths[index])
            grown = max(longest, length) * (len(current) + 1)
            full = (
                (batch_size is not None and len(current) == batch_size)
                or (max_length is not None and current and grown > max_length)
                or (max_batch_size is not None and len(current) == max_batch_size)
            )
            if full:
                batches.append(current)
                current, longest = [], 0
            current.append(index)
            longest = max(longest, length)
        if current:
            batches.append(current)
        return batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            yield from (list(b) for b in self.batches)
            return
        rng = np.random.default_rng([self.seed, self.epoch])
        for i in rng.permutation(len(self.batches)).tolist():
            yield list(self.batches[i])

    def __len__(self) -> int:
        return len(self.batches)


#: what ``data.on_bad_example`` may say
BAD_EXAMPLE_POLICIES = ("error", "skip")
#: exceptions that mean "this example's file is bad": the only ones ``skip`` leaves out. A bug
#: in a processor, a collate or a plugin raises something else and stops the run, naming the example
BAD_FILE_ERRORS = (BadFile, OSError, EOFError, UnicodeError)
#: what reading a user's input can fail with (``d2v predict`` reports each failed input and goes on)
BAD_DATA_ERRORS = (SpecError, OSError, ValueError, RuntimeError, EOFError, UnicodeError)
#: key of the stand-in a skipped example becomes between ``load`` and ``Collate``
SKIPPED = "__skipped__"


class BadExample(SpecError):
    """An example that cannot be loaded (``data.on_bad_example: error``).

    A DataLoader worker's exception reaches the main process re-raised as
    ``BadExample("Caught BadExample in DataLoader worker ...<traceback>...")``; only the last
    line, the message itself, is kept, so the user sees which file failed and why.
    """

    def __init__(self, message: str):
        if message.startswith("Caught BadExample"):
            message = message.rstrip().splitlines()[-1].partition(": ")[2] or message
        super().__init__(message)


def check_policy(policy: str) -> str:
    if policy not in BAD_EXAMPLE_POLICIES:
        raise SpecError(f"data.on_bad_example must be one of {', '.join(BAD_EXAMPLE_POLICIES)}, got {policy!r}.")
    return policy


class ProcessedDataset(Dataset):
    """Applies the processor's ``load`` to a dataset's light examples (runs in workers).

    Each example gets its own generator (numpy ``rng`` or torch ``generator``, whichever the
    processor's ``load`` accepts) seeded by ``(seed, epoch, index)``. An example that fails to
    load (unreadable, empty, truncated, undecodable) raises :class:`BadExample` naming it, or,
    with ``on_bad_example="skip"``, becomes a stand-in that :class:`Collate` leaves out.
    """

    def __init__(self, dataset: Dataset, processor: Any, *, train: bool, seed: int,
                 on_bad_example: str = "error", where: str = "data"):
        self.dataset = dataset
        self.processor = processor
        self.train = train
        self.seed = seed
        self.on_bad_example = check_policy(on_bad_example)
        self.where = where
        self.epoch = 0
        params = inspect.signature(processor.load).parameters
        self._rng_kind = "rng" if "rng" in params else "generator" if "generator" in params else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        example = self.dataset[index]
        try:
            return self._load(example, index)
        except BAD_FILE_ERRORS as err:
            name, reason = self._describe(example, index, err)
            if self.on_bad_example == "skip":
                return {SKIPPED: reason, "id": name}
            raise BadExample(f"{self.where}: example '{name}' cannot be loaded: {reason} "
                             f"(data.on_bad_example: skip leaves such examples out)") from None
        except SpecError as err:  # the example does not fit the spec (labels, task): nothing to skip
            name, reason = self._describe(example, index, err)
            raise BadExample(f"{self.where}: example '{name}': {reason} (not an unreadable file, so "
                             f"data.on_bad_example: skip does not leave it out: fix the data or the spec)") from None
        except Exception as err:  # a bug: its traceback, and which example set it off
            err.add_note(f"(while {self.where} loaded example '{self._describe(example, index, err)[0]}')")
            raise

    @staticmethod
    def _describe(example: Any, index: int, err: BaseException) -> tuple[Any, str]:
        name = example.get("id", index) if isinstance(example, dict) else index
        return name, (str(err).splitlines() or [type(err).__name__])[0]

    def _load(self, example: Any, index: int) -> dict:
        if self._rng_kind == "rng":  # a numpy Generator
            return self.processor.load(example, train=self.train, rng=np.random.default_rng([self.seed, self.epoch, index]))
        if self._rng_kind == "generator":  # a torch Generator
            seed = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
            return self.processor.load(example, train=self.train, generator=torch.Generator().manual_seed(seed))
        return self.processor.load(example, train=self.train)


class Collate:
    """The processor's collate plus an optional batch transform (e.g. data2vec 2.0 masks).

    A transform that takes ``rng`` gets a numpy generator seeded by ``(seed, epoch, the batch's
    example ids)``, so its randomness does not depend on which worker (or how many batches
    before it in this process) made the batch: a resumed run draws the same masks.
    A plain object (not a closure) so it pickles into worker processes.
    """

    def __init__(self, collate: Callable, transform: Callable | None = None, seed: int = 0):
        self.collate = collate
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self._transform_takes_rng = transform is not None and "rng" in inspect.signature(transform).parameters

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batch_rng(self, batch: dict) -> np.random.Generator:
        key = zlib.crc32("\x1f".join(str(i) for i in batch.get("ids", ())).encode())
        return np.random.default_rng([self.seed, self.epoch, key])

    def __call__(self, examples: list[dict]) -> dict:
        skipped = [(e["id"], e[SKIPPED]) for e in examples if SKIPPED in e]
        if skipped:
            examples = [e for e in examples if SKIPPED not in e]
            if not examples:  # nothing left: the runner steps over the batch
                return {"skipped_examples": skipped}
        batch = self._collate(examples)
        if skipped:
            batch["skipped_examples"] = skipped
        return batch

    def _collate(self, examples: list[dict]) -> dict:
        batch = self.collate(examples)
        if self.transform is not None:
            if self._transform_takes_rng:
                batch = self.transform(batch, rng=self.batch_rng(batch))
            else:
                batch = self.transform(batch)
        return batch


def batch_sampler_for(dataset: Any, processor: Any, loader: LoaderConfig, *, train: bool, seed: int,
                      where: str) -> BucketBatchSampler:
    lengths = getattr(dataset, "lengths", None)
    if loader.batch_size is not None:
        lengths = lengths if lengths is not None else [1] * len(dataset)
        return BucketBatchSampler(lengths, batch_size=loader.batch_size, shuffle=train and loader.shuffle, seed=seed)
    if lengths is None:
        raise SpecError(f"{where}: this dataset has no 'lengths', so it cannot be bucketed; set data.loader.batch_size.")
    max_length = loader.max_batch_length
    if loader.max_batch_seconds is not None:
        per_second = getattr(processor, "length_per_second", None)
        if per_second is None:
            raise SpecError("data.loader.max_batch_seconds: this processor has no notion of seconds; use max_batch_length.")
        max_length = int(loader.max_batch_seconds * per_second)
    if max_length is None:
        raise SpecError("data.loader: set batch_size, max_batch_seconds or max_batch_length.")
    if hasattr(processor, "clip_length"):
        lengths = [processor.clip_length(n, train=train) for n in lengths]
    return BucketBatchSampler(lengths, max_length=max_length, max_batch_size=loader.max_batch_size,
                              shuffle=train and loader.shuffle, seed=seed)


class KeptExamples(Dataset):
    """The examples of ``dataset`` at ``indices`` (with their ``lengths``): what a processor's
    length filter keeps for training."""

    def __init__(self, dataset: Any, indices: Sequence[int]):
        self.dataset = dataset
        self.indices = list(indices)
        lengths = getattr(dataset, "lengths", None)
        if lengths is not None:
            self.lengths = [lengths[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.indices[index]]


def filter_training_examples(dataset: Any, processor: Any, where: str) -> tuple[Any, int]:
    """Drop the training examples the processor's ``filter_length(length)`` rejects (e.g. audio
    shorter than ``min_samples``, fairseq's ``min_sample_size``); returns the kept dataset and
    how many were dropped."""
    keep_length = getattr(processor, "filter_length", None)
    lengths = getattr(dataset, "lengths", None)
    if keep_length is None or lengths is None:
        return dataset, 0
    kept = [i for i, n in enumerate(lengths) if keep_length(int(n))]
    if not kept:
        raise SpecError(f"{where}: the processor's length limits drop all {len(lengths)} examples "
                        f"({processor!r}); lower min_samples or raise max_samples.")
    if len(kept) == len(lengths):
        return dataset, 0
    return KeptExamples(dataset, kept), len(lengths) - len(kept)


def drop_featureless(dataset: Any, processor: Any, frames: Callable[[Any], Any],
                     train: bool = True) -> tuple[Any, list[tuple[str, str]]]:
    """Leave out examples too short to give the model a single feature frame (e.g. audio
    shorter than the conv stack's 400-sample receptive field): they would be silently zeroed
    by CTC or break pooling. Returns the kept dataset and ``(id, reason)`` for each one left out."""
    lengths = getattr(dataset, "lengths", None)
    if lengths is None:
        return dataset, []
    clip = getattr(processor, "clip_length", None)
    sizes = [clip(int(n), train=train) if clip else int(n) for n in lengths]
    counts = frames(torch.as_tensor(sizes)).tolist() if sizes else []
    short = [i for i, n in enumerate(counts) if n < 1]
    if not short:
        return dataset, []
    left_out = []
    for i in short:
        example = dataset[i]
        name = example.get("id", i) if isinstance(example, dict) else i
        left_out.append((str(name), f"too short: length {sizes[i]} gives no feature frame"))
    kept = [i for i in range(len(lengths)) if counts[i] >= 1]
    return KeptExamples(dataset, kept), left_out


def make_loader(dataset: Any, processor: Any, loader: LoaderConfig, *, train: bool, seed: int, where: str,
                transform: Callable | None = None, on_bad_example: str = "error") -> DataLoader:
    if len(dataset) == 0:
        raise SpecError(f"{where}: the dataset is empty.")
    sampler = batch_sampler_for(dataset, processor, loader, train=train, seed=seed, where=where)
    return DataLoader(
        ProcessedDataset(dataset, processor, train=train, seed=seed, on_bad_example=on_bad_example, where=where),
        batch_sampler=sampler,
        collate_fn=Collate(processor.collate, transform, seed),
        num_workers=loader.num_workers,
        persistent_workers=False,  # workers must see set_epoch (per-epoch augmentation and masks)
        pin_memory=torch.cuda.is_available(),  # page-locked batches: asynchronous copies to the GPU
        generator=torch.Generator().manual_seed(seed),
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell the loader (Accelerate's own epoch counter), the sampler and the per-example
    rng which epoch this is."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    sampler = getattr(loader, "batch_sampler", None)
    for obj in (sampler, getattr(sampler, "batch_sampler", None), loader.dataset, loader.collate_fn):
        if obj is not None and hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
