"""fairseq checkpoints (``.pt``) in, d2v models out -- without fairseq installed.

:func:`read_fairseq_checkpoint` loads the file through :mod:`d2v.interop.safe_pickle` (nothing in it is
executed) and returns a :class:`FairseqCheckpoint`: the ``cfg`` as plain nested dicts (from a
``DictConfig``, a plain container or the legacy ``args`` Namespace; ``${a.b}`` references
resolved), the model weights and, apart, fairseq's EMA teacher (``model["_ema"]``).

Which architecture a checkpoint holds is a plugin's business: every ``fairseq_converter``
component is asked ``accepts(ckpt)`` and the first that says yes runs
``convert(ckpt, options) -> FairseqImport`` (the d2v ``model:`` spec, the task, the weights under
d2v names, which fairseq tensors it used). :func:`import_fairseq` builds that model, loads the
weights strictly and reports, by name, every fairseq tensor that was not imported.

Config drift (keys a newer or older fairseq added or dropped, the cause of fairseq's own
load failures) is tolerated through :class:`ConfigReader`: a missing key takes fairseq's default
and an unknown key is ignored, each with a note.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from d2v.api.errors import SpecError
from d2v.interop.safe_pickle import UnsafePickleError, load_untrusted, plain

__all__ = ["ConfigReader", "FairseqCheckpoint", "FairseqImport", "find_converter", "import_fairseq",
           "read_fairseq_checkpoint"]

MISSING = "???"


@dataclass
class FairseqCheckpoint:
    path: Path
    cfg: dict[str, Any]
    model: dict[str, Tensor]
    ema: dict[str, Tensor] = field(default_factory=dict)
    #: updates the checkpoint was trained for (``optimizer_history[-1].num_updates``), if known
    num_updates: int | None = None

    @property
    def model_cfg(self) -> dict[str, Any]:
        return self.cfg.get("model") or {}

    @property
    def name(self) -> str:
        """fairseq's registered model name (``cfg.model._name``), e.g. ``data2vec_audio``."""
        return str(self.model_cfg.get("_name") or self.cfg.get("arch") or "")

    @property
    def max_update(self) -> int:
        """``optimization.max_update`` (0 when absent): fairseq's default for ``ema_anneal_end_step``."""
        value = (self.cfg.get("optimization") or {}).get("max_update", 0)
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


@dataclass
class FairseqImport:
    """What a converter makes of a checkpoint."""

    spec: dict[str, Any]                 # the d2v ``model:`` section
    task: str                            # "pretrain" (backbone, maybe with objective) or "finetune"
    state_dict: dict[str, Tensor]        # d2v parameter names
    consumed: set[str]                   # fairseq tensor names used (EMA ones as "_ema.<name>")
    notes: list[str] = field(default_factory=list)
    extra_files: dict[str, str | bytes] = field(default_factory=dict)


class ConfigReader:
    """Reads one section of a fairseq config the way fairseq's dataclasses would: a missing
    (or ``???``) key takes the default given here, with a note; keys the converter never asked
    for and that are not in ``known`` (fairseq's own field names) are reported as ignored."""

    def __init__(self, section: dict[str, Any] | None, where: str, known: Iterable[str] = (),
                 notes: list[str] | None = None):
        self.values = dict(section or {})
        self.where = where
        self.known = set(known) | {"_name"}
        self.read: set[str] = set()
        self.notes = [] if notes is None else notes
        self.children: list[ConfigReader] = []

    def __contains__(self, key: str) -> bool:
        return key in self.values and self.values[key] != MISSING

    def get(self, key: str, default: Any) -> Any:
        self.read.add(key)
        if key not in self:
            self.notes.append(f"{self.where}.{key} is missing; fairseq's default {default!r} is used")
            return default
        return self.values[key]

    def section(self, key: str, known: Iterable[str] = ()) -> "ConfigReader":
        self.read.add(key)
        child = ConfigReader(self.values.get(key) if isinstance(self.values.get(key), dict) else None,
                             f"{self.where}.{key}", known, self.notes)
        self.children.append(child)
        return child

    def finish(self) -> list[str]:
        """All notes, after adding the unknown keys of this section and its children."""
        unknown = sorted(k for k in self.values if k not in self.read and k not in self.known)
        if unknown and self.known != {"_name"}:
            self.notes.append(f"{self.where}: keys unknown to this fairseq model were ignored: {', '.join(unknown)}")
        for child in self.children:
            child.finish()
        return self.notes


# --------------------------------------------------------------------------- reading


def _resolve(value: Any, root: dict[str, Any]) -> Any:
    """Resolve omegaconf ``${a.b}`` references (unresolved ones in old checkpoints)."""
    if isinstance(value, dict):
        return {k: _resolve(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, root) for v in value]
    if isinstance(value, str):
        match = re.fullmatch(r"\$\{([A-Za-z0-9_.]+)\}", value)
        if match:
            node: Any = root
            for part in match.group(1).split("."):
                if not isinstance(node, dict) or part not in node:
                    return MISSING
                node = node[part]
            return _resolve(node, root)
    return value


