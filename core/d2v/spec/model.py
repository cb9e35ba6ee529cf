"""Spec -> model: build components from the registry and compose them.

Fine-tuning and evaluation use :class:`TaskModel` (feature extractor -> encoder -> head);
pretraining uses the registered ``objective`` (which owns the student, the EMA teacher and
the target). Both keep the student under the same attribute names (``feature_extractor``,
``encoder``) so a pretraining checkpoint initialises a fine-tuning model by key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from d2v.spec.config import resolve_model_section
from d2v.api.errors import SpecError
from d2v.api.interfaces import EncoderOutput, Encoder, FeatureExtractor, Head, _Output
from d2v.api.registry import KINDS, Registry


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
    The head's optional hooks (see :class:`d2v.api.interfaces.Head`) are honoured here.
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
    from d2v.api import plugins
    from d2v.spec.config import load_spec

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
