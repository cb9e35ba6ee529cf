"""``d2v.pipeline(task, model=...)``: use a trained model on your own inputs.

A model (a run directory, its ``final/`` checkpoint or a Hugging Face checkpoint directory) is
loaded with the processor it was trained with; inputs (file paths, texts, arrays, images) become
examples through the processor's ``examples_from``, are batched by length like evaluation
batches, and each example's result comes from its head (``Head.describe``, or
``Head.predict_step`` where one forward pass is not enough). Nothing here knows a modality:
reading a file is the processor's business, what a result holds is the head's.

An input that cannot be read becomes ``{"input": name, "error": reason}`` (logged as a warning)
and the others go on, so one corrupt file never costs a whole run.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from d2v.api.errors import SpecError
from d2v.interop.locate import LocatedModel, locate_model
from d2v.use.static_shapes import bucket_for, compile_for_inference, padded_to_bucket

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch and the data pipeline are imported where they are used: ``import d2v`` exports
# ``pipeline`` from here and must stay cheap for ``d2v list`` and plugin registration.

logger = logging.getLogger("d2v.pipeline")

#: batches from which on a progress bar is worth showing
PROGRESS_MIN_BATCHES = 4


# --------------------------------------------------------------------------- loading


def build_processor(node: dict[str, Any], checkpoint: Path | None = None) -> Any:
    """The processor a spec's ``data.processor`` names. With a ``checkpoint`` directory, a
    processor class that defines ``from_pretrained(directory, **params)`` rebuilds itself from
    the files its ``save_pretrained`` wrote there (text: the tokenizer)."""
    from d2v.api import plugins
    from d2v.spec.model import build_component
    from d2v.api.registry import KINDS

    registry = plugins.registry()
    component = registry.get("processor", node["name"], where="data.processor")
    reload = getattr(component.resolve(), "from_pretrained", None)
    if checkpoint is None or not callable(reload):
        return build_component(registry, "processor", node, "data.processor")
    params = {key: build_component(registry, key, value, f"data.processor.{key}")
              if key in KINDS and isinstance(value, dict) and "name" in value else value
              for key, value in node.items() if key != "name"}
    try:
        return reload(checkpoint, **params)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"data.processor: building processor '{node['name']}' from {checkpoint} failed: {exc}") from exc


def processor_from_converter(converter: Any, config: dict[str, Any], where: Path) -> Any:
    """The processor a Hugging Face converter pairs with a checkpoint (``processor_spec``)."""
    spec = getattr(converter, "processor_spec", None)
    if not callable(spec):
        raise SpecError(f"'{where}': the {type(converter).__name__} converter does not say which processor its "
                        f"inputs need (no processor_spec); pass processor= to d2v.pipeline.")
    return build_processor(spec({**config, "_name_or_path": str(where)}))


def _processor_by_export(model: nn.Module, checkpoint: Path) -> Any:
    """A d2v checkpoint whose spec names no processor (converted from Hugging Face or fairseq):
    the processor of the Hugging Face architecture the model exports to."""
    from d2v.api import plugins

    for component in plugins.registry().components("hf_converter"):
        converter = component.build()
        if getattr(converter, "exports", lambda m: False)(model) and hasattr(converter, "processor_spec"):
            config, _ = converter.to_hf(model)
            return processor_from_converter(converter, config, checkpoint)
    raise SpecError(f"'{checkpoint}/spec.yaml' names no data.processor and no Hugging Face architecture matches the "
                    f"model; add a data.processor section (e.g. the one of the spec it was trained with).")


def load_model(source: str | os.PathLike) -> tuple[nn.Module, Any]:
    """``(model, processor)`` behind ``source`` (see :func:`locate_model`)."""
    found = locate_model(source)
    if found.pretrained is not None:
        return found.model, processor_from_converter(found.pretrained.converter, found.pretrained.config, found.source)
    node = found.processor_node()
    where = found.directory or found.source.parent.parent  # a step checkpoint: the run directory
    return found.model, build_processor(node, where) if node else _processor_by_export(found.model, where)


# --------------------------------------------------------------------------- tasks


def head_tasks(head: nn.Module) -> tuple[str, ...]:
    """The pipeline tasks a head serves (``Head.tasks`` then ``Head.pair_tasks``); a head that
    names none serves one task named after its registered name (e.g. ``ctc``)."""
    from d2v.api import plugins

    tasks = tuple(getattr(head, "tasks", ()) or ()) + tuple(getattr(head, "pair_tasks", ()) or ())
    if tasks:
        return tasks
    factory = f"{type(head).__module__}:{type(head).__qualname__}"
    for component in plugins.registry().components("head"):
        if component.factory == factory or component.factory is type(head):
            return (component.name,)
    return ("predict",)


def input_name(item: Any, index: int) -> str:
    """How an input is named in results: a path or a text as given, else its position."""
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    if isinstance(item, dict) and isinstance(item.get("id"), str):
        return item["id"]
    return f"input[{index}]"


def _device(device: str | torch.device | None) -> torch.device:
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise SpecError(f"--device: {exc} (use cpu, cuda, cuda:1, mps or auto).") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpecError(f"--device {device}: no CUDA device is available here; use --device cpu.")
    return device


# --------------------------------------------------------------------------- the pipeline


class Pipeline:
    """A loaded model, its processor and a task: call it on inputs for one result dict each.

    ``top_k`` is how many candidates a result lists; ``options`` go to the head's ``predict_step``
    (generation: ``max_new_tokens``, ``strategy``, ``temperature``, ``sample_top_k`` (the sampling
    pool), ``top_p``, ``seed``). ``compile`` (``True`` or ``torch.compile`` options): fixed-shape
    compiled inference, CUDA graphs on a GPU, with batch lengths padded up to a multiple of
    ``pad_to_multiple_of`` (default: the processor's ``length_bucket``; :mod:`d2v.use.static_shapes`).
    """

    def __init__(self, model: nn.Module, processor: Any, *, task: str | None = None,
                 device: str | torch.device | None = None, batch_size: int = 8, top_k: int = 5,
                 progress: bool = False, compile: bool | dict[str, Any] = False,
                 pad_to_multiple_of: int | None = None, **options: Any):
        self.head = getattr(model, "head", None)
        if self.head is None:
            raise SpecError("this model has no task head (a pretrained backbone); predicting needs a fine-tuned "
                            "model (e.g. runs/<name>/final of a finetune run).")
        if not callable(getattr(processor, "examples_from", None)):
            raise SpecError(f"the processor {type(processor).__name__} cannot read user inputs: it has no "
                            f"examples_from(item, task=..., fields=...) method (see docs/writing-a-plugin.md).")
        self.tasks = head_tasks(self.head)
        if task is not None and task not in self.tasks:
            raise SpecError(f"task '{task}' does not fit this model: its head ({type(self.head).__name__}) does "
                            f"{', '.join(self.tasks)}.")
        self.task = task or self.tasks[0]
        if int(batch_size) < 1 or int(top_k) < 1:
            raise SpecError(f"batch_size and top_k must be >= 1, got {batch_size} and {top_k}.")
        if options and not callable(getattr(self.head, "predict_step", None)):
            raise SpecError(f"option(s) {', '.join(sorted(options))} do not apply to task '{self.task}'.")
        self.device = _device(device)
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.batch_size, self.top_k, self.progress, self.options = int(batch_size), int(top_k), progress, options
        self.decode = getattr(processor, "decode", None)
        self.bucket = bucket_for(processor, pad_to_multiple_of) if compile or pad_to_multiple_of else None
        if compile:
            compile_for_inference(self.model, compile, self.device.type)

    @property
    def is_pair_task(self) -> bool:
        return self.task in (getattr(self.head, "pair_tasks", ()) or ())

    def __call__(self, inputs: Any, *, fields: dict[str, Any] | None = None) -> Any:
        """Results for ``inputs``: one input gives its result (a dict, or a list when it holds
        several examples, e.g. a text file's lines), a list gives a list. Pair tasks take a pair
        ``(a, b)`` or a list of pairs. ``fields`` are added to every example (``question``)."""
        if self.is_pair_task:
            single = isinstance(inputs, tuple) and len(inputs) == 2 and not isinstance(inputs[0], (tuple, list))
            results = self.verify([inputs] if single else list(inputs), fields=fields)
            return results[0] if single else results
        if isinstance(inputs, list):
            return self.run(inputs, fields=fields)
        results = self.run([inputs], fields=fields)
        return results[0] if len(results) == 1 else results

    def run(self, items: list[Any], *, names: list[str] | None = None,
            fields: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """One result per example, in input order: ``{"input": name, **head's result}``, or
        ``{"input": name, "error": reason}`` for an input that could not be read."""
        from d2v.data.loading import BAD_DATA_ERRORS

        records: list[dict[str, Any]] = []
        examples: list[dict[str, Any]] = []
        for index, item in enumerate(items):
            name = names[index] if names else input_name(item, index)
            try:
                found = self.processor.examples_from(item, task=self.task, fields=fields)
            except BAD_DATA_ERRORS as err:
                records.append(self._skipped(name, err))
                continue
            if not found:
                records.append(self._skipped(name, "no example in it (empty)"))
            for example in found:
                label = f"{name}:{example['line']}" if "line" in example else name
                examples.append({**example, "id": str(len(records))})
                records.append({"input": label})
        if examples:
            self._predict(examples, records)
        return records

    def verify(self, pairs: list[Any], *, fields: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Score pairs of inputs with the head's ``score_pair`` (from their two results)."""
        for pair in pairs:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise SpecError(f"task '{self.task}' scores pairs of inputs (a, b); got {pair!r}.")
        flat = [item for pair in pairs for item in pair]
        results = self.run(flat, fields=fields)
        if len(results) != len(flat):
            raise SpecError(f"task '{self.task}' needs one example per input, but some inputs held several.")
        out = []
        for k in range(len(pairs)):
            first, second = results[2 * k], results[2 * k + 1]
            record: dict[str, Any] = {"inputs": [first["input"], second["input"]]}
            failed = [r for r in (first, second) if "error" in r]
            if failed:
                record["error"] = "; ".join(f"{r['input']}: {r['error']}" for r in failed)
            else:
                record.update(self.head.score_pair(first, second))
            out.append(record)
        return out

    def _skipped(self, name: str, reason: Any) -> dict[str, Any]:
        text = (str(reason).splitlines() or [type(reason).__name__])[0]
        logger.warning("skipped %s: %s", name, text)
        return {"input": name, "error": text}

    def _predict(self, examples: list[dict[str, Any]], records: list[dict[str, Any]]) -> None:
        from tqdm.auto import tqdm

        from d2v.data.loading import BucketBatchSampler, Collate, ProcessedDataset

        lengths = [int(example.get("length", 1)) for example in examples]
        batches = list(BucketBatchSampler(lengths, batch_size=self.batch_size, shuffle=False))
        loading = ProcessedDataset(examples, self.processor, train=False, seed=0, on_bad_example="skip", where="inputs")
        collate = Collate(self.processor.collate)
        bar = tqdm(batches, desc=f"d2v predict ({self.task})", unit="batch", file=sys.stderr,
                   disable=not self.progress or len(batches) < PROGRESS_MIN_BATCHES)
        for indices in bar:
            batch = collate([loading[i] for i in indices])
            failed = dict(batch.pop("skipped_examples", None) or [])
            for example_id, reason in failed.items():
                records[int(example_id)] = self._skipped(records[int(example_id)]["input"], reason)
            kept = [examples[i]["id"] for i in indices if examples[i]["id"] not in failed]
            if not kept:
                continue
            results = self.predict_batch(batch)
            if len(results) != len(kept):
                raise SpecError(f"{type(self.head).__name__} returned {len(results)} results for a batch of "
                                f"{len(kept)} examples (a bug in the head's describe/predict_step).")
            for example_id, result in zip(kept, results):
                records[int(example_id)].update(result)

    def predict_batch(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """The head's results for one collated batch."""
        import torch
        from accelerate.utils import send_to_device

        batch = send_to_device(padded_to_bucket(batch, self.processor, self.bucket), self.device)
        step = getattr(self.head, "predict_step", None)
        with torch.no_grad():
            if callable(step):
                return step(self.model, batch, task=self.task, top_k=self.top_k, decode=self.decode, **self.options)
            out = self.model(batch)
            return self.head.describe(out.head_output, batch, top_k=self.top_k, decode=self.decode)


def pipeline(task: str | None = None, model: Any = None, *, processor: Any = None,
             device: str | torch.device | None = None, batch_size: int = 8, top_k: int = 5,
             progress: bool = False, compile: bool | dict[str, Any] = False, pad_to_multiple_of: int | None = None,
             **options: Any) -> Pipeline:
    """A :class:`Pipeline` for ``task`` (default: the model's own, from its head) on ``model``: a
    run directory, a ``final/`` checkpoint or a Hugging Face checkpoint directory (the processor
    comes with it); or a model object (from ``d2v.from_pretrained``, or a d2v ``TaskModel``)
    together with its ``processor``.

    >>> classify = d2v.pipeline(model="runs/keywords_demo")
    >>> classify(["yes.wav", "no.flac"])   # [{"input": "yes.wav", "label": "yes", "score": 0.93, ...}, ...]
    """
    if model is None:
        raise SpecError("d2v.pipeline needs model= (a run directory, a final/ checkpoint or a Hugging Face "
                        "checkpoint directory).")
    if isinstance(model, (str, os.PathLike)):
        loaded, found = load_model(model)
        processor = processor if processor is not None else found
        model = loaded
    elif hasattr(model, "converter") and hasattr(model, "model"):  # from d2v.from_pretrained: its d2v model
        model = model.model
    if processor is None:
        raise SpecError("d2v.pipeline: a model object needs its processor= (or pass the checkpoint's path as model=).")
    return Pipeline(model, processor, task=task, device=device, batch_size=batch_size, top_k=top_k,
                    progress=progress, compile=compile, pad_to_multiple_of=pad_to_multiple_of, **options)


__all__ = ["LocatedModel", "Pipeline", "build_processor", "head_tasks", "load_model", "locate_model", "pipeline"]
