"""Hugging Face ``Data2VecVision*`` checkpoint import and export: the bare model,
``ForImageClassification`` and ``ForSemanticSegmentation`` (the converter contract is in
:mod:`d2v.interop.hf`).

The image processor's settings (``preprocessor_config.json``, Hugging Face's
``BeitImageProcessor`` fields) are written beside the weights on export, so
``AutoImageProcessor.from_pretrained(dir)`` works too. :data:`RENAMES` is the whole weight
mapping; the mask token is stored ``(1, 1, D)`` by Hugging Face and ``(D,)`` by d2v.
"""

from __future__ import annotations

import json
from typing import Any

from torch import Tensor, nn

from d2v.api.errors import SpecError
from d2v.interop.hf import (NO_ATTENTIONS, check_supported, config_label_names, exports_parts, full_config,
                            has_backbone, head_hf_config, hf_weight_name, hf_weight_names, keyword_table, load_strict,
                            read_side_json)
from d2v.nn.layers import ACTIVATIONS
from d2v.spec.model import TaskModel, build_task_model
from d2v.api.plugins import registry

#: ``Data2VecVisionConfig`` defaults (transformers 5)
HF_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
    "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
    "initializer_range": 0.02, "layer_norm_eps": 1e-12, "image_size": 224, "patch_size": 16, "num_channels": 3,
    "use_mask_token": False, "use_absolute_position_embeddings": False, "use_relative_position_bias": False,
    "use_shared_relative_position_bias": False, "layer_scale_init_value": 0.1, "drop_path_rate": 0.1,
    "use_mean_pooling": True, "out_indices": [3, 5, 7, 11], "pool_scales": [1, 2, 3, 6], "use_auxiliary_head": True,
    "auxiliary_loss_weight": 0.4, "auxiliary_channels": 256, "auxiliary_num_convs": 1,
    "auxiliary_concat_input": False, "semantic_loss_ignore_index": 255,
}

#: (d2v name, Hugging Face name) inside the backbone; ``{i}`` is a layer index; first match wins
RENAMES: list[tuple[str, str]] = [
    ("feature_extractor.cls_token", "embeddings.cls_token"),
    ("feature_extractor.projection.", "embeddings.patch_embeddings.projection."),
    ("encoder.mask_embedding", "embeddings.mask_token"),
    ("encoder.position_embeddings", "embeddings.position_embeddings"),
    ("encoder.relative_position_bias.table", "encoder.relative_position_bias.relative_position_bias_table"),
    ("encoder.layers.{i}.attention.relative_position_bias.table",
     "encoder.layer.{i}.attention.attention.relative_position_bias.relative_position_bias_table"),
    ("encoder.layers.{i}.attention.proj.", "encoder.layer.{i}.attention.output.dense."),
    ("encoder.layers.{i}.attention.", "encoder.layer.{i}.attention.attention."),
    ("encoder.layers.{i}.norm1.", "encoder.layer.{i}.layernorm_before."),
    ("encoder.layers.{i}.norm2.", "encoder.layer.{i}.layernorm_after."),
    ("encoder.layers.{i}.mlp.fc1.", "encoder.layer.{i}.intermediate.dense."),
    ("encoder.layers.{i}.mlp.fc2.", "encoder.layer.{i}.output.dense."),
    ("encoder.layers.{i}.lambda_", "encoder.layer.{i}.lambda_"),
    ("encoder.norm.", "layernorm."),
    ("encoder.pooler_norm.", "pooler.layernorm."),
]
BACKBONE_PREFIX = "data2vec_vision."
#: the classes of vision.patches and vision.transformer
BACKBONE_CLASSES = ("PatchEmbedding", "VisionTransformerEncoder")
#: the output options every ``Data2VecVision*.forward`` names after its inputs
OUTPUT_OPTIONS = ("output_attentions", "output_hidden_states", "interpolate_pos_encoding", "return_dict")


def _size(value: Any) -> int | list[int]:
    return value if isinstance(value, int) else [int(v) for v in value]


