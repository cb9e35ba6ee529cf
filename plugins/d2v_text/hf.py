"""Hugging Face ``Data2VecText*`` checkpoint import and export: the bare model, ``ForCausalLM``,
``ForMaskedLM``, ``ForSequenceClassification``, ``ForMultipleChoice``, ``ForTokenClassification``
and ``ForQuestionAnswering``.

Registered as ``hf_converter`` components named after the Hugging Face architecture (see
:mod:`d2v.interop.hf`). Each converter offers ``hf_config_to_spec``, ``from_hf`` (strict: every weight
must be used and every parameter filled), ``to_hf``, ``exports`` (for ``d2v convert``) and
``extra_files``: the tokenizer files found beside the source checkpoint (``vocab.json``,
``merges.txt``, ``tokenizer.json``, a sentencepiece model, ...) are written beside an export.

Heads are built by registry name (``masked_lm``, ``causal_lm``, ``text_classification``,
``multiple_choice``, ``token_classification``, ``question_answering``); their weights keep
Hugging Face's top-level names (:attr:`TextModelConverter.head_renames`). No ``transformers``
import is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from d2v.api.errors import SpecError
from d2v.interop.hf import config_label_names, keyword_table, load_strict, rename_weight
from d2v.nn.layers import ACTIVATIONS
from d2v.spec.model import TaskModel, build_task_model
from d2v.api.plugins import registry

#: ``Data2VecTextConfig`` defaults (transformers 5) for the fields d2v reads; a saved
#: ``config.json`` may omit any of them. (The published checkpoints override several:
#: vocab 50265, 514 positions, one token type, eps 1e-5 -- see the ``data2vec-text-base`` preset.)
HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "use_cache": True,
    "classifier_dropout": None,
    "is_decoder": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}

BACKBONE_PREFIX = "data2vec_text."

#: (d2v name, Hugging Face name) of the backbone; ``{i}`` is a layer index.
RENAMES: list[tuple[str, str]] = [
    ("feature_extractor.word_embeddings.", "embeddings.word_embeddings."),
    ("feature_extractor.position_embeddings.", "embeddings.position_embeddings."),
    ("feature_extractor.token_type_embeddings.", "embeddings.token_type_embeddings."),
    ("feature_extractor.layer_norm.", "embeddings.LayerNorm."),
    ("encoder.layers.{i}.self_attention.q_proj.", "encoder.layer.{i}.attention.self.query."),
    ("encoder.layers.{i}.self_attention.k_proj.", "encoder.layer.{i}.attention.self.key."),
    ("encoder.layers.{i}.self_attention.v_proj.", "encoder.layer.{i}.attention.self.value."),
    ("encoder.layers.{i}.self_attention.out_proj.", "encoder.layer.{i}.attention.output.dense."),
    ("encoder.layers.{i}.attention_norm.", "encoder.layer.{i}.attention.output.LayerNorm."),
    ("encoder.layers.{i}.cross_attention.q_proj.", "encoder.layer.{i}.crossattention.self.query."),
    ("encoder.layers.{i}.cross_attention.k_proj.", "encoder.layer.{i}.crossattention.self.key."),
    ("encoder.layers.{i}.cross_attention.v_proj.", "encoder.layer.{i}.crossattention.self.value."),
    ("encoder.layers.{i}.cross_attention.out_proj.", "encoder.layer.{i}.crossattention.output.dense."),
    ("encoder.layers.{i}.cross_attention_norm.", "encoder.layer.{i}.crossattention.output.LayerNorm."),
    ("encoder.layers.{i}.ffn.fc1.", "encoder.layer.{i}.intermediate.dense."),
    ("encoder.layers.{i}.ffn.fc2.", "encoder.layer.{i}.output.dense."),
    ("encoder.layers.{i}.ffn_norm.", "encoder.layer.{i}.output.LayerNorm."),
    ("encoder.pooler.", "pooler."),
]
LM_HEAD_RENAMES: list[tuple[str, str]] = [
    ("head.dense.", "lm_head.dense."), ("head.layer_norm.", "lm_head.layer_norm."),
    ("head.decoder.weight", "lm_head.decoder.weight"), ("head.bias", "lm_head.bias"),
]
#: weights some checkpoints carry that d2v derives instead: HF's non-persistent buffers (older
#: checkpoints saved them) and the decoder bias HF ties to ``lm_head.bias``
DERIVED = ("embeddings.position_ids", "embeddings.token_type_ids", "lm_head.decoder.bias")

#: files of a tokenizer that travel with the weights (RoBERTa BPE, HF fast tokenizer, sentencepiece)
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "sentencepiece.bpe.model", "spm.model", "tokenizer.model")


#: why the drop-ins refuse these transformers keywords (see :func:`d2v.interop.hf.check_keywords`)
REFUSED = {"inputs_embeds": "the text embeddings start from token ids; pass input_ids",
           "logits_to_keep": "the logits of every position are computed; slice them yourself (out.logits[:, -n:])"}
NO_POOLER_NOTE = (
    "this model has no pooler, so pooler.dense is not in the checkpoint, and transformers cannot be told so in "
    "config.json: Data2VecTextModel.from_pretrained(DIR) initialises pooler.dense randomly and its pooler_output "
    "is not meaningful. Load it with Data2VecTextModel.from_pretrained(DIR, add_pooling_layer=False) (nothing "
    "newly initialised) and use last_hidden_state[:, 0] as the sentence vector, or fine-tune a classification head "
    "(Data2VecTextForSequenceClassification has no pooler); d2v.from_pretrained(DIR) gives pooler_output None")
#: the first parameters of every ``Data2VecText*.forward``
INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")
DECODER_INPUTS = ("encoder_hidden_states", "encoder_attention_mask")


def full_config(config: dict[str, Any]) -> dict[str, Any]:
    """An HF config dict with every missing (or null) field d2v reads set to its default."""
    return {**HF_DEFAULTS, **{k: v for k, v in config.items() if v is not None or k == "classifier_dropout"}}


def _backbone_spec(c: dict[str, Any], *, pooler: bool) -> dict[str, Any]:
    if not isinstance(c["hidden_act"], str) or c["hidden_act"] not in ACTIVATIONS:
        raise SpecError(f"this Data2VecText checkpoint uses hidden_act={c['hidden_act']!r}; d2v supports "
                        f"{', '.join(sorted(ACTIVATIONS))}.")
    if not isinstance(c["pad_token_id"], int):
        raise SpecError("Data2VecText config.json: pad_token_id must be a token id (RoBERTa positions are "
                        f"counted from it), got {c['pad_token_id']!r}.")
    return {
        "feature_extractor": {
            "name": "text.embeddings",
            "vocab_size": c["vocab_size"],
            "max_position_embeddings": c["max_position_embeddings"],
            "type_vocab_size": c["type_vocab_size"],
            "padding_idx": c["pad_token_id"],
            "layer_norm_eps": c["layer_norm_eps"],
            "dropout": c["hidden_dropout_prob"],
            "initializer_range": c["initializer_range"],
        },
        "encoder": {
            "name": "text.transformer",
            "dim": c["hidden_size"],
            "layers": c["num_hidden_layers"],
            "heads": c["num_attention_heads"],
            "ffn_dim": c["intermediate_size"],
            "activation": c["hidden_act"],
            "dropout": c["hidden_dropout_prob"],
            "attention_dropout": c["attention_probs_dropout_prob"],
            "layer_norm_eps": c["layer_norm_eps"],
            "is_decoder": bool(c["is_decoder"]),
            "add_cross_attention": bool(c["add_cross_attention"]),
            "add_pooling_layer": pooler,
            "use_cache": bool(c["use_cache"]),
            "initializer_range": c["initializer_range"],
        },
    }


def _label_names(config: dict[str, Any]) -> list[str] | None:
    """Class names in id order; ``None`` when they are HF's ``LABEL_i`` defaults (the head then
    keeps ``num_labels`` only)."""
    names = config_label_names(config)
    return None if names == [f"LABEL_{i}" for i in range(len(names))] else names


def _num_labels(config: dict[str, Any]) -> int:
    id2label = config.get("id2label")
    return len(id2label) if isinstance(id2label, dict) and id2label else int(config.get("num_labels", 2))


def _is_text_backbone(feature_extractor: Any, encoder: Any) -> bool:
    return type(feature_extractor).__name__ == "TextEmbeddings" and type(encoder).__name__ == "TextTransformerEncoder"


def _read_side_files(directory: str | Path | None) -> dict[str, str | bytes]:
    if not directory:
        return {}
    directory = Path(directory)
    files: dict[str, str | bytes] = {}
    for name in TOKENIZER_FILES:
        path = directory / name
        if path.is_file():
            data = path.read_bytes()
            try:
                files[name] = data.decode("utf-8") if not name.endswith(".model") else data
            except UnicodeDecodeError:
                files[name] = data
    return files


class TextModelConverter:
    """``Data2VecTextModel`` <-> ``TaskModel(text.embeddings, text.transformer, head=None)``.

    The bare model has the pooler unless its checkpoint lacks the pooler weights (HF's
    ``add_pooling_layer=False``)."""

    architecture = "Data2VecTextModel"
    hf_forward = keyword_table(*INPUTS, *DECODER_INPUTS, "cache", "use_cache", **REFUSED)
    head_name: str | None = None
    head_class: str | None = None
    head_renames: list[tuple[str, str]] = []
    uses_pooler = True
    #: HF's top-level backbone attribute (``data2vec_text``) prefixes the backbone weights
    prefixed = False

    # -- config ---------------------------------------------------------------------------

    def hf_config_to_spec(self, config: dict[str, Any]) -> dict[str, Any]:
        c = full_config(config)
        pooler = self.uses_pooler and bool(config.get("_add_pooling_layer", True))
        spec = _backbone_spec(c, pooler=pooler)
        if self.head_name is not None:
            spec["head"] = {"name": self.head_name, **self.head_fields(c)}
        return spec

    def head_fields(self, config: dict[str, Any]) -> dict[str, Any]:
        return {}

    def processor_spec(self, config: dict[str, Any]) -> dict[str, Any]:
        """The ``data.processor`` for this checkpoint (``d2v predict``): the tokenizer files beside it."""
        return {"name": "text", "tokenizer": str(config.get("_name_or_path") or "."),
                "max_length": int(full_config(config)["max_position_embeddings"]) - 2}

    # -- import ---------------------------------------------------------------------------

    def build(self, config: dict[str, Any]) -> TaskModel:
        return build_task_model(self.hf_config_to_spec(config), registry())

    def _tied(self, config: dict[str, Any]) -> bool:
        return self.head_name in ("masked_lm", "causal_lm") and bool(full_config(config)["tie_word_embeddings"])

    def rename_from_hf(self, state_dict: dict[str, Tensor], tied: bool) -> tuple[dict[str, Tensor], list[str]]:
        """HF names -> d2v names; also returns the HF names no rule knows."""
        renamed, unknown = {}, []
        for name, tensor in state_dict.items():
            bare = name[len(BACKBONE_PREFIX):] if name.startswith(BACKBONE_PREFIX) else name
            if bare in DERIVED or (tied and name == "lm_head.decoder.weight"):
                continue
            ours = rename_weight(bare, RENAMES, to_hf=False)
            if ours is None:
                ours = rename_weight(name, self.head_renames, to_hf=False)
            if ours is None:
                unknown.append(name)
            else:
                renamed[ours] = tensor
        return renamed, unknown

    def from_hf(self, config: dict[str, Any], state_dict: dict[str, Tensor]) -> TaskModel:
        if self.architecture == "Data2VecTextModel" and not any(
                k.endswith("pooler.dense.weight") for k in state_dict):
            # saved with add_pooling_layer=False; remembered (privately: never written to a
            # config.json, see _hf_config) so that d2v convert's spec has no pooler either
            config["_add_pooling_layer"] = False
        model = self.build(config)
        tied = self._tied(config)
        renamed, unknown = self.rename_from_hf(state_dict, tied)
        if unknown:
            raise SpecError(
                f"{self.architecture}: the checkpoint has weights d2v does not know "
                f"({len(unknown)}): {', '.join(sorted(unknown))}."
            )
        if tied and "feature_extractor.word_embeddings.weight" in renamed:
            renamed["head.decoder.weight"] = renamed["feature_extractor.word_embeddings.weight"]
        load_strict(model, renamed, self.architecture)
        files = _read_side_files(config.get("_name_or_path"))
        if files:
            model.tokenizer_files = files
        return model

    # -- export ---------------------------------------------------------------------------

    def to_hf(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, Tensor]]:
        head = getattr(model, "head", None)
        config = self._hf_config(model.feature_extractor, model.encoder, head)
        skip_decoder = self.head_name in ("masked_lm", "causal_lm") and config.get("tie_word_embeddings", True)
        state: dict[str, Tensor] = {}
        for name, tensor in model.state_dict().items():
            if name.startswith("head."):
                if skip_decoder and name == "head.decoder.weight":
                    continue
                theirs = rename_weight(name, self.head_renames, to_hf=True)
            else:
                if name.startswith("encoder.pooler.") and not self.uses_pooler:
                    continue  # HF builds this class without the pooler
                theirs = rename_weight(name, RENAMES, to_hf=True)
                if theirs is not None and self.prefixed:
                    theirs = BACKBONE_PREFIX + theirs
            if theirs is None:
                raise SpecError(f"{self.architecture} export: no Hugging Face name for d2v weight '{name}'.")
            state[theirs] = tensor.detach().clone().contiguous()
        if model.feature_extractor.token_type_embeddings is None:
            # type_vocab_size 0 (fairseq's data2vec): HF always has the table; one zero row adds nothing
            name = (BACKBONE_PREFIX if self.prefixed else "") + "embeddings.token_type_embeddings.weight"
            state[name] = model.feature_extractor.word_embeddings.weight.new_zeros(1, config["hidden_size"])
        return config, state

    def _hf_config(self, feature_extractor: nn.Module, encoder: nn.Module, head: nn.Module | None) -> dict[str, Any]:
        if not _is_text_backbone(feature_extractor, encoder):
            raise SpecError(
                f"{self.architecture} export needs the text.embeddings feature extractor and the text.transformer "
                f"encoder, got {type(feature_extractor).__name__} and {type(encoder).__name__}."
            )
        fe, enc = feature_extractor.hparams, encoder.hparams
        for key in ("layer_norm_eps", "dropout", "initializer_range"):
            if fe[key] != enc[key]:
                raise SpecError(f"Hugging Face has one {key}; the embeddings use {fe[key]} and the encoder "
                                f"{enc[key]}. Set both to the same value before exporting.")
        config: dict[str, Any] = {
            "vocab_size": fe["vocab_size"],
            "hidden_size": enc["dim"],
            "num_hidden_layers": enc["layers"],
            "num_attention_heads": enc["heads"],
            "intermediate_size": enc["ffn_dim"],
            "hidden_act": enc["activation"],
            "hidden_dropout_prob": enc["dropout"],
            "attention_probs_dropout_prob": enc["attention_dropout"],
            "max_position_embeddings": fe["max_position_embeddings"],
            "type_vocab_size": max(1, int(fe["type_vocab_size"])),
            "initializer_range": enc["initializer_range"],
            "layer_norm_eps": enc["layer_norm_eps"],
            "pad_token_id": fe["padding_idx"],
            "bos_token_id": HF_DEFAULTS["bos_token_id"],
            "eos_token_id": HF_DEFAULTS["eos_token_id"],
            "use_cache": bool(enc["use_cache"]),
            "is_decoder": bool(enc["is_decoder"]),
            "add_cross_attention": bool(enc["add_cross_attention"]),
        }
        # without a pooler, config.json says nothing: transformers reads no add_pooling_layer from it
        # (it builds a random pooler), and one there would swallow from_pretrained(DIR, add_pooling_layer=False)
        config.update(self._head_config(head, config))
        return {"model_type": "data2vec-text", "architectures": [self.architecture], **config}

    def _head_config(self, head: nn.Module | None, backbone: dict[str, Any]) -> dict[str, Any]:
        if self.head_class is None:
            if head is not None:
                raise SpecError(f"{self.architecture} export is for a model without a head, got {type(head).__name__}.")
            return {}
        if type(head).__name__ != self.head_class or not hasattr(head, "hf_config"):
            raise SpecError(f"{self.architecture} export needs a {self.head_name} head, got {type(head).__name__}.")
        fields = dict(head.hf_config())
        if fields.get("is_decoder") and not backbone["is_decoder"]:
            fields.pop("is_decoder")  # HF runs ForCausalLM bidirectionally too when is_decoder is false
        for key, value in fields.items():
            if key in backbone and backbone[key] != value:
                raise SpecError(f"{self.architecture} export: the {self.head_name} head sets {key}={value!r} but the "
                                f"backbone has {backbone[key]!r}; Hugging Face has one {key}, make them equal.")
        return fields

    def extra_files(self, model: nn.Module) -> dict[str, str | bytes]:
        """The tokenizer files imported with the model, or found beside the d2v checkpoint it was
        loaded from (``checkpoint_directory``, set by ``d2v convert``)."""
        files = dict(getattr(model, "tokenizer_files", None) or {})
        for name, data in _read_side_files(getattr(model, "checkpoint_directory", None)).items():
            files.setdefault(name, data)
        return files

    def export_notes(self, model: nn.Module) -> list[str]:
        """What ``d2v convert --to hf`` reports about the export: a bare model without a pooler
        (data2vec text is pretrained without one) cannot say so in config.json."""
        if self.head_class is not None or model.encoder.pooler is not None:
            return []
        return [NO_POOLER_NOTE]

    def exports(self, model: nn.Module) -> bool:
        """Whether this converter is the right one to export ``model`` (used by ``d2v convert``)."""
        head = getattr(model, "head", None)
        if not _is_text_backbone(getattr(model, "feature_extractor", None), getattr(model, "encoder", None)):
            return False
        return head is None if self.head_class is None else type(head).__name__ == self.head_class


class _TextLMConverter(TextModelConverter):
    head_renames = LM_HEAD_RENAMES
    uses_pooler = False
    prefixed = True

    def head_fields(self, config: dict[str, Any]) -> dict[str, Any]:
        # HF's Data2VecTextLMHead applies gelu whatever hidden_act is
        return {"layer_norm_eps": config["layer_norm_eps"], "activation": "gelu",
                "tie_word_embeddings": bool(config["tie_word_embeddings"])}


class TextMaskedLMConverter(_TextLMConverter):
    """``Data2VecTextForMaskedLM`` <-> ``TaskModel(..., MaskedLMHead)`` (decoder tied to the word embeddings)."""

    architecture = "Data2VecTextForMaskedLM"
    hf_forward = keyword_table(*INPUTS, *DECODER_INPUTS, "labels", **REFUSED)
    head_name = "masked_lm"
    head_class = "MaskedLMHead"


class TextCausalLMConverter(_TextLMConverter):
    """``Data2VecTextForCausalLM`` <-> ``TaskModel(..., CausalLMHead)``; the encoder follows the
    config's ``is_decoder`` / ``add_cross_attention`` (HF runs it bidirectionally when
    ``is_decoder`` is false, and so does d2v)."""

    architecture = "Data2VecTextForCausalLM"
    hf_forward = keyword_table(*INPUTS, *DECODER_INPUTS, "labels", "cache", "use_cache",
                               "logits_to_keep", **REFUSED)
    head_name = "causal_lm"
    head_class = "CausalLMHead"

    def hf_batch(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """HF's call: with labels the cache is off; without labels there is no loss (the d2v head
        would score the inputs themselves; ``PretrainedModel`` drops it) and a decoder returns its
        cache. ``use_cache`` in the batch tells the head it is generating, so it skips that loss;
        only a decoder builds a cache from it."""
        if batch.get("labels") is not None:
            return {**batch, "use_cache": False}
        if batch.get("use_cache") is None:
            return {**batch, "use_cache": bool(model.encoder.use_cache or not model.encoder.is_decoder)}
        return batch


class TextSequenceClassificationConverter(TextModelConverter):
    """``Data2VecTextForSequenceClassification`` <-> ``TaskModel(..., TextClassificationHead)``."""

    architecture = "Data2VecTextForSequenceClassification"
    hf_forward = keyword_table(*INPUTS, "labels", **REFUSED)
    head_name = "text_classification"
    head_class = "TextClassificationHead"
    head_renames = [("head.dense.", "classifier.dense."), ("head.out_proj.", "classifier.out_proj.")]
    uses_pooler = False
    prefixed = True

    def head_fields(self, config: dict[str, Any]) -> dict[str, Any]:
        names = _label_names(config)
        dropout = config["classifier_dropout"]
        return {"problem_type": config.get("problem_type"),
                "classifier_dropout": config["hidden_dropout_prob"] if dropout is None else dropout,
                **({"label_names": names} if names else {"num_labels": _num_labels(config)})}


class TextMultipleChoiceConverter(TextModelConverter):
    """``Data2VecTextForMultipleChoice`` <-> ``TaskModel(..., MultipleChoiceHead)``; the encoder
    keeps its pooler (HF's ``data2vec_text.pooler``)."""

    architecture = "Data2VecTextForMultipleChoice"
    hf_forward = keyword_table("input_ids", "token_type_ids", "attention_mask", "labels", "position_ids",
                               "inputs_embeds", **REFUSED)
    head_name = "multiple_choice"
    head_class = "MultipleChoiceHead"
    head_renames = [("head.classifier.", "classifier.")]
    uses_pooler = True
    prefixed = True

    def head_fields(self, config: dict[str, Any]) -> dict[str, Any]:
        return {"hidden_dropout_prob": config["hidden_dropout_prob"]}


class TextTokenClassificationConverter(TextModelConverter):
    """``Data2VecTextForTokenClassification`` <-> ``TaskModel(..., TokenClassificationHead)``.

    The entity metrics need the tag meaning "no entity": ``O`` when the labels have it, else
    the first label (set ``model.head.outside_label`` in a spec to change it)."""

    architecture = "Data2VecTextForTokenClassification"
    hf_forward = keyword_table(*INPUTS, "labels", **REFUSED)
    head_name = "token_classification"
    head_class = "TokenClassificationHead"
    head_renames = [("head.classifier.", "classifier.")]
    uses_pooler = False
    prefixed = True

    def head_fields(self, config: dict[str, Any]) -> dict[str, Any]:
        names = _label_names(config)
        dropout = config["classifier_dropout"]
        fields: dict[str, Any] = {"classifier_dropout": config["hidden_dropout_prob"] if dropout is None else dropout}
        if names:
            fields.update(label_names=names, outside_label="O" if "O" in names else names[0])
        else:
            fields["num_labels"] = _num_labels(config)
        return fields


class TextQuestionAnsweringConverter(TextModelConverter):
    """``Data2VecTextForQuestionAnswering`` <-> ``TaskModel(..., QuestionAnsweringHead)``; the
    outputs are ``loss, start_logits, end_logits`` as HF's ``QuestionAnsweringModelOutput``."""

    architecture = "Data2VecTextForQuestionAnswering"
    hf_forward = keyword_table(*INPUTS, "start_positions", "end_positions", **REFUSED)
    head_name = "question_answering"
    head_class = "QuestionAnsweringHead"
    head_renames = [("head.qa_outputs.", "qa_outputs.")]
    uses_pooler = False
    prefixed = True

    def head_fields(self, config: dict[str, Any]) -> dict[str, Any]:
        if _num_labels(config) != 2:
            raise SpecError(f"Data2VecTextForQuestionAnswering needs num_labels=2 (start and end logits), "
                            f"got {_num_labels(config)}.")
        return {}

    def hf_outputs(self, out: Any) -> dict[str, Any]:
        extras = getattr(out.head_output, "extras", None) or {}
        return {"loss": out.loss, "start_logits": extras.get("start_logits"), "end_logits": extras.get("end_logits")}
