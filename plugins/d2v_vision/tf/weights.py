"""From d2v's PyTorch data2vec-vision to its Keras twin: read the architecture off the PyTorch
model, build the Keras model, copy every tensor (never retrained).

``from_pretrained(DIR)`` takes what ``d2v predict`` and ``d2v export`` take: a d2v run
directory (its ``final/`` or newest checkpoint), a d2v checkpoint, or a Hugging Face
``Data2VecVision*`` checkpoint directory (loaded by d2v's own importers).

PyTorch -> Keras layouts: Linear ``(out, in)`` -> Dense ``(in, out)``; Conv2d ``(out, in, kh, kw)``
-> Conv2D ``(kh, kw, in, out)``; ConvTranspose2d ``(in, out, kh, kw)`` -> Conv2DTranspose
``(kh, kw, out, in)``; BatchNorm's running statistics -> ``moving_mean`` / ``moving_variance``.
"""

from __future__ import annotations

import os
import warnings

import keras
import numpy as np
import torch
from d2v.api.errors import SpecError
from torch import nn

from d2v_vision.tf.models import (
    Architecture,
    TFData2VecVisionForImageClassification,
    TFData2VecVisionForSemanticSegmentation,
    TFData2VecVisionModel,
)

SUPPORTED_ENCODER = "VisionTransformerEncoder"  # vision.transformer (data2vec 1.0 / BEiT)
HEADS = {None: TFData2VecVisionModel, "ImageClassificationHead": TFData2VecVisionForImageClassification,
         "SemanticSegmentationHead": TFData2VecVisionForSemanticSegmentation}


def _activation(mlp: nn.Module) -> str:
    act = mlp.activation
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    names = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Tanh: "tanh"}
    if type(act) not in names:
        raise SpecError(f"TensorFlow data2vec-vision: activation {type(act).__name__} is not supported "
                        f"(supported: gelu, gelu_new, relu, silu, tanh).")
    return names[type(act)]


def architecture_of(model: nn.Module) -> Architecture:
    """The options of a d2v ``TaskModel`` with a ``vision.patches`` + ``vision.transformer``
    backbone and no head, an ``image_classification`` or a ``semantic_segmentation`` head; a
    SpecError names whatever else is found."""
    encoder, extractor = getattr(model, "encoder", None), getattr(model, "feature_extractor", None)
    if type(encoder).__name__ != SUPPORTED_ENCODER or type(extractor).__name__ != "PatchEmbedding":
        raise SpecError(f"TensorFlow data2vec-vision needs the vision.patches + vision.transformer backbone "
                        f"(data2vec 1.0 vision); this model has {type(extractor).__name__} + "
                        f"{type(encoder).__name__}.")
    head = getattr(model, "head", None)
    head_name = None if head is None else type(head).__name__
    if head_name not in HEADS:
        raise SpecError(f"TensorFlow data2vec-vision: head {head_name} is not supported (supported: none, "
                        f"image_classification, semantic_segmentation).")
    first = encoder.layers[0] if len(encoder.layers) else None
    options = {
        "dim": encoder.dim, "layers": len(encoder.layers), "heads": first.attention.heads if first else 1,
        "ffn_dim": first.mlp.fc1.out_features if first else 4 * encoder.dim,
        "activation": _activation(first.mlp) if first else "gelu",
        "eps": (first.norm1.eps if first else 1e-12), "window": tuple(encoder.window), "patch_size": extractor.patch_size,
        "num_channels": extractor.num_channels, "absolute_positions": encoder.position_embeddings is not None,
        "shared_relative_bias": encoder.relative_position_bias is not None,
        "per_layer_relative_bias": bool(first is not None and first.attention.has_position_bias),
        "layer_scale": bool(first is not None and first.has_layer_scale), "mean_pooling": encoder.use_mean_pooling,
        "add_pooling_layer": encoder.add_pooling_layer,
    }
    if head_name == "ImageClassificationHead":
        options.update(num_labels=head.num_labels, label_names=tuple(head.label_names) if head.label_names else None)
        if not encoder.add_pooling_layer:
            raise SpecError("TensorFlow image classification needs the encoder's pooler (add_pooling_layer: true).")
    if head_name == "SemanticSegmentationHead":
        auxiliary = None
        if head.auxiliary_head is not None:
            aux = head.auxiliary_head
            auxiliary = {"channels": aux.classifier.in_channels, "num_convs": len(aux.convs),
                         "concat_input": aux.conv_cat is not None, "in_index": aux.in_index}
        options.update(num_labels=head.num_labels, label_names=tuple(head.label_names) if head.label_names else None,
                       segmentation={"out_indices": tuple(head.out_indices), "pool_scales": tuple(head.pool_scales),
                                     "auxiliary": auxiliary, "eps": head.fpn1[1].eps})
    return Architecture(**options)


