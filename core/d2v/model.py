"""Spec -> model: build components from the registry and compose them.

Fine-tuning and evaluation use :class:`TaskModel` (feature extractor -> encoder -> head);
pretraining uses the registered ``objective`` (which owns the student, the EMA teacher and
the target). Both keep the student under the same attribute names (``feature_extractor``,
``encoder``) so a pretraining checkpoint initialises a fine-tuning model by key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from d2v.config import resolve_model_section
from d2v.errors import SpecError
from d2v.interfaces import EncoderOutput, Encoder, FeatureExtractor, Head, _Output
from d2v.registry import KINDS, Registry


@dataclass
class ModelOutput(_Output):
    """Output of :class:`TaskModel`, with Hugging Face field names."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    last_hidden_state: Tensor | None = None
    extract_features: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    padding_mask: Tensor | None = None
    pooler_output: Tensor | None = None
    past_key_values: Any = None
    head_output: Any = None
    logs: dict[str, float] | None = None


class TaskModel(nn.Module):
    """Feature extractor -> encoder -> (optional) head, driven by a batch dict.

    The batch carries ``inputs`` and ``padding_mask`` (True at padding) plus whatever
    the head needs for its loss (e.g. ``text`` for CTC) and whatever the feature extractor
    and encoder name in their ``batch_keys`` (passed to them as keyword arguments).
    The head's optional hooks (see :class:`d2v.interfaces.Head`) are honoured here.
    """

    def __init__(self, feature_extractor: FeatureExtractor, encoder: Encoder, head: Head | None = None):
        super().__init__()
        self.feature_extractor = feature_extractor
        self.encoder = encoder
        self.head = head
        tie = getattr(head, "tie_input_embeddings", None)
        embedding = feature_extractor.input_embeddings() if hasattr(feature_extractor, "input_embeddings") else None
        if callable(tie) and embedding is not None:
            tie(embedding)

    def encode(self, batch: dict[str, Any], *, output_hidden_states: bool = False) -> tuple[EncoderOutput, Any]:
        features = self.feature_extractor(batch["inputs"], batch.get("padding_mask"),
                                          **batch_context(self.feature_extractor, batch))
        encoded = self.encoder(
            features.features,
            features.padding_mask,
            batch.get("mask"),
            output_hidden_states=output_hidden_states or bool(getattr(self.head, "needs_hidden_states", False)),
            **(features.encoder_context or {}),
            **batch_context(self.encoder, batch),
        )
        return encoded, features

    def forward(self, batch: dict[str, Any], *, output_hidden_states: bool = False) -> ModelOutput:
        prepare = getattr(self.head, "prepare_batch", None)
        if callable(prepare):
            batch = prepare(batch)
        encoded, features = self.encode(batch, output_hidden_states=output_hidden_states)
        out = ModelOutput(
            last_hidden_state=encoded.last_hidden_state,
            extract_features=features.extract_features,
            hidden_states=encoded.hidden_states if output_hidden_states else None,
            padding_mask=encoded.padding_mask,
            pooler_output=encoded.pooler_output,
            past_key_values=encoded.past_key_values,
        )
        if self.head is not None:
            head_out = self.head(encoded, batch)
            out.logits, out.loss, out.head_output = head_out.logits, head_out.loss, head_out
        return out


