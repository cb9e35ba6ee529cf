"""Initial weights for a model built from a spec: ``model.init.checkpoint`` and
``evaluate.checkpoint`` read a d2v checkpoint, a ``.safetensors`` file, a Hugging Face checkpoint
directory or a fairseq ``.pt`` file (both converted to d2v names), and copy what fits by name
and shape, reporting the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from d2v.api.errors import SpecError


@dataclass
class InitReport:
    source: str
    loaded: list[str]
    new: list[str]
    unused: list[str]
    mismatched: list[str]

    def summary(self) -> str:
        lines = [f"initialised from {self.source}: {len(self.loaded)} tensors loaded, "
                 f"{len(self.new)} new, {len(self.unused)} unused, {len(self.mismatched)} shape-mismatched"]
        for title, names in (("new (randomly initialised)", self.new), ("unused from checkpoint", self.unused),
                             ("shape mismatch (kept new)", self.mismatched)):
            if names:
                shown = ", ".join(_group_names(names))
                lines.append(f"  {title}: {shown}")
        return "\n".join(lines)


def _group_names(names: list[str], depth: int = 2) -> list[str]:
    groups: dict[str, int] = {}
    for name in names:
        key = ".".join(name.split(".")[:depth])
        groups[key] = groups.get(key, 0) + 1
    return [f"{k}.* ({n})" if n > 1 else k for k, n in sorted(groups.items())]


#: weights every model built from the same backbone settings has (heads and objectives differ)
BACKBONE_PREFIXES = ("feature_extractor.", "encoder.")


def _settings_hint(checkpoint: str | Path) -> str:
    """The checkpoint's own backbone settings, when it records them (a d2v checkpoint's spec)."""
    spec_path = Path(checkpoint) / "spec.yaml"
    if not spec_path.is_file():
        return ""
    import yaml

    try:
        model = (yaml.safe_load(spec_path.read_text()) or {}).get("model") or {}
    except yaml.YAMLError:
        return ""
    parts = {k: model[k] for k in ("preset", "feature_extractor", "encoder") if k in model}
    return f" (its spec.yaml: {yaml.safe_dump(parts, default_flow_style=True, width=10**6).strip()})" if parts else ""


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 -- SafetensorError, OSError, ...: one clear message
        raise SpecError(f"'{path}' ({path.stat().st_size} bytes) cannot be read: {type(exc).__name__}: {exc}. "
                        f"The file is damaged or truncated; use an intact checkpoint.") from None


def read_checkpoint_state(path: str | Path) -> dict[str, Tensor]:
    """Model weights from a d2v run checkpoint directory, a ``.safetensors`` file, a
    Hugging Face checkpoint directory or a fairseq ``.pt`` file (both converted to d2v names)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return _load_safetensors(path)
    if path.is_file() and path.suffix == ".pt":
        from d2v.interop.fairseq import import_fairseq

        model, result = import_fairseq(path)
        for note in result.notes:
            print(f"fairseq import: {note}")
        return model.state_dict()
    if path.is_dir() and (path / "config.json").exists():
        from d2v.interop.hf import from_pretrained

        return from_pretrained(path).model.state_dict()
    if path.is_dir() and (path / "model.safetensors").exists():
        return _load_safetensors(path / "model.safetensors")
    if path.is_dir() and (path / "latest").exists():
        return read_checkpoint_state(path / (path / "latest").read_text().strip())
    raise SpecError(
        f"model.init.checkpoint: '{path}' is neither a d2v checkpoint (a directory with model.safetensors, "
        f"e.g. runs/<name>/final), a Hugging Face checkpoint directory (with config.json) nor a fairseq "
        f"checkpoint file (*.pt)."
    )


def load_initial_weights(model: nn.Module, checkpoint: str | Path, *, strict: bool = False,
                         allow_mismatch: bool = False) -> InitReport:
    """Copy the weights of ``checkpoint`` that match ``model`` by name and shape. A checkpoint
    whose tensors mostly do not fit (more than a tenth shape-mismatched, or fewer loaded than
    left new) is almost always the wrong file, so it needs ``allow_mismatch``."""
    state = read_checkpoint_state(checkpoint)
    own = model.state_dict()
    loadable, mismatched = {}, []
    for key, value in state.items():
        if key in own:
            if own[key].shape == value.shape:
                loadable[key] = value
            else:
                mismatched.append(key)
    # tied weights (an LM head sharing the input embedding) are saved once; their other
    # name is loaded through the shared storage, so it is not "new"
    loaded_storage = {own[k].data_ptr() for k in loadable}
    report = InitReport(
        source=str(checkpoint),
        loaded=sorted(loadable),
        new=sorted(k for k in own if k not in loadable and own[k].data_ptr() not in loaded_storage),
        unused=sorted(k for k in state if k not in own),
        mismatched=sorted(mismatched),
    )
    if strict and (report.new or report.unused or report.mismatched):
        raise SpecError(f"model.init (strict): checkpoint does not match the model exactly.\n{report.summary()}")
    if not loadable:
        raise SpecError(f"model.init: no tensor of '{checkpoint}' matches the model by name and shape.\n{report.summary()}")
    backbone_unused = [k for k in report.unused if k.startswith(BACKBONE_PREFIXES)]
    if backbone_unused and not allow_mismatch:
        raise SpecError(
            f"model.init: '{checkpoint}' has backbone weights this model has no place for "
            f"({', '.join(_group_names(backbone_unused))}): the checkpoint was built with other encoder or feature "
            f"extractor settings{_settings_hint(checkpoint)}. Use the same settings in this spec, or set "
            f"model.init.allow_mismatch: true to drop those weights.\n{report.summary()}")
    mostly_wrong = len(report.mismatched) > max(2, 0.1 * (len(report.loaded) + len(report.mismatched)))
    if (mostly_wrong or len(report.loaded) < len(report.new)) and not allow_mismatch:
        raise SpecError(f"model.init: '{checkpoint}' fits the model badly (is it the right checkpoint?); set "
                        f"model.init.allow_mismatch: true to load the matching tensors anyway.\n{report.summary()}")
    with torch.no_grad():
        for key, value in loadable.items():
            own[key].copy_(value)
    return report