# --------------------------------------------------------------------------- copying tensors


def _put(variable, value: torch.Tensor | np.ndarray, where: str) -> None:
    array = value.detach().cpu().float().numpy() if isinstance(value, torch.Tensor) else np.asarray(value, np.float32)
    if tuple(variable.shape) != array.shape:
        raise SpecError(f"TensorFlow data2vec-vision: {where} has shape {array.shape}, the Keras variable "
                        f"{variable.path} {tuple(variable.shape)}.")
    variable.assign(array)


def _dense(layer: keras.layers.Dense, linear: nn.Linear, where: str) -> None:
    _put(layer.kernel, linear.weight.T, f"{where}.weight")
    if linear.bias is not None:
        _put(layer.bias, linear.bias, f"{where}.bias")


def _conv(layer, conv: nn.Module, where: str) -> None:
    """Conv2d or ConvTranspose2d: both move their spatial axes first, keeping the other two."""
    _put(layer.kernel, conv.weight.permute(2, 3, 1, 0), f"{where}.weight")
    if conv.bias is not None:
        _put(layer.bias, conv.bias, f"{where}.bias")


def _norm(layer, norm: nn.Module, where: str) -> None:
    """LayerNorm or BatchNorm2d (with its running statistics)."""
    _put(layer.gamma, norm.weight, f"{where}.weight")
    _put(layer.beta, norm.bias, f"{where}.bias")
    if isinstance(norm, nn.BatchNorm2d):
        _put(layer.moving_mean, norm.running_mean, f"{where}.running_mean")
        _put(layer.moving_variance, norm.running_var, f"{where}.running_var")


def _conv_layer(layer, torch_layer: nn.Module, where: str) -> None:
    _conv(layer.convolution, torch_layer.convolution, f"{where}.convolution")
    _norm(layer.normalization, torch_layer.normalization, f"{where}.normalization")


def copy_backbone(keras_model: TFData2VecVisionModel, model: nn.Module) -> None:
    extractor, encoder = model.feature_extractor, model.encoder
    _conv(keras_model.embeddings.projection, extractor.projection, "feature_extractor.projection")
    _put(keras_model.embeddings.cls_token, extractor.cls_token, "feature_extractor.cls_token")
    tf_encoder = keras_model.encoder
    if encoder.position_embeddings is not None:
        _put(tf_encoder.position_embeddings, encoder.position_embeddings, "encoder.position_embeddings")
    if encoder.relative_position_bias is not None:
        _put(tf_encoder.shared_bias.table, encoder.relative_position_bias.table, "encoder.relative_position_bias")
    for i, (block, torch_block) in enumerate(zip(tf_encoder.blocks, encoder.layers)):
        where = f"encoder.layers.{i}"
        _norm(block.norm1, torch_block.norm1, f"{where}.norm1")
        _norm(block.norm2, torch_block.norm2, f"{where}.norm2")
        for name in ("query", "key", "value", "proj"):
            _dense(getattr(block.attention, name), getattr(torch_block.attention, name), f"{where}.attention.{name}")
        if torch_block.attention.has_position_bias:
            _put(block.attention.relative_position_bias.table, torch_block.attention.relative_position_bias.table,
                 f"{where}.attention.relative_position_bias")
        _dense(block.fc1, torch_block.mlp.fc1, f"{where}.mlp.fc1")
        _dense(block.fc2, torch_block.mlp.fc2, f"{where}.mlp.fc2")
        if torch_block.has_layer_scale:
            _put(block.lambda_1, torch_block.lambda_1, f"{where}.lambda_1")
            _put(block.lambda_2, torch_block.lambda_2, f"{where}.lambda_2")
    if tf_encoder.norm is not None:
        _norm(tf_encoder.norm, encoder.norm, "encoder.norm")
    if tf_encoder.pooler_norm is not None:
        _norm(tf_encoder.pooler_norm, encoder.pooler_norm, "encoder.pooler_norm")


