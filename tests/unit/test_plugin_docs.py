"""docs/writing-a-plugin.md keeps up with the code a plugin implements.

The page writes every interface method, optional hook and pluggy hook as an inline-code span
``Owner.name(param, *, option=default)``. These tests parse those spans and compare them with
``inspect.signature`` of the code: the abstract and optional methods of the interfaces in
``d2v.api.interfaces`` and the hookspecs exactly (names, order, ``*``/``/``/``**`` markers, defaults),
and the duck-typed hooks that core, the runner and the pipeline look up with ``getattr``
against a reference implementation (every documented parameter is accepted, every required one
is documented). A renamed parameter, a new method or a removed hook fails naming what to fix.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from dataclasses import fields
from pathlib import Path

import pytest

from d2v.api import hookspecs
from d2v.api import interfaces

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "writing-a-plugin.md"
INTERFACES = (interfaces.FeatureExtractor, interfaces.Encoder, interfaces.Head, interfaces.Target)
#: the records components return or take; each field must be named on the page
RECORDS = (interfaces.FeatureExtractorOutput, interfaces.EncoderOutput, interfaces.HeadOutput,
           interfaces.ExampleInputs, interfaces.ResultFile)

#: hooks nothing declares: core finds them with getattr. Documented name -> the implementation the
#: documented parameters are checked against ("module:Class.attr"), or the parameters the caller
#: passes (where d2v ships no implementation) with the caller named.
OPTIONAL_HOOKS: dict[str, str | tuple[str, tuple[str, ...]]] = {
    "FeatureExtractor.input_embeddings": "d2v_text.feature_extractor:TextEmbeddings.input_embeddings",
    "FeatureExtractor.frame_lengths_fn": ("d2v.ssl.distill2.frame_lengths_fn calls it with no arguments", ()),
    "Head.tie_input_embeddings": "d2v_heads.text.lm_head:LanguageModelHead.tie_input_embeddings",
    "Head.prepare_batch": "d2v_heads.text.multiple_choice:MultipleChoiceHead.prepare_batch",
    "Head.inspect_examples": "d2v_heads.speech.ctc:CTCHead.inspect_examples",
    "Head.predict_step": "d2v_heads.text.causal_lm:CausalLMHead.predict_step",
    "Head.score_pair": "d2v_heads.speech.xvector:XVectorHead.score_pair",
    "Target.build": "d2v_targets.data2vec:Data2VecTarget.build",
    "Target.make_decoder": "d2v_targets.data2vec:Data2VecTarget.make_decoder",
    "Processor.load": "d2v_text.processor:TextProcessor.load",
    "Processor.collate": "d2v_text.processor:TextProcessor.collate",
    "Processor.clip_length": "d2v_audio.processor:AudioProcessor.clip_length",
    "Processor.filter_length": "d2v_audio.processor:AudioProcessor.filter_length",
    "Processor.save_pretrained": "d2v_text.processor:TextProcessor.save_pretrained",
    "Processor.examples_from": "d2v_audio.processor:AudioProcessor.examples_from",
    "Processor.decode": "d2v_text.processor:TextProcessor.decode",
    "Processor.from_pretrained": "d2v_text.processor:TextProcessor.from_pretrained",
    "Dataset.__getitem__": "d2v.data.shards:ShardedDataset.__getitem__",
    "Dataset.light_example": "d2v.data.shards:ShardedDataset.light_example",
    "Objective.forward": "d2v.ssl.distill:SelfDistillation.forward",
    "Objective.after_optimizer_step": "d2v.ssl.distill:EMASelfDistillation.after_optimizer_step",
    "Objective.make_batch_transform": "d2v.ssl.distill2:Data2Vec2.make_batch_transform",
    "Masking.__call__": "d2v.ssl.masking:InverseBlockMask.__call__",
}
#: functions documented with their full dotted name, checked exactly
FUNCTIONS = {"d2v.nn.layers.run_layer": "d2v.nn.layers:run_layer"}
OWNERS = {cls.__name__ for cls in INTERFACES} | {name.split(".")[0] for name in OPTIONAL_HOOKS}

CODE_SPAN = re.compile(r"`([^`\n]+)`")
CALL = re.compile(r"(?<![\w.])((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*)\(([^()]*)\)")
NO_DEFAULT = object()


def doc_text() -> str:
    return DOC_PATH.read_text(encoding="utf-8")


def documented_calls(text: str) -> list[tuple[str, str]]:
    """Every ``name(params)`` written in an inline-code span, as ``(dotted name, params)``."""
    return [match.groups() for span in CODE_SPAN.findall(text) for match in CALL.finditer(span)]


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_params(text: str) -> list[tuple[str, object]]:
    """``"a, b=1, *, c=None, **d"`` -> ``[("a", NO_DEFAULT), ("b", 1), ("*", ...), ("c", None), ("**d", ...)]``."""
    params = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, default = part.partition("=")
        name = name.split(":")[0].strip()
        params.append((name, _literal(default.strip()) if default else NO_DEFAULT))
    return params


def code_params(function) -> list[tuple[str, object]]:
    """The same form from ``inspect.signature`` (``self``/``cls`` left out)."""
    params: list[tuple[str, object]] = []
    star_written = False
    listed = [p for p in inspect.signature(function).parameters.values() if p.name not in ("self", "cls")]
    for i, param in enumerate(listed):
        default = NO_DEFAULT if param.default is inspect.Parameter.empty else param.default
        if param.kind is param.VAR_POSITIONAL:
            params.append(("*" + param.name, NO_DEFAULT))
            star_written = True
        elif param.kind is param.VAR_KEYWORD:
            params.append(("**" + param.name, NO_DEFAULT))
        elif param.kind is param.KEYWORD_ONLY:
            if not star_written:
                params.append(("*", NO_DEFAULT))
                star_written = True
            params.append((param.name, default))
        else:
            params.append((param.name, default))
        last_positional_only = param.kind is param.POSITIONAL_ONLY and (
            i + 1 == len(listed) or listed[i + 1].kind is not param.POSITIONAL_ONLY)
        if last_positional_only:
            params.append(("/", NO_DEFAULT))
    return params


def render(params: list[tuple[str, object]]) -> str:
    return ", ".join(name if default is NO_DEFAULT else f"{name}={default!r}" for name, default in params)


def resolve(reference: str):
    module, _, qualname = reference.partition(":")
    obj = importlib.import_module(module)
    for attr in qualname.split("."):
        obj = inspect.getattr_static(obj, attr) if inspect.isclass(obj) else getattr(obj, attr)
    return obj.__func__ if isinstance(obj, (classmethod, staticmethod)) else obj


def interface_methods() -> dict[str, object]:
    """``"Head.describe" -> function`` for every public method an interface class or record defines."""
    return {f"{cls.__name__}.{name}": value for cls in INTERFACES + RECORDS for name, value in vars(cls).items()
            if inspect.isfunction(value) and not name.startswith("_")}


def interface_attributes() -> list[str]:
    """``"Encoder.num_layers"`` for every public attribute an interface class declares."""
    names = []
    for cls in INTERFACES:
        declared = set(vars(cls).get("__annotations__", {})) | {
            name for name, value in vars(cls).items() if not callable(value) and not isinstance(value, property)}
        names += [f"{cls.__name__}.{name}" for name in sorted(declared) if not name.startswith("_")]
    return names


def mismatches(expected: list[tuple[str, object]], written: list[tuple[str, object]]) -> str | None:
    if expected != written:
        return f"code has ({render(expected)})"
    return None


def incompatibilities(reference: list[tuple[str, object]], written: list[tuple[str, object]]) -> str | None:
    """A duck-typed hook: the documented parameters must be accepted and the required ones documented."""
    accepts_any = any(name.startswith("**") for name, _ in reference)
    known = {name: default for name, default in reference if name not in ("*", "/")}
    problems = [f"'{name}' is not a parameter" for name, _ in written
                if name not in ("*", "/") and not name.startswith("*") and name not in known and not accepts_any]
    problems += [f"'{name}' differs: default {known[name]!r} in code" for name, default in written
                 if name in known and default is not NO_DEFAULT and known[name] is not NO_DEFAULT
                 and default != known[name]]
    documented = {name for name, _ in written}
    problems += [f"required '{name}' is missing" for name, default in reference
                 if default is NO_DEFAULT and name not in documented and not name.startswith("*")
                 and name not in ("*", "/")]
    return f"{'; '.join(problems)} (reference has ({render(reference)}))" if problems else None


def test_every_interface_method_and_hook_is_documented_with_current_parameters():
    calls = documented_calls(doc_text())
    seen = {name for name, _ in calls}
    exact = {**interface_methods(), **{name: resolve(ref) for name, ref in FUNCTIONS.items()},
             **{name: getattr(hookspecs, name) for name in dir(hookspecs) if name.startswith("d2v_")}}
    missing = [f"{name}({render(code_params(fn))})" for name, fn in exact.items() if name not in seen]
    missing += [name for name in OPTIONAL_HOOKS if name not in seen]
    stale = []
    for name, written in calls:
        params = parse_params(written)
        if name in exact:
            problem = mismatches(code_params(exact[name]), params)
        elif name in OPTIONAL_HOOKS:
            reference = OPTIONAL_HOOKS[name]
            if isinstance(reference, tuple):
                caller, expected = reference
                problem = None if [n for n, _ in params] == list(expected) else f"{caller}"
            else:
                problem = incompatibilities(code_params(resolve(reference)), params)
        elif name.split(".")[0] in OWNERS or ("." not in name and name.startswith("d2v_")):
            problem = "neither the interfaces, the hookspecs nor the known optional hooks define it"
        else:
            continue
        if problem:
            stale.append(f"`{name}({written})`: {problem}")
    assert not missing and not stale, (
        f"{DOC_PATH.name} is out of step with the code.\nNot documented (add these spans): "
        f"{missing}\nStale spans: {stale}")


def test_every_interface_attribute_and_record_field_is_named():
    text = doc_text()
    missing = [name for name in interface_attributes() if not re.search(rf"`{re.escape(name)}`", text)]
    for record in RECORDS:
        missing += [f"{record.__name__}.{field.name}" for field in fields(record)
                    if not re.search(rf"`{field.name}`", text)]
    missing += [f"{record.__name__}" for record in RECORDS if record.__name__ not in text]
    assert not missing, f"{DOC_PATH.name} does not name these interface attributes / record fields: {missing}"


@pytest.mark.parametrize("written, expected", [
    ("x, padding_mask=None, *, output_hidden_states=False, position_ids=None",
     [("x", NO_DEFAULT), ("padding_mask", None), ("*", NO_DEFAULT), ("output_hidden_states", False),
      ("position_ids", None)]),
    ('encoder, block, /, *args, target_feature="ffn", **kwargs',
     [("encoder", NO_DEFAULT), ("block", NO_DEFAULT), ("/", NO_DEFAULT), ("*args", NO_DEFAULT),
      ("target_feature", "ffn"), ("**kwargs", NO_DEFAULT)]),
])
def test_parse_params_reads_markers_and_defaults(written, expected):
    assert parse_params(written) == expected


def test_a_renamed_parameter_is_reported_as_stale():
    """The check itself: a span with an old parameter name, a lost default and an unknown
    method are each reported; the current signature is not."""

    def forward(self, encoder_output, batch, *, top_k=5):
        ...

    assert mismatches(code_params(forward), parse_params("encoder_output, batch, *, top_k=5")) is None
    assert "code has (encoder_output, batch, *, top_k=5)" in mismatches(
        code_params(forward), parse_params("output, batch, *, top_k=5"))
    assert mismatches(code_params(forward), parse_params("encoder_output, batch, *, top_k")) is not None
    loose = incompatibilities(code_params(forward), parse_params("encoder_output, *, top_k=3, beam=2"))
    assert "'beam' is not a parameter" in loose and "default 5 in code" in loose and "required 'batch'" in loose
    assert documented_calls("see `Head.describe(output, batch, *, top_k=5)` and `d2v_register(register)`") == [
        ("Head.describe", "output, batch, *, top_k=5"), ("d2v_register", "register")]
