"""The optional hooks of the plugin contract, all in one place.

Beyond the abstract methods of :mod:`d2v.api.interfaces`, core reads a few optional attributes
and methods from components (``getattr`` with a default), so a modality can say what it needs
without core branching on it. Each is declared here once: a :class:`typing.Protocol` per method
hook (its signature), a type per attribute hook, the kinds of component that may define it and
what reads it. ``tests/unit/test_plugin_hooks.py`` checks that every built-in component defining a
hook's name matches its declaration, and that docs/architecture.md's hook table lists exactly
these hooks, so code and docs cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["HOOKS", "Hook", "hooks_for"]


# --------------------------------------------------------------------------- method signatures
# (one Protocol per method hook: the parameters core passes)


class InputEmbeddings(Protocol):
    def input_embeddings(self) -> Any: ...


class TieInputEmbeddings(Protocol):
    def tie_input_embeddings(self, embedding: Any) -> None: ...


class PrepareBatch(Protocol):
    def prepare_batch(self, batch: dict[str, Any]) -> dict[str, Any]: ...


class InspectExamples(Protocol):
    def inspect_examples(self, examples: Any) -> list[str]: ...


class Describe(Protocol):
    def describe(self, output: Any, batch: dict[str, Any], *, top_k: int = 5, decode: Any = None) -> list[dict]: ...


class PredictStep(Protocol):
    def predict_step(self, model: Any, batch: dict[str, Any], **options: Any) -> list[dict]: ...


class ScorePair(Protocol):
    def score_pair(self, first: dict, second: dict) -> dict: ...


class MakeDecoder(Protocol):
    def make_decoder(self, kind: str, input_dim: int, **options: Any) -> Any: ...


class TransformerBlocks(Protocol):
    def transformer_blocks(self) -> Any: ...


class LightExample(Protocol):
    def light_example(self, index: int) -> dict[str, Any]: ...


class SavePretrained(Protocol):
    def save_pretrained(self, directory: Any) -> None: ...


class ExamplesFrom(Protocol):
    def examples_from(self, item: Any, *, task: str = "", fields: dict | None = None) -> list[dict]: ...


class Decode(Protocol):
    def decode(self, ids: Any) -> str: ...


class FromPretrained(Protocol):
    def from_pretrained(self, directory: Any, **params: Any) -> Any: ...


class HfOutputs(Protocol):
    def hf_outputs(self, out: Any) -> dict: ...


class HfBatch(Protocol):
    def hf_batch(self, model: Any, batch: dict[str, Any]) -> dict: ...


class PadBatch(Protocol):
    def pad_batch(self, batch: dict[str, Any], length: int) -> dict[str, Any]: ...


class ProcessorSpec(Protocol):
    def processor_spec(self, config: dict[str, Any]) -> dict | None: ...


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Hook:
    """One optional hook: its name, a Protocol (method) or a type (attribute), the component
    kinds that may define it, and what in d2v reads it."""

    name: str
    kinds: tuple[str, ...]
    contract: type
    purpose: str

    @property
    def is_method(self) -> bool:
        return Protocol in self.contract.__mro__


def _hook(name: str, kinds: str, contract: type, purpose: str) -> Hook:
    return Hook(name, tuple(kinds.split()), contract, purpose)


HOOKS: tuple[Hook, ...] = (
    _hook("batch_keys", "feature_extractor encoder", tuple,
          "extra batch entries passed as keyword arguments (text: token_type_ids, past_key_values, ...)"),
    _hook("input_embeddings", "feature_extractor", InputEmbeddings,
          "the word-embedding matrix a masked-LM head shares"),
    _hook("tie_input_embeddings", "head", TieInputEmbeddings,
          "receives that matrix once, so the output layer shares it"),
    _hook("vocab_size", "feature_extractor processor", int,
          "injected into heads that take it; checked against the processor's"),
    _hook("output_dim", "encoder", int, "a head's input_dim when an adapter changes the width"),
    _hook("num_layers", "encoder", int, "injected for weighted layer sums; layer-wise lr decay"),
    _hook("transformer_blocks", "encoder", TransformerBlocks,
          "the blocks gradient checkpointing, compile and FSDP act on"),
    _hook("top_parameters", "encoder feature_extractor", tuple, "submodules counted as the top layer by adamw"),
    _hook("no_weight_decay_names", "encoder feature_extractor", tuple, "parameters exempt from weight decay"),
    _hook("num_extra_tokens", "feature_extractor", int, "leading tokens (CLS) masks leave alone"),
    _hook("grid_size", "feature_extractor", tuple, "the patch grid: 2-D masks and decoders"),
    _hook("needs_hidden_states", "head", bool, "the encoder returns every layer"),
    _hook("prepare_batch", "head", PrepareBatch, "reshape inputs before encoding (multiple choice)"),
    _hook("inspect_examples", "head", InspectExamples, "a look at each split's light examples before training"),
    _hook("tasks", "head", tuple, "the d2v predict / pipeline tasks a head serves"),
    _hook("describe", "head", Describe, "rich per-example results for d2v predict"),
    _hook("predict_step", "head", PredictStep, "the whole inference of a batch (generation)"),
    _hook("pair_tasks", "head", tuple, "tasks whose inputs are pairs of examples"),
    _hook("score_pair", "head", ScorePair, "a pair's score from its two describe() results"),
    _hook("make_decoder", "target", MakeDecoder, "data2vec 2.0's decoder for this target"),
    _hook("light_example", "dataset", LightExample, "an example without its file"),
    _hook("skipped", "dataset", list, "(id, reason) of examples left out while indexing"),
    _hook("label_names", "dataset", list, "class names a head given only num_labels takes"),
    _hook("save_pretrained", "processor", SavePretrained, "files written beside a run's final weights"),
    _hook("examples_from", "processor", ExamplesFrom, "a user's file or value as examples (d2v predict)"),
    _hook("file_suffixes", "processor", tuple, "which files of a directory d2v predict reads"),
    _hook("decode", "processor", Decode, "token ids back to text"),
    _hook("pad_batch", "processor", PadBatch, "a collated batch padded further, to a bucket length"),
    _hook("length_bucket", "processor", int, "the length step fixed-shape inference (predict --compile) pads to"),
    _hook("from_pretrained", "processor", FromPretrained, "the processor rebuilt from a checkpoint's files"),
    _hook("hf_outputs", "hf_converter", HfOutputs, "the Hugging Face output fields of a class"),
    _hook("hf_batch", "hf_converter", HfBatch, "the Hugging Face class's call defaults"),
    _hook("processor_spec", "hf_converter", ProcessorSpec, "the data.processor a checkpoint directory needs"),
)


def hooks_for(kind: str) -> dict[str, Hook]:
    """The hooks a component of ``kind`` may define, by name."""
    return {hook.name: hook for hook in HOOKS if kind in hook.kinds}