def copy_segmentation_head(tf_head, head: nn.Module) -> None:
    _conv(tf_head.fpn1_up, head.fpn1[0], "head.fpn1.0")
    _norm(tf_head.fpn1_norm, head.fpn1[1], "head.fpn1.1")
    _conv(tf_head.fpn1_up2, head.fpn1[3], "head.fpn1.3")
    _conv(tf_head.fpn2_up, head.fpn2[0], "head.fpn2.0")
    decode, torch_decode = tf_head.decode_head, head.decode_head
    for i, (conv, block) in enumerate(zip(decode.psp_convs, torch_decode.psp_modules.blocks)):
        _conv_layer(conv, block.conv, f"head.decode_head.psp_modules.blocks.{i}.conv")
    _conv_layer(decode.psp_bottleneck, torch_decode.psp_bottleneck, "head.decode_head.psp_bottleneck")
    for name in ("lateral_convs", "fpn_convs"):
        for i, (conv, torch_conv) in enumerate(zip(getattr(decode, name), getattr(torch_decode, name))):
            _conv_layer(conv, torch_conv, f"head.decode_head.{name}.{i}")
    _conv_layer(decode.fpn_bottleneck, torch_decode.fpn_bottleneck, "head.decode_head.fpn_bottleneck")
    _conv(decode.classifier, torch_decode.classifier, "head.decode_head.classifier")
    if head.auxiliary_head is not None:
        aux, torch_aux = tf_head.auxiliary_head, head.auxiliary_head
        for i, (conv, torch_conv) in enumerate(zip(aux.convs, torch_aux.convs)):
            _conv_layer(conv, torch_conv, f"head.auxiliary_head.convs.{i}")
        if torch_aux.conv_cat is not None:
            _conv_layer(aux.conv_cat, torch_aux.conv_cat, "head.auxiliary_head.conv_cat")
        _conv(aux.classifier, torch_aux.classifier, "head.auxiliary_head.classifier")


# --------------------------------------------------------------------------- entry points


def from_torch(model: nn.Module) -> keras.Model:
    """The Keras twin of a d2v data2vec-vision ``TaskModel`` (eval mode), weights copied."""
    architecture = architecture_of(model)
    keras_class = HEADS[None if model.head is None else type(model.head).__name__]
    keras_model = keras_class(architecture, name=keras_class.__name__)
    with warnings.catch_warnings():
        # Keras notes that our composite layers have no build(): their sublayers build on this first call
        warnings.filterwarnings("ignore", message=r".*does not have a `build\(\)` method", category=UserWarning)
        keras_model(np.zeros((1, architecture.num_channels, *architecture.image_size), np.float32))
    backbone = keras_model if keras_class is TFData2VecVisionModel else keras_model.data2vec_vision
    with torch.no_grad():
        copy_backbone(backbone, model)
        if keras_class is TFData2VecVisionForImageClassification:
            _dense(keras_model.classifier, model.head.classifier, "head.classifier")
        if keras_class is TFData2VecVisionForSemanticSegmentation:
            copy_segmentation_head(keras_model.head, model.head)
    return keras_model


def from_pretrained(path: str | os.PathLike) -> keras.Model:
    """The Keras model behind a d2v run directory, a d2v checkpoint or a Hugging Face
    ``Data2VecVision*`` checkpoint directory."""
    from d2v.interop.locate import locate_model

    return from_torch(locate_model(path, command="d2v_vision.tf.from_pretrained").model.eval())