def backbone_spec(config: dict[str, Any], *, add_pooling_layer: bool) -> dict[str, Any]:
    c = full_config(config, HF_DEFAULTS)
    check_supported("Data2VecVision", c, hidden_act=ACTIVATIONS)
    return {
        "feature_extractor": {"name": "vision.patches", "dim": c["hidden_size"], "image_size": _size(c["image_size"]),
                              "patch_size": c["patch_size"], "num_channels": c["num_channels"],
                              "initializer_range": c["initializer_range"]},
        "encoder": {
            "name": "vision.transformer", "dim": c["hidden_size"], "layers": c["num_hidden_layers"],
            "heads": c["num_attention_heads"], "ffn_dim": c["intermediate_size"], "activation": c["hidden_act"],
            "dropout": c["hidden_dropout_prob"], "attention_dropout": c["attention_probs_dropout_prob"],
            "drop_path_rate": c["drop_path_rate"], "layer_norm_eps": c["layer_norm_eps"],
            "image_size": _size(c["image_size"]), "patch_size": c["patch_size"],
            "use_absolute_position_embeddings": bool(c["use_absolute_position_embeddings"]),
            "use_relative_position_bias": bool(c["use_relative_position_bias"]),
            "use_shared_relative_position_bias": bool(c["use_shared_relative_position_bias"]),
            "layer_scale_init_value": c["layer_scale_init_value"], "use_mean_pooling": bool(c["use_mean_pooling"]),
            "add_pooling_layer": add_pooling_layer, "initializer_range": c["initializer_range"],
        },
    }


