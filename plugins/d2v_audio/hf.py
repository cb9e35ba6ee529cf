"""Hugging Face ``Data2VecAudio*`` checkpoint import and export: the bare model, ``ForCTC``,
``ForSequenceClassification``, ``ForAudioFrameClassification`` and ``ForXVector``.

The converters are registered as ``hf_converter`` components named after the Hugging Face
architecture; :func:`d2v.interop.hf.from_pretrained` and ``PretrainedModel.save_pretrained`` pick one
by the ``architectures[0]`` of a ``config.json``. Each offers:

* ``hf_config_to_spec(config)``: the d2v ``model:`` spec section equivalent to an HF config;
* ``from_hf(config, state_dict)``: the d2v-native model with the weights loaded (strict);
* ``to_hf(model)``: ``(config, state_dict)`` that ``transformers`` loads.

The weight names differ only where d2v names things its own way; :data:`RENAMES` is the whole
mapping. No ``transformers`` import is needed (the config defaults are written out below).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from d2v.api.errors import SpecError
from d2v.interop.hf import (check_supported, config_label_names, exports_parts, full_config, head_hf_config,
                            hf_weight_name, hf_weight_names, keyword_table, load_strict, read_side_json)
from d2v.nn.layers import ACTIVATIONS
from d2v.spec.model import TaskModel, build_task_model
from d2v.api.plugins import registry

#: ``Data2VecAudioConfig`` defaults (transformers 5); a saved ``config.json`` holds only the
#: values that differ from these.
HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout": 0.1,
    "activation_dropout": 0.1,
    "attention_dropout": 0.1,
    "feat_proj_dropout": 0.0,
    "final_dropout": 0.1,
    "layerdrop": 0.1,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-5,
    "feat_extract_activation": "gelu",
    "conv_dim": [512, 512, 512, 512, 512, 512, 512],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_bias": False,
    "num_conv_pos_embedding_groups": 16,
    "conv_pos_kernel_size": 19,
    "num_conv_pos_embeddings": 5,
    "mask_time_prob": 0.05,
    "mask_time_length": 10,
    "mask_time_min_masks": 2,
    "mask_feature_prob": 0.0,
    "mask_feature_length": 10,
    "mask_feature_min_masks": 0,
    "ctc_loss_reduction": "sum",
    "ctc_zero_infinity": False,
    "use_weighted_layer_sum": False,
    "classifier_proj_size": 256,
    "tdnn_dim": [512, 512, 512, 512, 1500],
    "tdnn_kernel": [5, 3, 3, 1, 1],
    "tdnn_dilation": [1, 2, 3, 1, 1],
    "xvector_output_dim": 512,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "add_adapter": False,
    "adapter_kernel_size": 3,
    "adapter_stride": 2,
    "num_adapter_layers": 3,
    "output_hidden_size": None,
    "apply_spec_augment": True,
}

#: fields the model reads with ``getattr`` (not ``Data2VecAudioConfig`` fields): null is allowed there
NOT_CONFIG_FIELDS = ("apply_spec_augment",)

BACKBONE_PREFIX = "data2vec_audio."
#: the classes of audio.conv and audio.transformer (other modalities' components also have ``hparams``)
BACKBONE_CLASSES = ("ConvFeatureExtractor", "AudioTransformerEncoder")

#: (d2v name, Hugging Face name) of the backbone; ``{i}`` is a layer index.
RENAMES: list[tuple[str, str]] = [
    ("feature_extractor.conv_layers.{i}.conv.", "feature_extractor.conv_layers.{i}.conv."),
    ("feature_extractor.conv_layers.{i}.norm.", "feature_extractor.conv_layers.{i}.layer_norm."),
    ("feature_extractor.norm.", "feature_projection.layer_norm."),
    ("feature_extractor.proj.", "feature_projection.projection."),
    ("encoder.mask_embedding", "masked_spec_embed"),
    ("encoder.pos_conv.layers.{i}.conv.", "encoder.pos_conv_embed.layers.{i}.conv."),
    ("encoder.layer_norm.", "encoder.layer_norm."),
    ("encoder.layers.{i}.attention.", "encoder.layers.{i}.attention."),
    ("encoder.layers.{i}.attention_norm.", "encoder.layers.{i}.layer_norm."),
    ("encoder.layers.{i}.ffn.fc1.", "encoder.layers.{i}.feed_forward.intermediate_dense."),
    ("encoder.layers.{i}.ffn.fc2.", "encoder.layers.{i}.feed_forward.output_dense."),
    ("encoder.layers.{i}.ffn_norm.", "encoder.layers.{i}.final_layer_norm."),
    ("encoder.adapter.", "adapter."),
]
#: the CTC head's linear (``head.proj``) is ``lm_head`` at the top level of ``*ForCTC``
HEAD_RENAMES: list[tuple[str, str]] = [("head.proj.", "lm_head.")]


def audio_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with ``Data2VecAudioConfig``'s defaults filled in (see :func:`d2v.interop.hf.full_config`)."""
    return full_config(config, HF_DEFAULTS, nullable=NOT_CONFIG_FIELDS)


