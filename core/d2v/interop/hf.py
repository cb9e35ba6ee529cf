"""Hugging Face checkpoint interop, modality-agnostic.

:func:`from_pretrained` reads a ``transformers`` checkpoint directory (``config.json`` plus
``model.safetensors``, a sharded ``model.safetensors.index.json`` or ``pytorch_model.bin``),
picks the ``hf_converter`` component registered under the config's ``architectures[0]``
(e.g. ``Data2VecAudioForCTC``, provided by the audio plugin), and wraps the d2v-native model it
returns in a :class:`PretrainedModel`: a drop-in for the Hugging Face class (same forward
keywords, same output field names) whose :meth:`PretrainedModel.save_pretrained` writes a
directory ``transformers`` loads.

A converter is any object with::

    hf_config_to_spec(config: dict) -> dict            # the d2v ``model:`` spec section
    from_hf(config: dict, state_dict: dict) -> nn.Module  # the native model, weights loaded
    to_hf(model) -> (config: dict, state_dict: dict)   # config.json dict and HF-named weights
    extra_files(model) -> dict[str, str | bytes]       # optional: more files to write (vocab.json)
    export_notes(model) -> list[str]                   # optional: what ``d2v convert --to hf`` reports
                                                       # about an export (what config.json cannot say)
    hf_forward: dict[str, str | None]                  # the HF class's forward parameters in its
                                                       # order: None if implemented, else why not
                                                       # (see keyword_table and check_keywords)
    hf_outputs(out: ModelOutput) -> dict               # optional: the HF output fields, in HF's
                                                       # order (default: see default_hf_outputs)
    hf_batch(model, batch: dict) -> dict               # optional: the HF class's call defaults
                                                       # (e.g. a decoder caches unless labels are given)
    processor_spec(config: dict) -> dict               # optional: the ``data.processor`` node for the
                                                       # checkpoint's inputs (``d2v predict``)

``config`` always carries ``_name_or_path`` (the checkpoint directory) so a converter can find
side files such as ``vocab.json`` (:func:`read_side_json`).

What every modality's converters share lives here: :func:`full_config` (the one rule for filling
a ``config.json`` with the config class's defaults, and for its nulls), :func:`check_supported`,
:func:`config_label_names`, the weight renaming (:func:`hf_weight_names` on import,
:func:`hf_weight_name` on export, :func:`load_strict`) and the choice of converter for an export
(:func:`exports_parts`, :func:`head_hf_config`).
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import re
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from d2v.api.errors import SpecError

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PYTORCH_NAME = "pytorch_model.bin"

#: output fields in Hugging Face's order (``to_tuple`` and integer indexing follow it)
OUTPUT_FIELDS = ("loss", "logits", "start_logits", "end_logits", "embeddings", "last_hidden_state",
                 "pooler_output", "extract_features", "past_key_values", "hidden_states")


def default_hf_outputs(model: nn.Module, out: Any) -> dict[str, Any]:
    """Hugging Face's fields for a d2v ``ModelOutput``: ``loss``/``logits`` with a head,
    else ``last_hidden_state``, ``pooler_output`` and ``extract_features``; then the cache."""
    if getattr(model, "head", None) is not None:
        fields = {"loss": out.loss, "logits": out.logits}
    else:
        fields = {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output,
                  "extract_features": out.extract_features}
    fields["past_key_values"] = out.past_key_values
    return fields


#: why d2v's drop-in refuses ``output_attentions=True`` (the classes that name it take this reason)
NO_ATTENTIONS = ("d2v runs attention through PyTorch's scaled_dot_product_attention, which keeps no attention "
                 "weights; load the checkpoint with transformers (attn_implementation='eager') to inspect them")
_PACKED = "d2v attends over padded batches, not packed ones (flash-attention varlen); pad the batch and pass attention_mask"

#: keywords transformers 5 takes on every ``Data2Vec*`` forward besides the class's own parameters
#: (``**kwargs: TransformersKwargs`` and its output decorators), plus ``head_mask``, which
#: transformers 4 took and pipelines still pass as None: None where d2v implements one, else why not
COMMON_KEYWORDS: dict[str, str | None] = {
    "output_hidden_states": None,
    "return_dict": None,
    "output_attentions": NO_ATTENTIONS,
    "head_mask": "transformers 5 removed head masking too; prune the heads in the weights instead",
    "num_items_in_batch": ("the loss is the mean over this batch; to normalise over several accumulated batches, "
                           "scale it by this batch's share of the items"),
    "output_router_logits": "data2vec has no mixture-of-experts router",
    "position_ids": "this model computes its positions from its inputs",
    "is_causal": "attention is causal exactly when config.json sets is_decoder",
    "cu_seq_lens_q": _PACKED, "cu_seq_lens_k": _PACKED, "max_length_q": _PACKED, "max_length_k": _PACKED,
    "seq_idx": _PACKED,
}
#: the "off" value of refused keywords whose default is not None (pipelines pass these)
_OFF = {"output_attentions": False, "output_router_logits": False, "logits_to_keep": 0}


def keyword_table(*names: str, **refused: str) -> dict[str, str | None]:
    """A transformers forward's parameters in its order (positional calls bind to them): None
    where d2v implements one, the reason given in ``refused`` where it does not."""
    return {name: refused.get(name) for name in names}


def _shown(value: Any) -> str:
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else repr(value)


def check_keywords(architecture: str, own: dict[str, str | None], args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of a drop-in call that d2v implements, positional ones bound in the
    transformers class's order (``own``, a :func:`keyword_table`).

    A keyword that class does not take is Python's TypeError (with a did-you-mean); one d2v does
    not implement is a TypeError saying why, unless it has its default value (pipelines pass
    ``output_attentions=False``, ``head_mask=None``): the model never silently ignores an argument.
    """
    table = {**COMMON_KEYWORDS, **own}
    if len(args) > len(own):
        raise TypeError(f"{architecture}.forward() takes {len(own)} positional arguments but {len(args)} were given")
    for name, value in zip(own, args):
        if name in kwargs:
            raise TypeError(f"{architecture}.forward() got multiple values for argument '{name}'")
        kwargs[name] = value
    if "cache" in own and "past_key_values" in kwargs:  # transformers 5's old name, still taken
        if kwargs.get("cache") is not None:
            raise TypeError(f"{architecture}.forward(): pass the cache as cache or past_key_values, not both")
        kwargs["cache"] = kwargs.pop("past_key_values")
    implemented = {}
    for name, value in kwargs.items():
        if name not in table:
            close = difflib.get_close_matches(name, table, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise TypeError(f"{architecture}.forward() got an unexpected keyword argument '{name}'{hint}")
        reason = table[name]
        if reason is None:
            implemented[name] = value
        elif value is not None and not (name in _OFF and not isinstance(value, Tensor) and value == _OFF[name]):
            raise TypeError(f"{architecture}.forward(): {name}={_shown(value)} is not supported by d2v's drop-in: "
                            f"{reason}.")
    return implemented


class PretrainedOutput(dict):
    """Output with Hugging Face field names: ``out.logits``, ``out["logits"]``, ``out[0]``.

    Fields that were not computed are absent from the dict (and from ``to_tuple``) and read
    as ``None`` through attributes, like ``ModelOutput``.
    """

    def __getattr__(self, name: str) -> Any:
        if name == "cache":  # transformers 5's name for past_key_values
            name = "past_key_values"
        if name in self:
            return self[name]
        if name in OUTPUT_FIELDS:
            return None
        raise AttributeError(name)

    def __getitem__(self, key: str | int) -> Any:
        if isinstance(key, int):
            return self.to_tuple()[key]
        return super().__getitem__(key)

    def to_tuple(self) -> tuple:
        return tuple(v for v in self.values() if v is not None)


class PretrainedModel(nn.Module):
    """A d2v model behind Hugging Face's calling convention.

    ``model``: the d2v-native module (``TaskModel``: ``feature_extractor``, ``encoder``,
    ``head``); ``config``: the Hugging Face config dict it was built from (or exported to).
    """

    def __init__(self, model: nn.Module, config: dict[str, Any], converter: Any):
        super().__init__()
        self.model = model
        self.config = config
        self.converter = converter

    @property
    def architecture(self) -> str:
        return self.config["architectures"][0]

    def forward(self, *args: Any, **kwargs: Any) -> PretrainedOutput | tuple:
        """The transformers class's call: its own arguments (``converter.hf_forward``, positional
        ones in its order), ``output_hidden_states`` and ``return_dict``; see :func:`check_keywords`."""
        own = self.converter.hf_forward
        given = check_keywords(self.architecture, own, args, kwargs)
        output_hidden_states = bool(given.pop("output_hidden_states", False))
        return_dict = given.pop("return_dict", None) is not False
        main = next(iter(own))  # input_values, input_ids or pixel_values
        if given.get(main) is None:
            raise TypeError(f"{self.architecture}.forward() missing required argument: '{main}'")
        batch: dict[str, Any] = {"inputs": given.pop(main)}
        attention_mask = given.pop("attention_mask", None)
        if attention_mask is not None:
            batch["padding_mask"] = attention_mask == 0  # HF: 1 = keep; d2v: True = padding
        mask_time_indices = given.pop("mask_time_indices", None)
        if mask_time_indices is not None:
            batch["mask"] = mask_time_indices.bool()
        cache = given.pop("cache", None)
        if cache is not None:
            batch["past_key_values"] = cache
        # the rest keep their names in d2v's batch (labels, token_type_ids, ...)
        batch.update((k, v) for k, v in given.items() if v is not None)
        hf_batch = getattr(self.converter, "hf_batch", None)
        if callable(hf_batch):
            batch = hf_batch(self.model, batch)

        out = self.model(batch, output_hidden_states=output_hidden_states)
        if "labels" in own and batch.get("labels") is None:
            out.loss = None  # transformers' loss needs labels (a d2v LM head would score the inputs)
        custom = getattr(self.converter, "hf_outputs", None)
        fields = dict(custom(out)) if callable(custom) else default_hf_outputs(self.model, out)
        if "cache" not in own:  # only the classes that take a cache return one
            fields.pop("past_key_values", None)
        if output_hidden_states:
            fields["hidden_states"] = out.hidden_states
            if getattr(self.model, "head", None) is None:  # HF's base-model outputs: the cache comes last
                fields["past_key_values"] = fields.pop("past_key_values", None)
        result = PretrainedOutput((k, v) for k, v in fields.items() if v is not None)
        return result if return_dict else result.to_tuple()

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (and any converter side files)."""
        return save_pretrained(self.model, save_directory, self.converter, config=self.config)


# --------------------------------------------------------------------------- weight names


@functools.lru_cache(maxsize=None)
def _pattern(prefix: str) -> re.Pattern:
    return re.compile("^" + re.escape(prefix).replace(re.escape("{i}"), r"(\d+)"))


def rename_weight(name: str, table: Sequence[tuple[str, str]], *, to_hf: bool) -> str | None:
    """Rename one weight through a table of ``(d2v prefix, Hugging Face prefix)`` pairs, in
    either direction; ``{i}`` in a prefix stands for a layer index. ``None`` when no rule applies
    (every modality's converter maps its names this way)."""
    for ours, theirs in table:
        source, target = (ours, theirs) if to_hf else (theirs, ours)
        match = _pattern(source).match(name)
        if match:
            replaced = target.replace("{i}", match.group(1)) if match.groups() else target
            return replaced + name[match.end():]
    return None


def hf_weight_names(state_dict: dict[str, Tensor], architecture: str, renames: Sequence[tuple[str, str]],
                    head_renames: Sequence[tuple[str, str]] = (), *, prefix: str = "") -> dict[str, Tensor]:
    """A Hugging Face state dict under d2v's names: a backbone weight (with or without the HF
    class's backbone ``prefix``, e.g. ``data2vec_audio.``) through ``renames``, any other through
    ``head_renames``. Weights no rule knows are one error listing them all."""
    renamed, unknown = {}, []
    for name, tensor in state_dict.items():
        bare = name[len(prefix):] if prefix and name.startswith(prefix) else name
        ours = rename_weight(bare, renames, to_hf=False)
        if ours is None:
            ours = rename_weight(name, head_renames, to_hf=False)
        if ours is None:
            unknown.append(name)
        else:
            renamed[ours] = tensor
    if unknown:
        raise SpecError(f"{architecture}: the checkpoint has weights d2v does not know "
                        f"({len(unknown)}): {', '.join(sorted(unknown))}.")
    return renamed


def hf_weight_name(name: str, architecture: str, renames: Sequence[tuple[str, str]],
                   head_renames: Sequence[tuple[str, str]] = (), *, prefix: str = "") -> str:
    """The Hugging Face name of d2v weight ``name``: ``head.*`` through ``head_renames`` (HF keeps
    head weights at the top level), the backbone's through ``renames`` behind ``prefix`` (the HF
    class's backbone attribute, empty for the bare model). No rule is an export error."""
    if name.startswith("head."):
        theirs = rename_weight(name, head_renames, to_hf=True)
    else:
        theirs = rename_weight(name, renames, to_hf=True)
        theirs = None if theirs is None else prefix + theirs
    if theirs is None:
        raise SpecError(f"{architecture} export: no Hugging Face name for d2v weight '{name}'.")
    return theirs


def load_strict(module: nn.Module, state_dict: dict[str, Tensor], what: str) -> None:
    """Load converted weights, failing with every missing and unused name listed: a checkpoint
    that does not match the model its own config.json describes is a bad checkpoint."""
    result = module.load_state_dict(state_dict, strict=False)
    # BatchNorm's step counters are not weights (they never change an output); checkpoints may omit them
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        lines = [f"{what}: the checkpoint's weights do not match the model built from its config.json."]
        if missing:
            lines.append(f"  missing from the checkpoint ({len(missing)}): {', '.join(missing)}")
        if result.unexpected_keys:
            lines.append(f"  not used by the model ({len(result.unexpected_keys)}): {', '.join(result.unexpected_keys)}")
        raise SpecError("\n".join(lines))


# --------------------------------------------------------------------------- converter parts


def has_backbone(model: Any, feature_extractor: str, encoder: str) -> bool:
    """Whether ``model``'s ``feature_extractor`` and ``encoder`` are of the classes named (each
    modality's converters export only its own parts; other modalities' parts look alike)."""
    return (type(getattr(model, "feature_extractor", None)).__name__ == feature_extractor
            and type(getattr(model, "encoder", None)).__name__ == encoder)


def exports_parts(model: Any, feature_extractor: str, encoder: str, head: str | None) -> bool:
    """A converter's ``exports(model)``: the backbone classes named and the head class of its HF
    class (``head`` None: the bare model, no head)."""
    own_head = getattr(model, "head", None)
    return has_backbone(model, feature_extractor, encoder) and (
        own_head is None if head is None else type(own_head).__name__ == head)


def head_hf_config(architecture: str, head: Any, head_class: str, head_name: str) -> dict[str, Any]:
    """The ``config.json`` fields of a head of class ``head_class`` (``head.hf_config()``); any other
    head is an export error naming ``head_name``, the head the HF class has."""
    if type(head).__name__ != head_class or not hasattr(head, "hf_config"):
        article = "an" if head_name[:1] in "aeiou" else "a"
        raise SpecError(f"{architecture} export needs {article} {head_name} head, got {type(head).__name__}.")
    return dict(head.hf_config())


# --------------------------------------------------------------------------- config.json


#: fields every transformers config may set to null: ``PreTrainedConfig``'s special token ids
NULLABLE = ("pad_token_id", "bos_token_id", "eos_token_id")


def full_config(config: dict[str, Any], defaults: dict[str, Any], *, nullable: Collection[str] = ()) -> dict[str, Any]:
    """``config`` (a ``config.json`` dict) with every field it lacks set from ``defaults`` (the
    transformers config class's defaults, which each modality writes out).

    One rule for every modality, transformers' own: ``from_pretrained`` passes every field
    ``config.json`` names to the config class, null included, and only a missing field takes the
    class's default. So a null is kept, never replaced by the default: ``classifier_dropout: null``
    means "use hidden_dropout_prob" (``Data2VecTextConfig`` keeps it and ``to_dict()`` writes it back
    as null), ``pad_token_id: null`` means "no padding token" (not the default id), and
    ``Data2VecAudioConfig`` fills a null ``output_hidden_size`` with ``hidden_size`` (the audio
    converter reads None the same way). transformers 5 refuses a null anywhere else
    (``hidden_size: null`` fails its type check), and so does this function: a null is allowed
    where the default is None, for the :data:`NULLABLE` token ids and for the keys in ``nullable``
    (fields a model reads with ``getattr`` and a default, which the config class does not check).
    A ``config.json`` d2v exports therefore reads back in d2v exactly as in transformers.
    """
    refused = [key for key, value in config.items() if value is None and defaults.get(key) is not None
               and key not in NULLABLE and key not in nullable]
    if refused:
        was = ", ".join(f"{key}={defaults[key]!r}" for key in refused)
        raise SpecError(f"config.json sets {', '.join(refused)} to null, which transformers refuses too; remove the "
                        f"key to take the default ({was}) or give a value.")
    return {**defaults, **config}


def check_supported(family: str, config: dict[str, Any], **supported: Collection[Any]) -> None:
    """Refuse a checkpoint whose field ``key`` (a keyword) holds a value d2v does not implement
    (not one of those given: e.g. ``hidden_act=ACTIVATIONS``), every problem in one error."""
    problems = [f"{key}={config.get(key)!r} (d2v has {', '.join(sorted(map(repr, values)))})"
                for key, values in supported.items() if config.get(key) not in list(values)]
    if problems:
        raise SpecError(f"this {family} checkpoint uses features d2v does not implement: {'; '.join(problems)}.")


def default_label_names(count: int) -> list[str]:
    """Hugging Face's class names when a config names none: ``LABEL_0 .. LABEL_{count-1}``."""
    return [f"LABEL_{i}" for i in range(count)]


def config_label_names(config: dict[str, Any]) -> list[str]:
    """Class names in id order from a config's ``id2label`` (checked to number the classes
    0..n-1), else Hugging Face's ``LABEL_i`` for ``num_labels`` classes (its default is 2)."""
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        try:
            by_id = {int(k): str(v) for k, v in id2label.items()}
        except (TypeError, ValueError):
            raise SpecError(f"config.json: id2label keys must be class ids, got {sorted(id2label)[:3]}.") from None
        if sorted(by_id) != list(range(len(by_id))):
            raise SpecError(f"config.json: id2label must number the classes 0..{len(by_id) - 1}, got {sorted(by_id)}.")
        return [by_id[i] for i in range(len(by_id))]
    return default_label_names(int(config.get("num_labels", 2)))


def read_side_json(config: dict[str, Any], name: str) -> Any:
    """The JSON file ``name`` beside the checkpoint (``config["_name_or_path"]``), None when it has none."""
    path = Path(config.get("_name_or_path") or ".") / name
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# --------------------------------------------------------------------------- loading


def known_architectures() -> list[str]:
    from d2v.api.plugins import registry

    return registry().names("hf_converter")


def get_converter(architecture: str) -> Any:
    from d2v.api.plugins import registry

    reg = registry()
    if architecture not in reg.names("hf_converter"):
        known = ", ".join(reg.names("hf_converter")) or "none (is a modality plugin installed?)"
        raise SpecError(f"no d2v converter for Hugging Face architecture '{architecture}'. Known architectures: {known}.")
    return reg.get("hf_converter", architecture).build()


def read_config(path: Path) -> dict[str, Any]:
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise SpecError(
            f"'{path}' is not a Hugging Face checkpoint directory: it has no {CONFIG_NAME}. "
            f"d2v never downloads; pass a local directory (e.g. one written by save_pretrained)."
        )
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise SpecError(f"{config_file}: not valid JSON ({exc}).") from None


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Weights of a checkpoint directory: safetensors (single or sharded) or ``pytorch_model.bin``."""
    from safetensors.torch import load_file

    if (path / SAFETENSORS_NAME).is_file():
        return load_file(str(path / SAFETENSORS_NAME))
    if (path / SAFETENSORS_INDEX_NAME).is_file():
        index = json.loads((path / SAFETENSORS_INDEX_NAME).read_text(encoding="utf-8"))
        state: dict[str, Tensor] = {}
        for shard in sorted(set(index.get("weight_map", {}).values())):
            state.update(load_file(str(path / shard)))
        return state
    if (path / PYTORCH_NAME).is_file():
        return torch.load(path / PYTORCH_NAME, map_location="cpu", weights_only=True)
    raise SpecError(
        f"'{path}' has a {CONFIG_NAME} but no weights: expected {SAFETENSORS_NAME}, "
        f"{SAFETENSORS_INDEX_NAME} or {PYTORCH_NAME}."
    )


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Weights of a checkpoint directory: safetensors (single or sharded) or ``pytorch_model.bin``
    (through ``torch.load(weights_only=True)``: no code in it runs). A damaged file is one clear
    error naming it."""
    try:
        return _read_state_dict(path)
    except SpecError:
        raise
    except Exception as exc:  # noqa: BLE001 -- SafetensorError, UnpicklingError, OSError, ...
        raise SpecError(f"the weights in '{path}' cannot be read: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}. The file is damaged or truncated "
                        f"(an interrupted download?); download it again.") from None


def from_pretrained(
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **config_overrides: Any,
) -> PretrainedModel:
    """Load a Hugging Face checkpoint directory into d2v components.

    ``config_overrides`` replace ``config.json`` values before the model is built, like
    Hugging Face's ``from_pretrained(path, mask_time_prob=0.0)``. The model is returned in
    eval mode, as ``transformers`` does.
    """
    path = Path(path)
    if not path.is_dir():
        raise SpecError(f"'{path}' is not a directory; d2v.from_pretrained needs a local Hugging Face checkpoint directory.")
    config = read_config(path)
    config.update(config_overrides)
    config["_name_or_path"] = str(path)
    architectures = config.get("architectures") or []
    if not architectures:
        raise SpecError(
            f"{path / CONFIG_NAME} names no 'architectures', so the head cannot be chosen. "
            f"Add one of: {', '.join(known_architectures())}."
        )
    converter = get_converter(architectures[0])
    state_dict = read_state_dict(path)
    model = converter.from_hf(config, state_dict)
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    model.eval()
    public = {k: v for k, v in config.items() if k != "_name_or_path"}
    return PretrainedModel(model, public, converter).eval()


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    converter: Any | str,
    *,
    config: dict[str, Any] | None = None,
) -> Path:
    """Export a d2v model as a Hugging Face checkpoint directory.

    ``converter``: a converter object or an architecture name (``"Data2VecAudioForCTC"``).
    Config fields the converter does not derive from the model (e.g. ``initializer_range``)
    are kept from ``config`` when given.
    """
    from safetensors.torch import save_file

    if isinstance(converter, str):
        converter = get_converter(converter)
    hf_config, state_dict = converter.to_hf(model)
    if config:
        hf_config = {**{k: v for k, v in config.items() if not k.startswith("_")}, **hf_config}
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in state_dict.items()}
    save_file(tensors, str(directory / SAFETENSORS_NAME), metadata={"format": "pt"})
    write_extra_files(converter, model, directory)
    return directory


def write_extra_files(converter: Any, model: nn.Module, directory: Path) -> None:
    """The converter's side files (a tokenizer, ``vocab.json``) beside the weights: text, or
    bytes (e.g. a sentencepiece model)."""
    extra_files = getattr(converter, "extra_files", None)
    for name, data in (extra_files(model) if extra_files is not None else {}).items():
        if isinstance(data, bytes):
            (directory / name).write_bytes(data)
        else:
            (directory / name).write_text(data, encoding="utf-8")