class VisionModelConverter:
    """``Data2VecVisionModel`` <-> ``TaskModel(patches, transformer, head=None)`` (no pooler)."""

    architecture = "Data2VecVisionModel"
    hf_forward = keyword_table("pixel_values", "bool_masked_pos", *OUTPUT_OPTIONS, output_attentions=NO_ATTENTIONS)
    head_class: str | None = None
    head_name: str | None = None
    add_pooling_layer = False
    #: (d2v name, HF name) of the head's weights, at the top level of the HF class
    head_renames: list[tuple[str, str]] = []

    def hf_config_to_spec(self, config: dict[str, Any]) -> dict[str, Any]:
        return backbone_spec(config, add_pooling_layer=self.add_pooling_layer)

    def processor_spec(self, config: dict[str, Any]) -> dict[str, Any]:
        """The ``data.processor`` for this checkpoint (``d2v predict``): its
        ``preprocessor_config.json`` (``BeitImageProcessor`` fields), else the model's image size
        with BEiT's defaults."""
        from d2v_vision.processor import PIL_RESAMPLE

        settings = read_side_json(config, "preprocessor_config.json") or {}
        image_size = full_config(config, HF_DEFAULTS)["image_size"]
        spec: dict[str, Any] = {"name": "image", "augment": False, "size": settings.get("size", image_size),
                                "crop_size": settings.get("crop_size", image_size)}
        for key in ("do_resize", "do_center_crop", "rescale_factor", "image_mean", "image_std"):
            if key in settings:
                spec[key] = settings[key]
        names = {number: name for name, number in PIL_RESAMPLE.items()}
        if settings.get("resample") in names:
            spec["resample"] = names[settings["resample"]]
        return spec

    def head_config(self, head: nn.Module | None) -> dict[str, Any]:
        if self.head_class is None:
            return {}
        return head_hf_config(self.architecture, head, self.head_class, self.head_name)

    def build(self, config: dict[str, Any]) -> TaskModel:
        return build_task_model(self.hf_config_to_spec(config), registry())

    def from_hf(self, config: dict[str, Any], state_dict: dict[str, Tensor]) -> TaskModel:
        model = self.build(config)
        own = model.state_dict()
        # relative_position_index: a buffer older checkpoints saved; recomputed
        kept = {name: tensor for name, tensor in state_dict.items() if "relative_position_index" not in name}
        renamed = hf_weight_names(kept, self.architecture, RENAMES, self.head_renames, prefix=BACKBONE_PREFIX)
        # Hugging Face has a mask token (1, 1, D) only with use_mask_token; keep d2v's otherwise
        mask = renamed.get("encoder.mask_embedding", own["encoder.mask_embedding"].clone())
        renamed["encoder.mask_embedding"] = mask.reshape(own["encoder.mask_embedding"].shape)
        load_strict(model, renamed, self.architecture)
        return model

    def to_hf(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, Tensor]]:
        if not has_backbone(model, *BACKBONE_CLASSES):
            raise SpecError(f"{self.architecture} export needs the vision.patches feature extractor and the "
                            f"vision.transformer encoder.")
        config = self.hf_config(model)
        state: dict[str, Tensor] = {}
        prefix = BACKBONE_PREFIX if self.head_class else ""
        for name, tensor in model.state_dict().items():
            theirs = hf_weight_name(name, self.architecture, RENAMES, self.head_renames, prefix=prefix)
            if name.startswith("encoder.pooler_norm") and not self.add_pooling_layer:
                continue
            if name == "encoder.mask_embedding":
                tensor = tensor.reshape(1, 1, -1)
            state[theirs] = tensor.detach().clone().contiguous()
        return config, state

    def hf_config(self, model: nn.Module) -> dict[str, Any]:
        fe, enc = model.feature_extractor.hparams, model.encoder.hparams
        if fe["dim"] != enc["dim"] or list(fe["image_size"]) != list(enc["image_size"]) or fe["patch_size"] != enc["patch_size"]:
            raise SpecError("Hugging Face has one hidden_size, image_size and patch_size; the feature extractor and the "
                            f"encoder disagree ({fe} vs {enc}).")
        image = enc["image_size"]
        config = full_config({
            "hidden_size": enc["dim"], "num_hidden_layers": enc["layers"], "num_attention_heads": enc["heads"],
            "intermediate_size": enc["ffn_dim"], "hidden_act": enc["activation"],
            "hidden_dropout_prob": enc["dropout"], "attention_probs_dropout_prob": enc["attention_dropout"],
            "initializer_range": enc["initializer_range"], "layer_norm_eps": enc["layer_norm_eps"],
            "image_size": image[0] if image[0] == image[1] else list(image), "patch_size": enc["patch_size"],
            "num_channels": fe["num_channels"], "use_mask_token": True,
            "use_absolute_position_embeddings": enc["use_absolute_position_embeddings"],
            "use_relative_position_bias": enc["use_relative_position_bias"],
            "use_shared_relative_position_bias": enc["use_shared_relative_position_bias"],
            "layer_scale_init_value": enc["layer_scale_init_value"], "drop_path_rate": enc["drop_path_rate"],
            "use_mean_pooling": enc["use_mean_pooling"],
        }, HF_DEFAULTS)
        config.update(self.head_config(getattr(model, "head", None)))
        return {"model_type": "data2vec-vision", "architectures": [self.architecture], **config}

    def hf_batch(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """Hugging Face's ``bool_masked_pos`` ``(B, patches)`` -> d2v's ``mask`` over CLS + patches;
        ``interpolate_pos_encoding`` needs nothing (every size is resized to)."""
        batch = dict(batch)
        batch.pop("interpolate_pos_encoding", None)
        masked = batch.pop("bool_masked_pos", None)
        if masked is not None:
            masked = masked.bool()
            batch["mask"] = masked.new_zeros(masked.shape[0], masked.shape[1] + 1)
            batch["mask"][:, 1:] = masked
        return batch

    def extra_files(self, model: nn.Module) -> dict[str, str]:
        """``preprocessor_config.json``: the model's image size with BEiT's defaults."""
        from d2v_vision.processor import ImageProcessor

        size = model.encoder.hparams["image_size"]
        processor = ImageProcessor(size=list(size), crop_size=list(size), do_center_crop=False)
        return {"preprocessor_config.json": json.dumps(processor.hf_config(), indent=2, sort_keys=True) + "\n"}

    def exports(self, model: nn.Module) -> bool:
        return exports_parts(model, *BACKBONE_CLASSES, self.head_class)

    def export_tensorflow(self, loaded: Any, out: str, *, format: str) -> Any:
        """``d2v export --tf-savedmodel/--tflite``: the ``TF`` twin of this architecture
        (:mod:`d2v_vision.tf`), written and checked against PyTorch."""
        from d2v_vision.tf import export_model

        return export_model(loaded, out, format=format)


class VisionImageClassificationConverter(VisionModelConverter):
    """``Data2VecVisionForImageClassification`` <-> ``TaskModel(..., ImageClassificationHead)``."""

    architecture = "Data2VecVisionForImageClassification"
    hf_forward = keyword_table("pixel_values", "labels", *OUTPUT_OPTIONS, output_attentions=NO_ATTENTIONS)
    head_class = "ImageClassificationHead"
    head_name = "image_classification"
    add_pooling_layer = True
    head_renames = [("head.classifier.", "classifier.")]

    def hf_config_to_spec(self, config: dict[str, Any]) -> dict[str, Any]:
        spec = super().hf_config_to_spec(config)
        spec["head"] = {"name": self.head_name, "label_names": config_label_names(config)}
        return spec


class VisionSemanticSegmentationConverter(VisionModelConverter):
    """``Data2VecVisionForSemanticSegmentation`` <-> ``TaskModel(..., SemanticSegmentationHead)``."""

    architecture = "Data2VecVisionForSemanticSegmentation"
    hf_forward = keyword_table("pixel_values", "labels", *OUTPUT_OPTIONS, output_attentions=NO_ATTENTIONS)
    head_class = "SemanticSegmentationHead"
    head_name = "semantic_segmentation"
    head_renames = [("head.", "")]

    def hf_config_to_spec(self, config: dict[str, Any]) -> dict[str, Any]:
        c = full_config(config, HF_DEFAULTS)
        spec = super().hf_config_to_spec(config)
        spec["head"] = {"name": self.head_name, "label_names": config_label_names(config),
                        **{k: c[k] for k in ("out_indices", "pool_scales", "use_auxiliary_head", "auxiliary_loss_weight",
                                             "auxiliary_channels", "auxiliary_num_convs", "auxiliary_concat_input",
                                             "semantic_loss_ignore_index")}}
        return spec