def _config_of(state: dict[str, Any]) -> dict[str, Any]:
    cfg = plain(state.get("cfg"))
    if isinstance(cfg, dict) and cfg:
        return _resolve(cfg, cfg)
    args = plain(state.get("args"))
    if isinstance(args, dict) and args:  # legacy: one flat Namespace for everything
        return {"model": {"_name": args.get("arch"), **args}, "task": args, "arch": args.get("arch")}
    return {}


def _split_ema(weights: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The model's tensors, and fairseq's EMA teacher: ``model["_ema"]`` (2.0, audio 1.0) or a
    submodule's ``model["<module>._ema"]`` (text 1.0 keeps it under ``encoder._ema``), whose
    names get the submodule prefix (``encoder.<name>``)."""
    tensors: dict[str, Tensor] = {}
    ema: dict[str, Tensor] = {}
    for key, value in weights.items():
        if isinstance(value, Tensor):
            tensors[key] = value
        elif key == "_ema" or key.endswith("._ema"):
            prefix = key[: -len("_ema")]
            ema.update({prefix + k: v for k, v in dict(value or {}).items() if isinstance(v, Tensor)})
    return tensors, ema


def read_fairseq_checkpoint(path: str | Path) -> FairseqCheckpoint:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"fairseq checkpoint '{path}' does not exist (or is not a file).")
    try:
        state = load_untrusted(path)
    except UnsafePickleError as err:
        raise SpecError(f"refused to load '{path}': {err}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as err:
        size = path.stat().st_size
        raise SpecError(
            f"'{path}' ({size} bytes) is not a readable PyTorch checkpoint: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no detail'}. The file is probably truncated or "
            f"damaged (an interrupted download?); download it again and compare its size or checksum."
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise SpecError(f"'{path}' is a PyTorch file but not a fairseq checkpoint: expected a dict with 'model' "
                        f"(the weights) and 'cfg' (the configuration).")
    tensors, ema = _split_ema(dict(state["model"]))
    history = plain(state.get("optimizer_history")) or []
    last = history[-1] if isinstance(history, list) and history and isinstance(history[-1], dict) else {}
    updates = last.get("num_updates")
    return FairseqCheckpoint(path=path, cfg=_config_of(state), model=tensors, ema=ema,
                             num_updates=int(updates) if isinstance(updates, (int, float)) else None)


# --------------------------------------------------------------------------- converting


def find_converter(ckpt: FairseqCheckpoint, registry: Any) -> Any:
    for component in registry.components("fairseq_converter"):
        converter = component.build()
        if converter.accepts(ckpt):
            return converter
    known = ", ".join(registry.names("fairseq_converter")) or "none installed"
    raise SpecError(
        f"no fairseq converter reads '{ckpt.path}' (cfg.model._name = '{ckpt.name or '?'}'). "
        f"Converters installed: {known}."
    )


def _strict_load(model: nn.Module, result: FairseqImport, path: Path) -> None:
    own = model.state_dict()
    missing = sorted(k for k in own if k not in result.state_dict)
    unexpected = sorted(k for k in result.state_dict if k not in own)
    mismatched = sorted(f"{k} {tuple(result.state_dict[k].shape)} vs {tuple(own[k].shape)}"
                        for k in result.state_dict if k in own and own[k].shape != result.state_dict[k].shape)
    if missing or unexpected or mismatched:
        lines = [f"importing '{path}' left the model incomplete:"]
        for title, names in (("not in the checkpoint", missing), ("not in the model", unexpected),
                             ("shape differs (checkpoint vs model)", mismatched)):
            if names:
                lines.append(f"  {title}: {', '.join(names)}")
        raise SpecError("\n".join(lines))
    with torch.no_grad():
        for key, value in result.state_dict.items():
            own[key].copy_(value)


def unmapped_names(ckpt: FairseqCheckpoint, result: FairseqImport) -> list[str]:
    names = list(ckpt.model) + [f"_ema.{k}" for k in ckpt.ema]
    return sorted(n for n in names if n not in result.consumed)


def import_fairseq(path: str | Path, options: dict[str, Any] | None = None) -> tuple[nn.Module, FairseqImport]:
    """The d2v model a fairseq checkpoint holds, weights loaded, and the converter's report
    (its notes end with the fairseq tensors that were not imported, by name)."""
    from d2v.api import plugins
    from d2v.spec.config import resolve_model_section
    from d2v.spec.model import build_model, build_task_model

    registry = plugins.registry()
    ckpt = read_fairseq_checkpoint(path)
    result = find_converter(ckpt, registry).convert(ckpt, dict(options or {}))
    spec = resolve_model_section(result.spec, registry)
    if result.task == "pretrain" and "objective" not in spec:
        model = build_task_model(result.spec, registry)
    else:
        model = build_model(result.spec, registry, result.task)
    _strict_load(model, result, ckpt.path)
    counter = model.state_dict().get("num_updates")
    if counter is not None and ckpt.num_updates and counter.numel() == 1:
        counter.fill_(ckpt.num_updates)  # the EMA decay schedule continues where fairseq stopped
        result.notes.append(f"continues from fairseq's update {ckpt.num_updates} (EMA decay schedule)")
    unmapped = unmapped_names(ckpt, result)
    if unmapped:
        result.notes.append(f"{len(unmapped)} fairseq tensors not imported: {', '.join(unmapped)}")
    return model.eval(), result