def _backbone_spec(config: dict[str, Any]) -> dict[str, Any]:
    c = audio_config(config)
    check_supported("Data2VecAudio", c, feat_extract_activation=("gelu",), hidden_act=ACTIVATIONS)
    dim = c["hidden_size"]
    output_hidden_size = c.get("output_hidden_size")
    return {
        "feature_extractor": {
            "name": "audio.conv",
            "conv_dim": list(c["conv_dim"]),
            "conv_kernel": list(c["conv_kernel"]),
            "conv_stride": list(c["conv_stride"]),
            "conv_bias": bool(c["conv_bias"]),
            "activation": c["feat_extract_activation"],
            "dim": dim,
            "feat_proj_dropout": c["feat_proj_dropout"],
            "layer_norm_eps": c["layer_norm_eps"],
        },
        "encoder": {
            "name": "audio.transformer",
            "dim": dim,
            "layers": c["num_hidden_layers"],
            "heads": c["num_attention_heads"],
            "ffn_dim": c["intermediate_size"],
            "activation": c["hidden_act"],
            "dropout": c["hidden_dropout"],
            "attention_dropout": c["attention_dropout"],
            "activation_dropout": c["activation_dropout"],
            "layerdrop": c["layerdrop"],
            "layer_norm_eps": c["layer_norm_eps"],
            "num_pos_conv_layers": c["num_conv_pos_embeddings"],
            "pos_conv_kernel": c["conv_pos_kernel_size"],
            "pos_conv_groups": c["num_conv_pos_embedding_groups"],
            "mask_time_prob": c["mask_time_prob"],
            "mask_time_length": c["mask_time_length"],
            "mask_time_min_masks": c["mask_time_min_masks"],
            "mask_feature_prob": c["mask_feature_prob"],
            "mask_feature_length": c["mask_feature_length"],
            "mask_feature_min_masks": c["mask_feature_min_masks"],
            "apply_spec_augment": bool(c["apply_spec_augment"]),
            "add_adapter": bool(c["add_adapter"]),
            "adapter_kernel_size": c["adapter_kernel_size"],
            "adapter_stride": c["adapter_stride"],
            "num_adapter_layers": c["num_adapter_layers"],
            # HF fills output_hidden_size with hidden_size; None means "the encoder width"
            "output_hidden_size": None if output_hidden_size in (None, dim) else output_hidden_size,
            # data2vec 2.0 audio options Hugging Face's Data2VecAudio does not have: off
            "alibi": False, "alibi_scale_init": 1.0, "alibi_learned_scale": True, "alibi_scale_per_head": True,
            "alibi_scale_per_layer": False, "zero_padded_frames": True, "padding_free": False,
        },
    }


def _placeholder_vocab(config: dict[str, Any]) -> list[str]:
    """Tokens for a checkpoint without ``vocab.json``: the specials at their configured ids
    (``<pad>`` = the CTC blank at ``pad_token_id``), ``<k>`` for every other id ``k``."""
    tokens = [f"<{k}>" for k in range(config["vocab_size"])]
    for key, token in (("pad_token_id", "<pad>"), ("bos_token_id", "<s>"), ("eos_token_id", "</s>")):
        token_id = config.get(key)
        if isinstance(token_id, int) and 0 <= token_id < len(tokens) and token not in tokens:
            tokens[token_id] = token
    return tokens


def _ctc_vocab(config: dict[str, Any]) -> str | list[str]:
    """The head's vocabulary: the checkpoint's ``vocab.json`` when it has one of the right
    size, else placeholders (decoding then shows ids, the logits and loss are unaffected)."""
    if config.get("_name_or_path"):
        try:
            vocab = read_side_json(config, "vocab.json")
        except (OSError, ValueError):
            vocab = None
        if isinstance(vocab, (dict, list)) and len(vocab) == config["vocab_size"]:
            return str(Path(config["_name_or_path"]) / "vocab.json")
    return _placeholder_vocab(config)


