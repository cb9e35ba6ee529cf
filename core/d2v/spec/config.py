"""Experiment specs: YAML load, ``key=value`` overrides, validation before anything is built.

A spec names registered components and their parameters (DESIGN.md §4). Validation binds
every component's parameters to its factory's signature -- the torchtune ``validate`` idea
-- so a typo fails in a second with the key path, the YAML line and a did-you-mean, not
after an hour of data loading.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from d2v.api.errors import SpecError
from d2v.api.registry import KINDS, Registry, did_you_mean
from d2v.spec.fit import check_data_paths, check_modalities

TASKS = ("finetune", "pretrain", "evaluate")
TOP_LEVEL = ("task", "seed", "description", "model", "data", "optim", "schedule", "trainer", "evaluate")
MODEL_KEYS = ("preset", "feature_extractor", "encoder", "head", "objective", "init", "freeze")
DATA_KEYS = ("processor", "train", "valid", "test", "loader", "on_bad_example", "max_skipped_fraction")
#: default share of a split whose unreadable examples may be left out before the run stops
MAX_SKIPPED_FRACTION = 0.001
DATA_SPLITS = ("train", "valid", "test")

# Parameters the builder supplies itself; a spec may not need to set them.
INJECTED = {
    "head": {"input_dim", "vocab_size", "num_layers"},
    "target": {"input_dim", "vocab_size", "num_layers"},  # inside an objective: the encoder's, as for heads
    "objective": {"feature_extractor", "encoder"},
    "optimizer": {"model"},
    "schedule": {"optimizer", "total_steps"},
    "dataset": {"on_bad_example"},
}


@dataclasses.dataclass
class LoaderConfig:
    """How batches are formed. ``max_batch_seconds`` (or ``max_batch_length`` in the
    dataset's length unit) buckets examples by length, fairseq ``max_tokens`` style;
    ``batch_size`` gives fixed-size batches instead."""

    batch_size: int | None = None
    max_batch_seconds: float | None = None
    max_batch_length: int | None = None
    max_batch_size: int | None = None
    num_workers: int = 0
    shuffle: bool = True


@dataclasses.dataclass
class TrainerConfig:
    """The runner's knobs (``trainer:`` in a spec)."""

    #: a spec loaded from a file defaults to ``runs/<file name without .yaml>`` (:func:`load_spec`)
    output_dir: str = "runs/experiment"
    max_steps: int = 1000
    grad_accum: int = 1
    clip_norm: float = 0.0
    #: ``auto``: bf16 on a GPU that supports it, else full precision; ``fp16`` scales the loss;
    #: ``no`` (YAML reads a bare ``no`` as false, which means the same)
    mixed_precision: str | bool = "auto"
    log_every: int = 10
    eval_every: int = 0
    eval_before_training: bool = False
    save_every: int = 0
    keep_last: int = 2
    progress_bar: bool = True
    trackers: list = dataclasses.field(default_factory=list)
    cpu: bool = False
    #: how many skipped (non-finite) updates in a row stop the run
    max_bad_steps: int = 20
    #: ``true`` (what ``--resume`` sets): continue from the newest good checkpoint, an error when
    #: there is none; ``auto``: resume when a checkpoint exists, else start fresh (what a requeued
    #: cluster job needs); ``false``: start fresh, an error when the directory holds a run
    resume: bool | str = False
    #: DDP's find_unused_parameters; ``auto``: on only when LayerDrop is on or a probe batch
    #: leaves a trainable parameter without gradient (it costs a graph traversal per step)
    find_unused_parameters: bool | str = "auto"
    #: recompute each Transformer block's activations in backward: less memory, ~1/3 more compute
    gradient_checkpointing: bool = False
    #: ``torch.compile`` each Transformer block (student and teacher): ``true``, or the options
    #: ``{backend: inductor, mode: null|default|reduce-overhead|max-autotune, dynamic: null|true|false}``
    compile: bool | dict = False

    def __post_init__(self) -> None:
        if self.mixed_precision is False:
            self.mixed_precision = "no"


#: what ``trainer.compile`` may hold besides ``true``: ``torch.compile``'s own keywords
COMPILE_OPTIONS = ("backend", "mode", "dynamic", "fullgraph", "options")


@dataclasses.dataclass
class EvaluateConfig:
    """``task: evaluate``: which checkpoint, which split, where hypotheses go."""

    checkpoint: str | None = None
    split: str = "test"
    output: str = "hypotheses.tsv"


# --------------------------------------------------------------------------- loading


class SpecLoader(yaml.SafeLoader):
    """SafeLoader reading ``5e-4`` as a float (YAML 1.2), not the string YAML 1.1 makes of it."""


SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=SpecLoader)  # noqa: S506 - a SafeLoader subclass