def batch_context(component: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    """The batch entries ``component`` declares in ``batch_keys`` (those present and not None)."""
    keys = getattr(component, "batch_keys", ()) or ()
    return {key: batch[key] for key in keys if batch.get(key) is not None}


# --------------------------------------------------------------------------- building


def build_component(registry: Registry, kind: str, node: dict, path: str, *,
                    nested: dict[str, dict[str, Any]] | None = None, **injected: Any) -> Any:
    """Build a ``{name: ..., **params}`` node; params named after a kind are built first (with
    ``nested[kind]`` offered to them, as ``injected`` is to this one: only the parameters a
    component takes)."""
    node = dict(node)
    name = node.pop("name")
    comp = registry.get(kind, name, where=path)
    for key, value in list(node.items()):
        if key in KINDS and isinstance(value, dict) and "name" in value:
            node[key] = build_component(registry, key, value, f"{path}.{key}", **(nested or {}).get(key, {}))
    accepted = comp.parameters()
    for key, value in injected.items():
        if key in accepted or comp.accepts_any_keyword():
            node.setdefault(key, value)
    try:
        return comp.build(**node)
    except SpecError:
        raise
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{path}: building {kind} '{name}' failed: {exc}") from exc


def spec_dataset(spec_path: str, split: str, overrides: list[str], purpose: str) -> Any:
    """The dataset of a spec file's ``data.<split>`` (for commands that read a corpus a spec
    names: ``d2v shards make``, ``d2v lm build``)."""
    from d2v import plugins
    from d2v.config import load_spec

    node = (load_spec(spec_path, list(overrides)).get("data") or {}).get(split)
    if not isinstance(node, dict):
        raise SpecError(f"{spec_path}: no data.{split} dataset {purpose}.")
    return build_component(plugins.registry(), "dataset", node, f"data.{split}")


def head_injected(feature_extractor: nn.Module, encoder: Encoder) -> dict[str, Any]:
    """What a head (and an objective's target) gets from the model without the spec naming it: the encoder's output width
    (``output_dim`` when the encoder has one, e.g. after a width-changing adapter, else ``dim``),
    its number of layers (``num_layers``: a learned weighted sum over the ``num_layers + 1``
    hidden states), and the input vocabulary size of feature extractors that embed tokens (an
    LM head's output size)."""
    injected: dict[str, Any] = {"input_dim": int(getattr(encoder, "output_dim", encoder.dim)),
                                "num_layers": int(encoder.num_layers)}
    vocab_size = getattr(feature_extractor, "vocab_size", None)
    if vocab_size is not None:
        injected["vocab_size"] = int(vocab_size)
    return injected


def build_backbone(spec: dict, registry: Registry) -> tuple[FeatureExtractor, Encoder]:
    """The encoder, then the feature extractor at the encoder's width, from a resolved ``model:``
    section."""
    encoder = build_component(registry, "encoder", spec["encoder"], "model.encoder")
    feature_extractor = build_component(registry, "feature_extractor", spec["feature_extractor"],
                                        "model.feature_extractor", dim=encoder.dim)
    if getattr(feature_extractor, "dim", encoder.dim) != encoder.dim:
        raise SpecError(
            f"model: feature_extractor produces {feature_extractor.dim}-wide features but the encoder is "
            f"{encoder.dim} wide; set model.feature_extractor.dim={encoder.dim}."
        )
    return feature_extractor, encoder


def build_task_model(model_spec: dict, registry: Registry) -> TaskModel:
    """Feature extractor -> encoder -> head (none when the section names no head: a bare
    backbone, e.g. a converted Hugging Face ``*Model``)."""
    spec = resolve_model_section(model_spec, registry)
    feature_extractor, encoder = build_backbone(spec, registry)
    head = None
    if spec.get("head") is not None:
        head = build_component(registry, "head", spec["head"], "model.head", **head_injected(feature_extractor, encoder))
    model = TaskModel(feature_extractor, encoder, head)
    for prefix in spec.get("freeze") or []:
        freeze(model, prefix)
    return model


def build_model(model_spec: dict, registry: Registry, task: str) -> nn.Module:
    """The model a task trains: a :class:`TaskModel` (fine-tuning, evaluation) or the
    registered ``objective`` around feature extractor and encoder (pretraining)."""
    if task != "pretrain":
        return build_task_model(model_spec, registry)
    spec = resolve_model_section(model_spec, registry)
    feature_extractor, encoder = build_backbone(spec, registry)
    model = build_component(registry, "objective", spec["objective"], "model.objective",
                            nested={"target": head_injected(feature_extractor, encoder)},
                            feature_extractor=feature_extractor, encoder=encoder)
    for prefix in spec.get("freeze") or []:
        freeze(model, prefix)
    return model


def freeze(model: nn.Module, prefix: str) -> int:
    """Stop gradients for every parameter whose name starts with ``prefix``."""
    count = 0
    for name, param in model.named_parameters():
        if name == prefix or name.startswith(prefix + "."):
            param.requires_grad_(False)
            count += 1
    if count == 0:
        names = sorted({n.rsplit(".", 1)[0] for n, _ in model.named_parameters()})[:12]
        raise SpecError(f"model.freeze: no parameter starts with '{prefix}'. Parameter groups include: {', '.join(names)} ...")
    return count


# --------------------------------------------------------------------------- init


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
        from d2v.fairseq import import_fairseq

        model, result = import_fairseq(path)
        for note in result.notes:
            print(f"fairseq import: {note}")
        return model.state_dict()
    if path.is_dir() and (path / "config.json").exists():
        from d2v.hf import from_pretrained

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

