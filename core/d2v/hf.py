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
    hf_outputs(out: ModelOutput) -> dict               # optional: the HF output fields, in HF's
                                                       # order (default: see default_hf_outputs)
    hf_batch(model, batch: dict) -> dict               # optional: the HF class's call defaults
                                                       # (e.g. a decoder caches unless labels are given)
    processor_spec(config: dict) -> dict               # optional: the ``data.processor`` node for the
                                                       # checkpoint's inputs (``d2v predict``)

``config`` always carries ``_name_or_path`` (the checkpoint directory) so a converter can find
side files such as ``vocab.json``.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from d2v.errors import SpecError

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


class PretrainedOutput(dict):
    """Output with Hugging Face field names: ``out.logits``, ``out["logits"]``, ``out[0]``.

    Fields that were not computed are absent from the dict (and from ``to_tuple``) and read
    as ``None`` through attributes, like ``ModelOutput``.
    """

    def __getattr__(self, name: str) -> Any:
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

    def forward(
        self,
        input_values: Tensor | None = None,
        input_ids: Tensor | None = None,
        pixel_values: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        output_hidden_states: bool | None = False,
        return_dict: bool | None = True,
        mask_time_indices: Tensor | None = None,
        **batch_extras: Any,
    ) -> PretrainedOutput | tuple:
        given = [x for x in (input_values, input_ids, pixel_values) if x is not None]
        if len(given) != 1:
            raise SpecError("pass exactly one of input_values, input_ids or pixel_values.")
        batch: dict[str, Any] = {"inputs": given[0], **batch_extras}
        if attention_mask is not None:
            batch["padding_mask"] = attention_mask == 0  # HF: 1 = keep; d2v: True = padding
        if labels is not None:
            batch["labels"] = labels
        if mask_time_indices is not None:
            batch["mask"] = mask_time_indices.bool()
        hf_batch = getattr(self.converter, "hf_batch", None)
        if callable(hf_batch):
            batch = hf_batch(self.model, batch)

        out = self.model(batch, output_hidden_states=bool(output_hidden_states))
        custom = getattr(self.converter, "hf_outputs", None)
        fields = dict(custom(out)) if callable(custom) else default_hf_outputs(self.model, out)
        if output_hidden_states:
            fields["hidden_states"] = out.hidden_states
        result = PretrainedOutput((k, v) for k, v in fields.items() if v is not None)
        return result if return_dict or return_dict is None else result.to_tuple()

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
    return [f"LABEL_{i}" for i in range(int(config.get("num_labels", 2)))]


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


# --------------------------------------------------------------------------- loading


def known_architectures() -> list[str]:
    from d2v.plugins import registry

    return registry().names("hf_converter")


def get_converter(architecture: str) -> Any:
    from d2v.plugins import registry

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