class _LineLoader(SpecLoader):
    """Also remembers the line of every mapping key (for error messages)."""


def _line_map(text: str) -> dict[str, int]:
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, path: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key_path = f"{path}.{key_node.value}" if path else str(key_node.value)
                lines[key_path] = key_node.start_mark.line + 1
                walk(value_node, key_path)

    root = yaml.compose(text, Loader=_LineLoader)
    if root is not None:
        walk(root, "")
    return lines


class Spec(dict):
    """A spec: a plain nested dict plus where it came from (for error messages)."""

    source: str = "<spec>"
    lines: dict[str, int]
    #: ``key.path -> "key.path=value"`` for values set on the command line
    overridden: dict[str, str]

    def where(self, path: str) -> str:
        for key, override in (getattr(self, "overridden", None) or {}).items():
            # the override set this key, a key inside it, or a section around it
            if key == path or key.startswith(path + ".") or path.startswith(key + "."):
                return f"command-line override '{override}': {path}"
        line = self.lines.get(path) if hasattr(self, "lines") else None
        return f"{self.source}:{line}: {path}" if line else f"{self.source}: {path}"


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Spec:
    """Read a YAML spec and apply ``key.path=value`` overrides (values parsed as YAML). A spec
    that sets no ``trainer.output_dir`` gets ``runs/<file name without .yaml>``."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file '{path}' does not exist (looked at {path.resolve()}).")
    text = path.read_text()
    try:
        data = _yaml(text) or {}
        lines = _line_map(text)
    except yaml.YAMLError as exc:
        raise SpecError(_yaml_error(path, exc)) from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a spec must be a YAML mapping at the top level, got {type(data).__name__}.")
    spec = Spec(data)
    spec.source = str(path)
    spec.lines = lines
    spec.overridden = {}
    for item in overrides:
        apply_override(spec, item)
        spec.overridden[item.partition("=")[0]] = item
    if spec.get("trainer") is None:
        spec["trainer"] = {}
    if isinstance(spec["trainer"], dict):
        spec["trainer"].setdefault("output_dir", f"runs/{path.stem}")
    return spec


def override_for_option(option: str) -> str | None:
    """The ``key.path=value`` override a user probably meant by ``--max_steps=10`` or ``--lr 1e-4``
    (a spec key written as a command-line option); None when no spec key has that name."""
    name, _, value = option.lstrip("-").partition("=")
    name = name.replace("-", "_")
    sections = {"trainer": TrainerConfig, "data.loader": LoaderConfig, "evaluate": EvaluateConfig}
    paths = [f"{section}.{name}" for section, cls in sections.items()
             if name in {f.name for f in dataclasses.fields(cls)}]
    paths += [f"{section}.{name}" for section, keys in (("data", DATA_KEYS), ("model", MODEL_KEYS)) if name in keys]
    paths += {"lr": ["optim.lr"], "seed": ["seed"], "task": ["task"]}.get(name, [])
    return f"{paths[0]}={value or '...'}" if paths else None


def _yaml_error(path: Path, exc: yaml.YAMLError) -> str:
    """``FILE:LINE:COLUMN: not valid YAML: problem``, with the construct it was inside and the
    offending line (PyYAML's own text names ``<unicode string>``, not the file)."""
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return f"{path}: not valid YAML: {exc}"
    problem = getattr(exc, "problem", None) or "syntax error"
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    inside = f" ({context} that starts at line {context_mark.line + 1})" if context and context_mark else ""
    source_line = mark.buffer.splitlines()[mark.line] if mark.buffer and mark.line < len(mark.buffer.splitlines()) else ""
    pointer = f"\n    {source_line}\n    {' ' * mark.column}^" if source_line else ""
    return f"{path}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {problem}{inside}{pointer}"


def spec_from_dict(data: dict, source: str = "<dict>") -> Spec:
    spec = Spec(copy.deepcopy(data))
    spec.source = source
    spec.lines = {}
    return spec


def apply_override(spec: dict, item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise SpecError(f"override '{item}' is not of the form key.path=value (e.g. trainer.max_steps=10).")
    try:
        value = _yaml(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    node = spec
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SpecError(f"override '{item}': '{part}' is a {type(child).__name__}, not a section.")
        node = child
    node[parts[-1]] = value


def dump_spec(spec: dict) -> str:
    return yaml.safe_dump(dict(spec), sort_keys=False)


# --------------------------------------------------------------------------- presets


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_model_section(model: dict, registry: Registry, where: str = "model") -> dict:
    """Expand ``model.preset`` (a registered ``model`` component returning component dicts)
    and merge the spec's own settings on top of it."""
    model = dict(model or {})
    preset = model.pop("preset", None)
    if preset is None:
        return model
    preset_dict = registry.get("model", preset, where=f"{where}.preset").build()
    return deep_merge(preset_dict, model)


# --------------------------------------------------------------------------- validation


def _type_ok(value: Any, annotation: Any, default: Any) -> str | None:
    """Return the expected type's name if ``value`` clearly does not fit, else None."""
    if value is None:
        return None
    expected = _expected_types(annotation, default)
    if not expected:
        return None
    if bool in expected and isinstance(value, bool):
        return None
    if isinstance(value, bool) and bool not in expected:
        return "/".join(t.__name__ for t in expected)
    if float in expected and isinstance(value, int):
        return None
    if list in expected and isinstance(value, (list, tuple)):
        return None
    if tuple in expected and isinstance(value, (list, tuple)):
        return None
    if isinstance(value, tuple(expected)):
        return None
    return "/".join(t.__name__ for t in expected)


_SIMPLE = (bool, int, float, str, list, tuple, dict)

#: parameter names that are sizes or counts of something the model must have at least one of
_SIZE_NAMES = re.compile(r"^(dim|layers|heads|ffn_dim|vocab_size|clone_batch|top_k|patch_size|image_size|"
                         r"num_labels|(.+_)?(dim|heads|kernel|stride|groups))$")


def _is_size(name: str) -> bool:
    return bool(_SIZE_NAMES.match(name))


def _expected_types(annotation: Any, default: Any) -> tuple[type, ...]:
    if isinstance(annotation, str):
        try:
            annotation = eval(annotation, {"typing": typing, **{t.__name__: t for t in _SIMPLE}})  # noqa: S307
        except Exception:
            annotation = inspect.Parameter.empty
    if annotation is not inspect.Parameter.empty:
        origin = typing.get_origin(annotation)
        args = typing.get_args(annotation)
        if origin in (typing.Union, types.UnionType):
            out: list[type] = []
            for arg in args:
                sub = _expected_types(arg, inspect.Parameter.empty)
                if not sub and arg is not type(None):
                    return ()
                out.extend(sub)
            return tuple(out)
        if origin in (list, tuple, dict):
            return (origin,)
        if annotation in _SIMPLE:
            return (annotation,)
        return ()
    if default is not inspect.Parameter.empty and default is not None and type(default) in _SIMPLE:
        return (type(default),)
    return ()


class Validator:
    """Checks a spec against the live registry and collects every problem it finds."""

    def __init__(self, spec: Spec, registry: Registry, *, check_data: bool = False):
        self.spec = spec
        self.registry = registry
        self.check_data = check_data
        self.errors: list[str] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{self.spec.where(path)}: {message}")

    def component(self, kind: str, node: Any, path: str, *, extra_injected: set[str] = frozenset()) -> None:
        if not isinstance(node, dict):
            self.error(path, f"expected a mapping with 'name:' naming a {kind}, got {node!r}.")
            return
        name = node.get("name")
        if name is None or not isinstance(name, str):
            what = "missing 'name:'" if name is None else f"'name:' must be a string, got {name!r}"
            self.error(path, f"{what} (which {kind}?). Available: {', '.join(self.registry.names(kind)) or 'none'}.")
            return
        try:
            comp = self.registry.get(kind, name)
        except SpecError as exc:
            self.error(f"{path}.name", str(exc))
            return
        try:
            signature = comp.signature()
        except Exception as exc:  # a plugin whose module fails to import
            self.error(f"{path}.name", f"{kind} '{name}' from plugin '{comp.plugin}' cannot be loaded: {exc!r}")
            return
        params = {n: p for n, p in signature.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        var_kw = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
        injected = INJECTED.get(kind, set()) | set(extra_injected)
        for key, value in node.items():
            if key == "name":
                continue
            key_path = f"{path}.{key}"
            if key not in params:
                if not var_kw:
                    hint = did_you_mean(key, [p for p in params if p not in injected])
                    self.error(key_path, f"unknown parameter of {kind} '{name}'{hint or '.'} "
                               f"Its parameters: {', '.join(p for p in params if p not in injected) or 'none'}.")
                continue
            if key in KINDS and isinstance(value, dict) and "name" in value:
                self.component(key, value, key_path)
                continue
            param = params[key]
            expected = _type_ok(value, param.annotation, param.default)
            if expected:
                self.error(key_path, f"expected {expected}, got {type(value).__name__} {value!r}.")
            elif _is_size(key) and isinstance(value, int) and not isinstance(value, bool) and value < 1:
                self.error(key_path, f"a size or count must be >= 1, got {value}.")
        for pname, param in params.items():
            if param.default is inspect.Parameter.empty and pname not in node and pname not in injected:
                self.error(path, f"{kind} '{name}' needs parameter '{pname}'.")

    def dataclass_section(self, cls: type, node: Any, path: str) -> None:
        if node is None:
            return
        if not isinstance(node, dict):
            self.error(path, f"expected a mapping, got {node!r}.")
            return
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        for key, value in node.items():
            if key not in fields:
                self.error(f"{path}.{key}", f"unknown setting{did_you_mean(key, fields) or '.'} "
                           f"Settings: {', '.join(fields)}.")
                continue
            expected = _type_ok(value, hints[key], inspect.Parameter.empty)
            if expected:
                self.error(f"{path}.{key}", f"expected {expected}, got {type(value).__name__} {value!r}.")

    def trainer_values(self, node: Any) -> None:
        """Values the runner would reject later, caught before anything is built."""
        if not isinstance(node, dict):
            return
        choices = {"mixed_precision": ("auto", "no", False, "fp16", "bf16"), "resume": (False, True, "auto"),
                   "find_unused_parameters": (False, True, "auto")}
        for key, allowed in choices.items():
            if key in node and node[key] not in allowed:
                shown = ", ".join(str(a).lower() if isinstance(a, bool) else a for a in allowed
                                  if not (key == "mixed_precision" and a is False))
                self.error(f"trainer.{key}", f"expected one of {shown}; got {node[key]!r}"
                           + (" (full precision is 'no')." if key == "mixed_precision" else "."))
        minimum = {"max_steps": 1, "grad_accum": 1, "log_every": 1, "max_bad_steps": 1,
                   "keep_last": 0, "save_every": 0, "eval_every": 0, "clip_norm": 0}
        for key, low in minimum.items():
            value = node.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < low:
                self.error(f"trainer.{key}", f"must be >= {low}, got {value}.")
        self.trackers(node.get("trackers"))
        compile_options = node.get("compile")
        if isinstance(compile_options, dict):
            for key in compile_options:
                if key not in COMPILE_OPTIONS:
                    self.error(f"trainer.compile.{key}", f"unknown option{did_you_mean(key, COMPILE_OPTIONS) or '.'} "
                               f"Options: {', '.join(COMPILE_OPTIONS)}.")
        output_dir = node.get("output_dir")
        if isinstance(output_dir, str) and Path(output_dir).exists() and not Path(output_dir).is_dir():
            self.error("trainer.output_dir", f"'{output_dir}' is a file; choose a directory path.")

    def trackers(self, names: Any) -> None:
        """Accelerate silently drops a tracker whose package is not installed (no event files,
        no warning) and stops with a traceback on an unknown name: say which, and what to do."""
        if not isinstance(names, list) or not names:
            return
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

        installed = {str(t) for t in get_available_trackers()}
        for name in (str(n) for n in names if str(n) != "all"):
            if name not in LOGGER_TYPE_TO_CLASS:
                self.error("trainer.trackers", f"unknown tracker '{name}'; Accelerate offers: all, "
                                               f"{', '.join(LOGGER_TYPE_TO_CLASS)}.")
            elif name not in installed:
                self.error("trainer.trackers", f"'{name}' is not installed, so nothing would be logged to it; "
                                               f"pip install {name} (or remove it from trainer.trackers).")

    def keys(self, node: dict, allowed: tuple[str, ...], path: str) -> None:
        for key in node:
            if key not in allowed:
                at = f"{path}.{key}" if path else key
                self.error(at, f"unknown key{did_you_mean(key, allowed) or '.'} Allowed here: {', '.join(allowed)}.")

    def run(self) -> None:
        spec = self.spec
        self.keys(spec, TOP_LEVEL, "")
        task = spec.get("task", "finetune")
        if task not in TASKS:
            self.error("task", f"unknown task '{task}'{did_you_mean(str(task), TASKS) or '.'} Tasks: {', '.join(TASKS)}.")
        model = spec.get("model")
        if not isinstance(model, dict):
            self.error("model", "missing 'model:' section (feature_extractor, encoder, head or objective).")
        else:
            self.keys(model, MODEL_KEYS, "model")
            if "preset" in model:
                try:
                    self.registry.get("model", model["preset"])
                except SpecError as exc:
                    self.error("model.preset", str(exc))
                    model = {}
            try:
                resolved = resolve_model_section(model, self.registry)
            except SpecError:
                resolved = {k: v for k, v in model.items() if k != "preset"}
            for part in ("feature_extractor", "encoder"):
                if part not in resolved:
                    self.error("model", f"missing 'model.{part}' (or a 'model.preset' that provides it).")
                else:
                    self.component(part, resolved[part], f"model.{part}")
            if task == "pretrain":
                if "objective" not in resolved:
                    self.error("model", "task 'pretrain' needs 'model.objective' (e.g. {name: data2vec, ...}).")
                else:
                    self.component("objective", resolved["objective"], "model.objective")
            else:
                if "head" not in resolved:
                    self.error("model", f"task '{task}' needs 'model.head' (e.g. {{name: ctc}}).")
                else:
                    self.component("head", resolved["head"], "model.head")
            init = resolved.get("init")
            if init is not None and (not isinstance(init, dict) or "checkpoint" not in init):
                self.error("model.init", "expected {checkpoint: <run checkpoint or Hugging Face directory>, strict: false}.")
            freeze = resolved.get("freeze")
            if freeze is not None and not isinstance(freeze, list):
                self.error("model.freeze", "expected a list of parameter-name prefixes, e.g. [feature_extractor.conv_layers].")
        data = spec.get("data")
        if not isinstance(data, dict):
            self.error("data", "missing 'data:' section (processor and train/valid/test datasets).")
        else:
            self.keys(data, DATA_KEYS, "data")
            if "processor" not in data:
                self.error("data", "missing 'data.processor' (e.g. {name: audio}).")
            else:
                self.component("processor", data["processor"], "data.processor")
            for split in DATA_SPLITS:
                if data.get(split) is not None:  # `data.valid=null` removes a split
                    self.component("dataset", data[split], f"data.{split}")
            needed = "test" if task == "evaluate" else "train"
            if task == "evaluate":
                needed = (spec.get("evaluate") or {}).get("split", "test")
            if data.get(needed) is None:
                self.error("data", f"task '{task}' needs 'data.{needed}'.")
            self.dataclass_section(LoaderConfig, data.get("loader"), "data.loader")
            if data.get("on_bad_example", "skip") not in ("error", "skip"):
                self.error("data.on_bad_example", f"expected error or skip, got {data['on_bad_example']!r}.")
            budget = data.get("max_skipped_fraction", MAX_SKIPPED_FRACTION)
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 <= budget <= 1:
                self.error("data.max_skipped_fraction", f"expected a fraction between 0 and 1, got {budget!r}.")
        if task != "evaluate":
            if "optim" not in spec:
                self.error("optim", "missing 'optim:' section (e.g. {name: adam, lr: 5e-5}).")
            else:
                self.component("optimizer", spec["optim"], "optim")
            if "schedule" in spec:
                self.component("schedule", spec["schedule"], "schedule")
        self.dataclass_section(TrainerConfig, spec.get("trainer"), "trainer")
        self.trainer_values(spec.get("trainer"))
        self.dataclass_section(EvaluateConfig, spec.get("evaluate"), "evaluate")
        if task == "evaluate" and not (spec.get("evaluate") or {}).get("checkpoint") and not (
            isinstance(model, dict) and model.get("init")
        ):
            self.error("evaluate", "task 'evaluate' needs 'evaluate.checkpoint' (a run checkpoint or Hugging Face directory).")
        self.parts_fit(model, spec.get("data"))

    def parts_fit(self, model: Any, data: Any) -> None:
        if not isinstance(data, dict):
            return
        if isinstance(model, dict):
            try:
                resolved = resolve_model_section(model, self.registry)
            except SpecError:
                resolved = model
            check_modalities(resolved, data, self.registry, self.error)
        if self.check_data:
            check_data_paths(data, self.registry, self.error)


def validate(spec: Spec, registry: Registry | None = None, *, check_data: bool = False) -> None:
    """Raise one :class:`SpecError` listing every problem in ``spec`` (nothing is built);
    ``check_data``: also demand that the files and folders the datasets name exist."""
    if registry is None:
        from d2v.api.plugins import registry as live_registry

        registry = live_registry()
    validator = Validator(spec, registry, check_data=check_data)
    validator.run()
    if validator.errors:
        count = len(validator.errors)
        header = f"{spec.source}: {count} problem{'s' if count > 1 else ''} in the spec:"
        raise SpecError("\n  ".join([header, *validator.errors]))

