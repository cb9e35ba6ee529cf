"""``d2v convert``: Hugging Face checkpoint directories <-> d2v checkpoints, and fairseq
``.pt`` checkpoints -> d2v checkpoints or Hugging Face directories (:mod:`d2v.interop.fairseq`).

A d2v checkpoint is a directory with ``model.safetensors`` (d2v parameter names) and a
``spec.yaml`` whose ``model:`` section rebuilds the model -- what a run writes to ``final/``
and what ``model.init.checkpoint`` and ``evaluate.checkpoint`` accept.
"""

from __future__ import annotations

import shutil
import traceback
from pathlib import Path

import yaml
from safetensors.torch import save_file
from torch import nn

from d2v.api import plugins
from d2v.api.errors import SpecError
from d2v.interop.hf import from_pretrained, get_converter, save_pretrained, write_extra_files
from d2v.spec.config import resolve_model_section
from d2v.interop.fairseq import import_fairseq
from d2v.spec.model import TaskModel, build_model, build_task_model
from d2v.interop.weights import load_initial_weights


def _fresh(destination: Path) -> None:
    if destination.exists() and any(destination.iterdir()):
        raise SpecError(f"destination '{destination}' already exists and is not empty; choose a new directory.")
    destination.mkdir(parents=True, exist_ok=True)


def hf_to_d2v(source: Path, destination: Path) -> str:
    pretrained = from_pretrained(source)
    arch = pretrained.architecture
    # with the directory, so the spec keeps what side files hold (a CTC head's vocab.json)
    model_spec = get_converter(arch).hf_config_to_spec({**pretrained.config, "_name_or_path": str(source)})
    _fresh(destination)
    state = {k: v.detach().contiguous().clone() for k, v in pretrained.model.state_dict().items()}
    save_file(state, str(destination / "model.safetensors"), metadata={"format": "pt"})
    write_extra_files(pretrained.converter, pretrained.model, destination)
    task = "finetune" if "head" in model_spec else "pretrain"
    spec = {"task": task, "description": f"converted from Hugging Face {arch} at {source}", "model": model_spec}
    (destination / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return f"wrote d2v checkpoint {destination} ({arch}, {len(state)} tensors)"


def _write_d2v(model: nn.Module, spec: dict, destination: Path, extra: dict | None = None) -> int:
    _fresh(destination)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(destination / "model.safetensors"), metadata={"format": "pt"})
    for name, content in (extra or {}).items():
        target = destination / name
        target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
    (destination / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return len(state)


def fairseq_to_d2v(source: Path, destination: Path, options: dict) -> str:
    model, result = import_fairseq(source, options)
    spec = {"task": result.task, "description": f"imported from fairseq checkpoint {source}", "model": result.spec}
    count = _write_d2v(model, spec, destination, result.extra_files)
    notes = "".join(f"\n  note: {n}" for n in result.notes)
    return f"wrote d2v checkpoint {destination} ({count} tensors, task {result.task}){notes}"


def fairseq_to_hf(source: Path, destination: Path, options: dict) -> str:
    model, result = import_fairseq(source, options)
    if result.task == "pretrain" and hasattr(model, "teacher"):
        model = TaskModel(model.feature_extractor, model.encoder, None).eval()
    notes = "".join(f"\n  note: {n}" for n in result.notes)
    return _export_hf(model, source, destination, result.extra_files) + notes


def load_d2v_checkpoint(source: Path, spec_path: Path | None = None) -> TaskModel:
    """The model of a d2v checkpoint directory; ``spec_path``: the run's ``spec.yaml`` when
    ``source`` is a step checkpoint (``checkpoints/step-*``), which holds only weights."""
    spec_path, weights = spec_path or source / "spec.yaml", source / "model.safetensors"
    if not (spec_path.exists() and weights.exists()):
        raise SpecError(f"'{source}' is not a d2v checkpoint: expected spec.yaml and model.safetensors "
                        f"(a run's final/ directory).")
    spec = yaml.safe_load(spec_path.read_text())
    task = spec.get("task", "finetune")
    if task == "pretrain" and "objective" not in resolve_model_section(spec["model"], plugins.registry()):
        model = build_task_model(spec["model"], plugins.registry())  # a converted bare HF model: no objective, no head
    else:
        model = build_model(spec["model"], plugins.registry(), task)
    load_initial_weights(model, source, strict=True)
    if task == "pretrain":  # export the student backbone
        model = TaskModel(model.feature_extractor, model.encoder, None)
    model.checkpoint_directory = str(source)  # converters find side files (a tokenizer) here
    return model.eval()


def _export_hf(model: nn.Module, source: Path, destination: Path, extra: dict | None = None) -> str:
    registry = plugins.registry()
    for component in registry.components("hf_converter"):
        converter = component.build()
        if getattr(converter, "exports", lambda m: False)(model):
            _fresh(destination)
            save_pretrained(model, destination, converter)
            for name, content in (extra or {}).items():
                if not (destination / name).exists():
                    target = destination / name
                    target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
            notes = getattr(converter, "export_notes", lambda m: [])(model)  # what config.json cannot say
            return f"wrote Hugging Face {component.name} checkpoint {destination}" + "".join(
                f"\n  note: {note}" for note in notes)
    known = ", ".join(registry.names("hf_converter"))
    raise SpecError(f"no Hugging Face architecture matches the model in '{source}' (known: {known}); "
                    f"convert it to a d2v checkpoint instead (--to d2v).")


def d2v_to_hf(source: Path, destination: Path) -> str:
    return _export_hf(load_d2v_checkpoint(source), source, destination)


def convert(source: str | Path, destination: str | Path, *, to: str | None, source_format: str = "auto",
            options: dict | None = None) -> str:
    """Convert, or raise a ``SpecError`` that names the source and the cause; what this call wrote
    into the destination is removed again on failure (a half-written checkpoint would load as damaged)."""
    source, destination = Path(source), Path(destination)
    created = not destination.exists()
    was_empty = created or (destination.is_dir() and not any(destination.iterdir()))
    try:
        return _convert(source, destination, to, source_format, options or {})
    except BaseException as exc:
        if was_empty and destination.is_dir():  # only what this call wrote; a non-empty one is refused untouched
            for child in destination.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
            if created:
                destination.rmdir()
        if isinstance(exc, (SpecError, KeyboardInterrupt)) or not isinstance(exc, Exception):
            raise
        raise SpecError(_unexpected_failure(source, exc)) from exc


def _unexpected_failure(source: Path, exc: Exception) -> str:
    """One message for a failure no importer anticipated: what failed, where in d2v, what to do."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/d2v" in f.filename]
    where = f" in {Path(frames[-1].filename).name}:{frames[-1].lineno} ({frames[-1].name})" if frames else ""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return (f"could not convert '{source}': {type(exc).__name__}{where}: {message}. The file is in a layout "
            f"d2v's converters do not handle; nothing was written. Rerun with D2V_DEBUG=1 for the traceback "
            f"and report it with the checkpoint's config (its 'cfg' entry) so the converter can name the cause.")


def _convert(source: Path, destination: Path, to: str | None, source_format: str, options: dict) -> str:
    if not source.exists():
        raise SpecError(f"source '{source}' does not exist.")
    if source_format == "fairseq" or (source.is_file() and source.suffix == ".pt"):
        return (fairseq_to_hf if to == "hf" else fairseq_to_d2v)(source, destination, options)
    if to is None:
        raise SpecError("d2v convert: say --to d2v (from a Hugging Face directory) or --to hf (from a d2v checkpoint).")
    return hf_to_d2v(source, destination) if to == "d2v" else d2v_to_hf(source, destination)