class AudioModelConverter:
    """``Data2VecAudioModel`` <-> ``TaskModel(feature_extractor, encoder, head=None)``."""

    architecture = "Data2VecAudioModel"
    head_class: str | None = None
    head_renames: list[tuple[str, str]] = []
    #: ``Data2VecAudioModel.forward``'s parameters (the drop-in's call, see :func:`d2v.interop.hf.check_keywords`)
    hf_forward = keyword_table("input_values", "attention_mask", "mask_time_indices")

    # -- config ---------------------------------------------------------------------------

    def hf_config_to_spec(self, config: dict[str, Any]) -> dict[str, Any]:
        return _backbone_spec(config)

    def processor_spec(self, config: dict[str, Any]) -> dict[str, Any]:
        """The ``data.processor`` for this checkpoint (``d2v predict``): the rate and normalisation
        of its ``preprocessor_config.json`` (``Wav2Vec2FeatureExtractor``), else 16 kHz, normalised."""
        settings = read_side_json(config, "preprocessor_config.json") or {}
        return {"name": "audio", "sample_rate": int(settings.get("sampling_rate", 16000)),
                "normalize": bool(settings.get("do_normalize", True))}

    def head_config(self, head: nn.Module | None) -> dict[str, Any]:
        return {}

    def hf_batch(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """Hugging Face applies ``mask_time_indices`` only with ``apply_spec_augment`` (d2v's
        encoder applies an explicit mask always: self-supervised students need it)."""
        if not model.encoder.apply_spec_augment:
            batch = {k: v for k, v in batch.items() if k != "mask"}
        return batch

    # -- import ---------------------------------------------------------------------------

    def build(self, config: dict[str, Any]) -> TaskModel:
        return build_task_model(self.hf_config_to_spec(config), registry())

    def from_hf(self, config: dict[str, Any], state_dict: dict[str, Tensor]) -> TaskModel:
        model = self.build(config)
        renamed = hf_weight_names(state_dict, self.architecture, RENAMES, self.head_renames, prefix=BACKBONE_PREFIX)
        # HF only creates the mask embedding when SpecAugment is on; keep ours otherwise
        if "encoder.mask_embedding" not in renamed:
            renamed["encoder.mask_embedding"] = model.encoder.mask_embedding.detach().clone()
        load_strict(model, renamed, self.architecture)
        return model

    # -- export ---------------------------------------------------------------------------

    def to_hf(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, Tensor]]:
        feature_extractor, encoder = model.feature_extractor, model.encoder
        head = getattr(model, "head", None)
        config = self._hf_config(feature_extractor, encoder, head)
        with_mask_embedding = config["mask_time_prob"] > 0 or config["mask_feature_prob"] > 0
        prefix = BACKBONE_PREFIX if self.head_renames else ""
        state: dict[str, Tensor] = {}
        for name, tensor in model.state_dict().items():
            theirs = hf_weight_name(name, self.architecture, RENAMES, self.head_renames, prefix=prefix)
            if theirs.endswith("masked_spec_embed") and not with_mask_embedding:
                continue
            state[theirs] = tensor.detach().clone().contiguous()
        return config, state

    def _hf_config(self, feature_extractor: nn.Module, encoder: nn.Module, head: nn.Module | None) -> dict[str, Any]:
        fe = getattr(feature_extractor, "hparams", None)
        enc = getattr(encoder, "hparams", None)
        if fe is None or enc is None:
            raise SpecError(
                f"{self.architecture} export needs the audio.conv feature extractor and the "
                f"audio.transformer encoder, got {type(feature_extractor).__name__} and {type(encoder).__name__}."
            )
        if fe["dim"] != enc["dim"]:
            raise SpecError(f"feature extractor width {fe['dim']} differs from encoder width {enc['dim']}.")
        if enc.get("alibi", False) or not enc.get("zero_padded_frames", True):
            raise SpecError(
                f"{self.architecture} export: this encoder is data2vec 2.0 audio (alibi={enc.get('alibi', False)}, "
                f"zero_padded_frames={enc.get('zero_padded_frames', True)}); Hugging Face's Data2VecAudio has no ALiBi "
                "attention biases and always zeroes padded frames, so the exported model would compute something "
                "else. Keep the d2v checkpoint (d2v convert --to d2v) instead of exporting to Hugging Face."
            )
        config = full_config(
            {
                "hidden_size": enc["dim"],
                "num_hidden_layers": enc["layers"],
                "num_attention_heads": enc["heads"],
                "intermediate_size": enc["ffn_dim"],
                "hidden_act": enc["activation"],
                "hidden_dropout": enc["dropout"],
                "attention_dropout": enc["attention_dropout"],
                "activation_dropout": enc["activation_dropout"],
                "layerdrop": encoder.layerdrop,
                "layer_norm_eps": enc["layer_norm_eps"],
                "num_conv_pos_embeddings": enc["num_pos_conv_layers"],
                "conv_pos_kernel_size": enc["pos_conv_kernel"],
                "num_conv_pos_embedding_groups": enc["pos_conv_groups"],
                "mask_time_prob": encoder.mask_time_prob,
                "mask_time_length": encoder.mask_time_length,
                "mask_time_min_masks": encoder.mask_time_min_masks,
                "mask_feature_prob": encoder.mask_feature_prob,
                "mask_feature_length": encoder.mask_feature_length,
                "mask_feature_min_masks": encoder.mask_feature_min_masks,
                "conv_dim": list(fe["conv_dim"]),
                "conv_kernel": list(fe["conv_kernel"]),
                "conv_stride": list(fe["conv_stride"]),
                "conv_bias": bool(fe["conv_bias"]),
                "feat_extract_activation": fe["activation"],
                "feat_proj_dropout": fe["feat_proj_dropout"],
                "apply_spec_augment": encoder.apply_spec_augment,
                "add_adapter": encoder.adapter is not None,
                "adapter_kernel_size": enc["adapter_kernel_size"],
                "adapter_stride": enc["adapter_stride"],
                "num_adapter_layers": enc["num_adapter_layers"],
                "output_hidden_size": encoder.output_dim,
            },
            HF_DEFAULTS,
        )
        if fe["layer_norm_eps"] != enc["layer_norm_eps"]:
            raise SpecError(
                f"Hugging Face has one layer_norm_eps; the feature extractor uses {fe['layer_norm_eps']} "
                f"and the encoder {enc['layer_norm_eps']}."
            )
        if fe["activation"] != "gelu":
            raise SpecError(f"Hugging Face's positional conv shares feat_extract_activation; export needs 'gelu', got {fe['activation']!r}.")
        config.update(self.head_config(head))
        return {"model_type": "data2vec-audio", "architectures": [self.architecture], **config}

    def extra_files(self, model: nn.Module) -> dict[str, str]:
        """Files written next to ``config.json`` on export (none for the bare model)."""
        return {}

    def exports(self, model: nn.Module) -> bool:
        """Whether this converter is the right one to export ``model`` (used by ``d2v convert``)."""
        return exports_parts(model, *BACKBONE_CLASSES, self.head_class)


