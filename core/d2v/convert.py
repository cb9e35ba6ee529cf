"""``d2v convert``: Hugging Face checkpoint directories <-> d2v checkpoints.

A d2v checkpoint is a directory with ``model.safetensors`` (d2v parameter names) and a
``spec.yaml`` whose ``model:`` section rebuilds the model -- what a run writes to ``final/``
and what ``model.init.checkpoint`` and ``evaluate.checkpoint`` accept.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from safetensors.torch import save_file

from d2v import plugins
from d2v.errors import SpecError
from d2v.hf import from_pretrained, get_converter, save_pretrained, write_extra_files
from d2v.config import resolve_model_section
from d2v.model import TaskModel, build_model, build_task_model, load_initial_weights


def _fresh(destination: Path) -> None:
    if destination.exists() and any(destination.iterdir()):
        raise SpecError(f"destination '{destination}' already exists and is not empty; choose a new directory.")
    destination.mkdir(parents=True, exist_ok=True)


def hf_to_d2v(source: Path, destination: Path) -> str:
    pretrained = from_pretrained(source)
    arch = pretrained.architecture
    model_spec = get_converter(arch).hf_config_to_spec(pretrained.config)
    _fresh(destination)
    state = {k: v.detach().contiguous().clone() for k, v in pretrained.model.state_dict().items()}
    save_file(state, str(destination / "model.safetensors"), metadata={"format": "pt"})
    write_extra_files(pretrained.converter, pretrained.model, destination)
    task = "finetune" if "head" in model_spec else "pretrain"
    spec = {"task": task, "description": f"converted from Hugging Face {arch} at {source}", "model": model_spec}
    (destination / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return f"wrote d2v checkpoint {destination} ({arch}, {len(state)} tensors)"


def load_d2v_checkpoint(source: Path) -> TaskModel:
    spec_path, weights = source / "spec.yaml", source / "model.safetensors"
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


def d2v_to_hf(source: Path, destination: Path) -> str:
    model = load_d2v_checkpoint(source)
    registry = plugins.registry()
    for component in registry.components("hf_converter"):
        converter = component.build()
        if getattr(converter, "exports", lambda m: False)(model):
            _fresh(destination)
            save_pretrained(model, destination, converter)
            return f"wrote Hugging Face {component.name} checkpoint {destination}"
    known = ", ".join(registry.names("hf_converter"))
    raise SpecError(f"no Hugging Face architecture matches the model in '{source}' (known: {known}).")


def convert(source: str | Path, destination: str | Path, *, to: str) -> str:
    source, destination = Path(source), Path(destination)
    if not source.exists():
        raise SpecError(f"source '{source}' does not exist.")
    return hf_to_d2v(source, destination) if to == "d2v" else d2v_to_hf(source, destination)
