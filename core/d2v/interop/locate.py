"""Finding the model behind a path a user gives: a Hugging Face checkpoint directory, a d2v
checkpoint (``runs/<name>/final``) or a run directory (its ``final/``, else its newest checkpoint).
Shared by ``d2v predict`` / ``d2v.pipeline``, ``d2v export`` and the TensorFlow models."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from d2v.api.errors import SpecError

if TYPE_CHECKING:  # importing d2v (and building its command line) does not import torch
    from torch import nn

__all__ = ["LocatedModel", "locate_model"]


@dataclass
class LocatedModel:
    """A model found behind a path, and where it came from: a Hugging Face checkpoint
    (``pretrained``), or a d2v checkpoint or run (``spec``: its ``spec.yaml``). ``directory``
    holds the side files saved with the weights (tokenizer, preprocessor); ``None`` for a step
    checkpoint, which holds weights only."""

    model: nn.Module
    source: Path
    directory: Path | None
    spec: dict[str, Any] | None = None
    pretrained: Any = None

    def processor_node(self) -> dict[str, Any] | None:
        """The ``data.processor`` settings the model's inputs need (d2v's form for every source)."""
        if self.pretrained is not None:
            spec = getattr(self.pretrained.converter, "processor_spec", None)
            return spec({**self.pretrained.config, "_name_or_path": str(self.source)}) if callable(spec) else None
        node = (self.spec.get("data") or {}).get("processor")
        return dict(node) if isinstance(node, dict) else None


def locate_model(source: str | os.PathLike, *, command: str = "d2v predict") -> LocatedModel:
    """The model behind ``source``: a Hugging Face checkpoint directory, a d2v checkpoint
    (``runs/<name>/final``) or a run directory (its ``final/``, else its newest checkpoint).
    Shared by ``d2v predict`` / ``d2v.pipeline`` and ``d2v export``."""
    import yaml

    from d2v.interop.convert import load_d2v_checkpoint
    from d2v.interop.hf import from_pretrained
    from d2v.train.checkpoint import latest_checkpoint

    path = Path(source).expanduser()
    expected = ("Pass a run directory (runs/<name>), its final/ checkpoint or a Hugging Face checkpoint "
                "directory (with config.json)")
    if not path.exists():
        raise SpecError(f"{command}: model '{source}' does not exist. {expected}.")
    if not path.is_dir():
        hint = " (a fairseq checkpoint: convert it first with d2v convert)" if path.suffix == ".pt" else ""
        raise SpecError(f"{command}: model '{source}' is a file{hint}. {expected}.")
    if (path / "config.json").is_file():
        pretrained = from_pretrained(path)
        return LocatedModel(pretrained.model, path, path, pretrained=pretrained)
    if (path / "final" / "model.safetensors").is_file():
        path = path / "final"
    if (path / "spec.yaml").is_file() and (path / "model.safetensors").is_file():
        spec = yaml.safe_load((path / "spec.yaml").read_text()) or {}
        return LocatedModel(load_d2v_checkpoint(path), path, path, spec=spec)
    newest = latest_checkpoint(path)
    if newest is not None and (path / "spec.yaml").is_file():  # a run still going (or killed): its newest weights
        spec = yaml.safe_load((path / "spec.yaml").read_text()) or {}
        return LocatedModel(load_d2v_checkpoint(newest, spec_path=path / "spec.yaml"), newest, None, spec=spec)
    raise SpecError(f"{command}: '{path}' holds no model: no config.json (Hugging Face), no spec.yaml with "
                    f"model.safetensors (d2v checkpoint), no final/ and no complete checkpoints/step-*. {expected}.")