class AudioCTCConverter(AudioModelConverter):
    """``Data2VecAudioForCTC`` <-> ``TaskModel(feature_extractor, encoder, CTCHead)``."""

    architecture = "Data2VecAudioForCTC"
    head_class = "CTCHead"
    head_renames = HEAD_RENAMES
    hf_forward = keyword_table("input_values", "attention_mask", "labels")

    def hf_config_to_spec(self, config: dict[str, Any]) -> dict[str, Any]:
        spec = _backbone_spec(config)
        c = audio_config(config)  # a null vocab_size is refused there, as transformers does
        spec["head"] = {
            "name": "ctc",
            "vocab": _ctc_vocab(c),
            "final_dropout": c["final_dropout"],
            "ctc_loss_reduction": c["ctc_loss_reduction"],
            "ctc_zero_infinity": bool(c["ctc_zero_infinity"]),
        }
        return spec

    def build(self, config: dict[str, Any]) -> TaskModel:
        model = super().build(config)
        blank = getattr(model.head, "blank_id", None)
        pad = audio_config(config)["pad_token_id"]
        if blank is not None and blank != pad:
            raise SpecError(
                f"Data2VecAudioForCTC: the CTC blank is pad_token_id={pad}, but the vocabulary puts <pad> at {blank}."
            )
        return model

    def head_config(self, head: nn.Module | None) -> dict[str, Any]:
        if head is None or not hasattr(head, "hf_config"):
            raise SpecError(f"Data2VecAudioForCTC export needs a CTC head (with hf_config()), got {type(head).__name__}.")
        return head.hf_config()

    def extra_files(self, model: nn.Module) -> dict[str, str]:
        vocab = getattr(model.head, "vocab", None)
        return {"vocab.json": vocab.to_json() + "\n"} if hasattr(vocab, "to_json") else {}


# --------------------------------------------------------------------------- task heads


