"""Checks that a spec's parts fit each other and its data is where it says, before anything is
built: ``d2v check`` answers what ``d2v-run`` would otherwise fail on (or, worse, train).

Components say what they work on when they register (``modalities=``, ``paths=``, see
:class:`d2v.api.registry.Component`); a component that declares no modality fits any.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from d2v.api.errors import SpecError
from d2v.api.registry import Registry

#: (spec path, kind) of every part that takes part in the modality check, model first
_MODEL_PARTS = (("feature_extractor", "feature_extractor"), ("encoder", "encoder"), ("head", "head"))
DATA_SPLITS = ("train", "valid", "test")


def _declared(registry: Registry, kind: str, node: Any) -> tuple[str, tuple[str, ...]] | None:
    if not isinstance(node, dict) or not isinstance(node.get("name"), str):
        return None
    try:
        component = registry.get(kind, node["name"])
    except SpecError:
        return None  # reported where the component itself is checked
    return (component.name, component.modalities) if component.modalities else None


def check_modalities(model: dict, data: dict, registry: Registry, error: Callable[[str, str], None]) -> None:
    """All parts that declare modalities must share one; the message names each part's and the
    heads that would fit the input."""
    parts = [(f"model.{key}", kind, _declared(registry, kind, model.get(key))) for key, kind in _MODEL_PARTS]
    parts.append(("data.processor", "processor", _declared(registry, "processor", data.get("processor"))))
    parts += [(f"data.{s}", "dataset", _declared(registry, "dataset", data.get(s))) for s in DATA_SPLITS]
    declared = [(path, kind, found[0], set(found[1])) for path, kind, found in parts if found is not None]
    if not declared or set.intersection(*(mods for *_, mods in declared)):
        return
    inputs = next((mods for path, *_, mods in declared if not path.startswith("model.head")), set())
    seen: dict[str, None] = {}  # one entry per part, in spec order (both splits often name one dataset)
    for _, kind, name, mods in declared:
        seen[f"{kind.replace('_', ' ')} '{name}' ({', '.join(sorted(mods))})"] = None
    who = ", ".join(seen)
    heads = sorted(c.name for c in registry.components("head") if set(c.modalities) & inputs)
    culprit = next((path for path, kind, *_ in declared if kind == "head"), declared[-1][0])
    hint = f" Heads for {', '.join(sorted(inputs))} inputs: {', '.join(heads)}." if inputs and heads else ""
    error(culprit, f"these parts work on different inputs ({who}); use parts made for one modality.{hint}")


def check_data_paths(data: dict, registry: Registry, error: Callable[[str, str], None]) -> None:
    """Every file or folder a dataset names (its registered ``paths``) must exist."""
    for split in DATA_SPLITS:
        node = data.get(split)
        if not isinstance(node, dict) or not isinstance(node.get("name"), str):
            continue
        try:
            component = registry.get("dataset", node["name"])
        except SpecError:
            continue
        for param in component.paths:
            values = node.get(param)
            for value in values if isinstance(values, list) else [values]:
                if isinstance(value, str) and value and not Path(value).exists():
                    error(f"data.{split}.{param}", f"'{value}' does not exist (looked at {Path(value).resolve()}); "
                                                   f"point it at the data, or check the spec away from its data "
                                                   f"with `d2v check --no-data`.")
