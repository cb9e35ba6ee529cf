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
from d2v.interop.hf import (check_supported, config_label_names, default_label_names, exports_parts, full_config,
                            has_backbone, head_hf_config, hf_weight_name, hf_weight_names, keyword_table, load_strict)
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
#: the classes of text.embeddings and text.transformer
BACKBONE_CLASSES = ("TextEmbeddings", "TextTransformerEncoder")

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


def _backbone_spec(c: dict[str, Any], *, pooler: bool) -> dict[str, Any]:
    check_supported("Data2VecText", c, hidden_act=ACTIVATIONS)
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


def _label_fields(config: dict[str, Any]) -> dict[str, Any]:
    """``label_names`` in id order, or ``num_labels`` alone when the names are HF's ``LABEL_i``
    defaults (the text heads then name no classes)."""
    names = config_label_names(config)
    return {"num_labels": len(names)} if names == default_label_names(len(names)) else {"label_names": names}


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
        c = full_config(config, HF_DEFAULTS)
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
                "max_length": int(full_config(config, HF_DEFAULTS)["max_position_embeddings"]) - 2}

    # -- import ---------------------------------------------------------------------------

    def build(self, config: dict[str, Any]) -> TaskModel:
        return build_task_model(self.hf_config_to_spec(config), registry())

    def _tied(self, config: dict[str, Any]) -> bool:
        return (self.head_name in ("masked_lm", "causal_lm")
                and bool(full_config(config, HF_DEFAULTS)["tie_word_embeddings"]))

    def from_hf(self, config: dict[str, Any], state_dict: dict[str, Tensor]) -> TaskModel:
        if self.architecture == "Data2VecTextModel" and not any(
                k.endswith("pooler.dense.weight") for k in state_dict):
            # saved with add_pooling_layer=False; remembered (privately: never written to a
            # config.json, see _hf_config) so that d2v convert's spec has no pooler either
            config["_add_pooling_layer"] = False
        model = self.build(config)
        tied = self._tied(config)
        derived = {name for name in state_dict
                   if name.removeprefix(BACKBONE_PREFIX) in DERIVED or (tied and name == "lm_head.decoder.weight")}
        kept = {name: tensor for name, tensor in state_dict.items() if name not in derived}
        renamed = hf_weight_names(kept, self.architecture, RENAMES, self.head_renames, prefix=BACKBONE_PREFIX)
        if tied and "feature_extractor.word_embeddings.weight" in renamed:
            renamed["head.decoder.weight"] = renamed["feature_extractor.word_embeddings.weight"]
        load_strict(model, renamed, self.architecture)
        files = _read_side_files(config.get("_name_or_path"))
        if files:
            model.tokenizer_files = files
        return model

    # -- export ---------------------------------------------------------------------------

    def to_hf(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, Tensor]]:
        config = self._hf_config(model)
        skip_decoder = self.head_name in ("masked_lm", "causal_lm") and config.get("tie_word_embeddings", True)
        prefix = BACKBONE_PREFIX if self.prefixed else ""
        state: dict[str, Tensor] = {}
        for name, tensor in model.state_dict().items():
            if skip_decoder and name == "head.decoder.weight":
                continue
            if name.startswith("encoder.pooler.") and not self.uses_pooler:
                continue  # HF builds this class without the pooler
            theirs = hf_weight_name(name, self.architecture, RENAMES, self.head_renames, prefix=prefix)
            state[theirs] = tensor.detach().clone().contiguous()
        if model.feature_extractor.token_type_embeddings is None:
            # type_vocab_size 0 (fairseq's data2vec): HF always has the table; one zero row adds nothing
            name = prefix + "embeddings.token_type_embeddings.weight"
            state[name] = model.feature_extractor.word_embeddings.weight.new_zeros(1, config["hidden_size"])
        return config, state

    def _hf_config(self, model: nn.Module) -> dict[str, Any]:
        feature_extractor, encoder = model.feature_extractor, model.encoder
        if not has_backbone(model, *BACKBONE_CLASSES):
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
        config.update(self._head_config(getattr(model, "head", None), config))
        return {"model_type": "data2vec-text", "architectures": [self.architecture], **config}

    def _head_config(self, head: nn.Module | None, backbone: dict[str, Any]) -> dict[str, Any]:
        if self.head_class is None:
            if head is not None:
                raise SpecError(f"{self.architecture} export is for a model without a head, got {type(head).__name__}.")
            return {}
        fields = head_hf_config(self.architecture, head, self.head_class, self.head_name)
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
        return exports_parts(model, *BACKBONE_CLASSES, self.head_class)


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
        dropout = config["classifier_dropout"]
        return {"problem_type": config.get("problem_type"),
                "classifier_dropout": config["hidden_dropout_prob"] if dropout is None else dropout,
                **_label_fields(config)}


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
        dropout = config["classifier_dropout"]
        fields: dict[str, Any] = {"classifier_dropout": config["hidden_dropout_prob"] if dropout is None else dropout,
                                  **_label_fields(config)}
        names = fields.get("label_names")
        if names:
            fields["outside_label"] = "O" if "O" in names else names[0]
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
        count = len(config_label_names(config))
        if count != 2:
            raise SpecError(f"Data2VecTextForQuestionAnswering needs num_labels=2 (start and end logits), got {count}.")
        return {}

    def hf_outputs(self, out: Any) -> dict[str, Any]:
        extras = getattr(out.head_output, "extras", None) or {}
        return {"loss": out.loss, "start_logits": extras.get("start_logits"), "end_logits": extras.get("end_logits")}