class _AudioHeadConverter(AudioModelConverter):
    """Shared by the task-head converters: the head's fields come from ``head.hf_config()``
    and its weights keep Hugging Face's names at the top level (see ``head_renames``)."""

    head_name = ""
    head_class = ""
    reject_adapter = False
    hf_forward = keyword_table("input_values", "attention_mask", "labels")

    def hf_config_to_spec(self, config: dict[str, Any]) -> dict[str, Any]:
        c = audio_config(config)
        if self.reject_adapter and c.get("add_adapter"):
            raise SpecError(f"{self.architecture} does not support add_adapter=True (transformers refuses it too); "
                            f"set add_adapter to false in config.json.")
        spec = _backbone_spec(config)
        spec["head"] = {"name": self.head_name, "label_names": config_label_names(c),
                        "use_weighted_layer_sum": bool(c["use_weighted_layer_sum"]), **self.head_fields(c)}
        return spec

    def head_fields(self, config: dict[str, Any]) -> dict[str, Any]:
        return {}

    def head_config(self, head: nn.Module | None) -> dict[str, Any]:
        return head_hf_config(self.architecture, head, self.head_class, self.head_name)


class AudioSequenceClassificationConverter(_AudioHeadConverter):
    """``Data2VecAudioForSequenceClassification`` <-> ``TaskModel(..., AudioClassificationHead)``."""

    architecture = "Data2VecAudioForSequenceClassification"
    head_name = "audio_classification"
    head_class = "AudioClassificationHead"
    reject_adapter = True
    head_renames = [("head.layer_weights", "layer_weights"), ("head.projector.", "projector."),
                    ("head.classifier.", "classifier.")]

    def head_fields(self, config: dict[str, Any]) -> dict[str, Any]:
        return {"classifier_proj_size": config["classifier_proj_size"]}


class AudioFrameClassificationConverter(_AudioHeadConverter):
    """``Data2VecAudioForAudioFrameClassification`` <-> ``TaskModel(..., AudioFrameClassificationHead)``.

    The imported head uses Hugging Face's loss (``loss: cross_entropy``: softmax against the
    argmax of each label row); switch to ``bce`` for multi-label training, the weights are the same.
    """

    architecture = "Data2VecAudioForAudioFrameClassification"
    head_name = "audio_frame_classification"
    head_class = "AudioFrameClassificationHead"
    reject_adapter = True
    head_renames = [("head.layer_weights", "layer_weights"), ("head.classifier.", "classifier.")]

    def head_fields(self, config: dict[str, Any]) -> dict[str, Any]:
        return {"loss": "cross_entropy"}


class AudioXVectorConverter(_AudioHeadConverter):
    """``Data2VecAudioForXVector`` <-> ``TaskModel(..., XVectorHead)``; ``embeddings`` is one of
    the outputs, as in Hugging Face's ``XVectorOutput``."""

    architecture = "Data2VecAudioForXVector"
    head_name = "xvector"
    head_class = "XVectorHead"
    head_renames = [("head.layer_weights", "layer_weights"), ("head.projector.", "projector."),
                    ("head.tdnn.{i}.kernel.", "tdnn.{i}.kernel."), ("head.feature_extractor.", "feature_extractor."),
                    ("head.classifier.", "classifier."), ("head.objective.weight", "objective.weight")]

    def hf_config_to_spec(self, config: dict[str, Any]) -> dict[str, Any]:
        c = audio_config(config)
        if c.get("add_adapter"):
            output = c.get("output_hidden_size") or c["hidden_size"]
            if output != c["hidden_size"] or c["use_weighted_layer_sum"]:
                raise SpecError(
                    "Data2VecAudioForXVector with add_adapter=True works in transformers only when "
                    "output_hidden_size equals hidden_size and use_weighted_layer_sum is false (its projector reads "
                    "hidden_size features, and the layer sum mixes frame rates); fix config.json."
                )
        return super().hf_config_to_spec(config)

    def head_fields(self, config: dict[str, Any]) -> dict[str, Any]:
        return {"tdnn_dim": list(config["tdnn_dim"]), "tdnn_kernel": list(config["tdnn_kernel"]),
                "tdnn_dilation": list(config["tdnn_dilation"]), "xvector_output_dim": config["xvector_output_dim"]}

    def hf_outputs(self, out: Any) -> dict[str, Any]:
        extras = getattr(out.head_output, "extras", None) or {}
        return {"loss": out.loss, "logits": out.logits, "embeddings": extras.get("embeddings")}
