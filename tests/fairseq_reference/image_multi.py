"""fairseq data2vec 2.0 images (``data2vec_multi``, IMAGE), written out from fairseq's source
with plain torch ops on the fairseq-named state dict -- the reference the importer is tested
against. Nothing here imports d2v.

Read from fairseq (examples/data2vec/models/): ``data2vec2.py`` (``Data2VecMultiModel.forward``
with ``features_only``, ``make_block``), ``modalities/images.py`` (``ImageEncoder``),
``modalities/base.py`` (``ModalitySpecificEncoder.contextualized_features``),
``modalities/modules.py`` (``BlockEncoder``, ``AltBlock``, ``AltAttention``, ``Decoder2d``),
``mae.py`` (``get_2d_sincos_pos_embed``, numpy), ``mae_image_classification.py``
(``model_forward``, pooling, ``fc_norm``, ``head``); timm's ``PatchEmbed`` and ``Mlp``.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fairseq_reference import defaults
from fairseq_reference.blocks import alt_block, block_state, layer_norm as _layer_norm, linear as _linear

M = "modality_encoders.IMAGE."


# --------------------------------------------------------------------------- config and weights


def fairseq_multi_image_cfg(**overrides: Any) -> dict[str, Any]:
    """A whole fairseq cfg (as a released checkpoint stores it) for a tiny image
    ``data2vec_multi``: base_images_only_task's settings at 16 px, 4 px patches, 32 wide.

    ``overrides`` set ``cfg.model`` keys; ``image={...}`` and ``decoder={...}`` update
    ``modalities.image`` and its ``decoder``.
    """
    image = overrides.pop("image", {})
    decoder = overrides.pop("decoder", {})
    model = defaults.multi_model(dict(
        depth=2, num_heads=4, encoder_dropout=0.0, post_mlp_drop=0.0, attention_dropout=0.0,
        embed_dim=32, average_top_k_layers=2, clone_batch=4, instance_norm_target_layer=True,
        layer_norm_targets=True, ema_decay=0.9998, ema_end_decay=0.99999,
        ema_anneal_end_step=100000, ema_encoder_only=False, min_target_var=0.0, min_pred_var=0.0,
        supported_modality='IMAGE', cls_loss=0.01,
        modalities={"_name": None, "image": defaults.modality("IMAGE", dict(
            prenet_depth=1, num_extra_tokens=1, init_extra_token_zero=False, mask_prob=0.8,
            inverse_mask=True, mask_prob_adjust=0.07, mask_length=3, ema_local_encoder=True,
            decoder=defaults.decoder(dict(decoder_dim=32, decoder_kernel=3, decoder_layers=2, input_dropout=0.0) | decoder),
            # D2vImageConfig's own fields
            input_size=16, in_chans=3, patch_size=4, embed_dim=32, alibi_dims=2,
            alibi_distance='manhattan', fixed_positions=True, transformer_decoder=False,
            enc_dec_transformer=False) | image)},
    ) | overrides)
    return {
        "_name": None,
        "common": {"fp16": True, "seed": 1, "log_interval": 200},
        "checkpoint": {"save_interval_updates": 25000},
        "task": {"_name": "mae_image_pretraining", "data": "/datasets01/imagenet_full_size/061417/",
                 "rebuild_batches": True, "key": "source", "precompute_mask_config": {}},
        "dataset": {"batch_size": 16, "num_workers": 10},
        "optimization": {"max_update": 375300, "lr": [0.001], "clip_norm": 4.0},
        "model": model,
        "criterion": {"_name": "model", "log_keys": ["ema_decay", "target_var", "pred_var"]},
    }


def _m(cfg: dict[str, Any]) -> dict[str, Any]:
    return cfg["model"]


def _image(cfg: dict[str, Any]) -> dict[str, Any]:
    return cfg["model"]["modalities"]["image"]


def sincos_positions(dim: int, side: int) -> np.ndarray:
    """MAE's ``get_2d_sincos_pos_embed(dim, side)`` (numpy, float64)."""
    grid_h = np.arange(side, dtype=np.float32)
    grid_w = np.arange(side, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, side, side)

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def fairseq_multi_image_state(cfg: dict[str, Any], seed: int = 0, *, decoder: bool = True) -> dict[str, Tensor]:
    """Random weights under fairseq's exact names and shapes (``Data2VecMultiModel.state_dict()``
    minus ``_ema``), with the sin-cos positions fairseq computes; ``decoder=False`` leaves the
    decoder out (as ``remove_pretraining_modules`` does, and the EMA copy)."""
    gen = torch.Generator().manual_seed(seed)
    m, image = _m(cfg), _image(cfg)
    dim, mod_dim = int(m["embed_dim"]), int(image["embed_dim"])
    hidden = int(dim * float(m["mlp_ratio"]))
    p, chans = int(image["patch_size"]), int(image["in_chans"])
    side = int(image["input_size"]) // p
    state: dict[str, Tensor] = {}
    conv = {"proj.weight": torch.randn(mod_dim, chans, p, p, generator=gen) * 0.2,
            "proj.bias": torch.randn(mod_dim, generator=gen) * 0.2}
    if mod_dim != dim:
        state.update({f"{M}local_encoder.0.{k}": v for k, v in conv.items()})
        state[f"{M}local_encoder.1.weight"] = torch.randn(dim, mod_dim, generator=gen) * 0.2
        state[f"{M}local_encoder.1.bias"] = torch.randn(dim, generator=gen) * 0.2
    else:
        state.update({f"{M}local_encoder.{k}": v for k, v in conv.items()})
    state[f"{M}fixed_positional_encoder.positions"] = torch.from_numpy(sincos_positions(dim, side)).float()[None]
    if int(image["num_extra_tokens"]):
        state[f"{M}extra_tokens"] = torch.randn(1, int(image["num_extra_tokens"]), dim, generator=gen)
    if not m["layer_norm_first"]:
        state[f"{M}context_encoder.norm.weight"] = 1 + torch.randn(dim, generator=gen) * 0.2
        state[f"{M}context_encoder.norm.bias"] = torch.randn(dim, generator=gen) * 0.2
    for i in range(int(image["prenet_depth"])):
        state.update(block_state(f"{M}context_encoder.blocks.{i}.", dim, hidden, gen))
    if decoder:
        dec = image["decoder"]
        ddim, k, groups = int(dec["decoder_dim"]), int(dec["decoder_kernel"]), int(dec["decoder_groups"])
        for i in range(int(dec["decoder_layers"])):
            cin = dim if i == 0 else ddim
            state[f"{M}decoder.blocks.{i}.0.weight"] = torch.randn(ddim, cin // groups, k, k, generator=gen) * 0.3
            state[f"{M}decoder.blocks.{i}.0.bias"] = torch.randn(ddim, generator=gen) * 0.1
        state[f"{M}decoder.proj.weight"] = torch.randn(dim, ddim, generator=gen) * 0.2
        state[f"{M}decoder.proj.bias"] = torch.randn(dim, generator=gen) * 0.1
    for i in range(int(m["depth"])):
        state.update(block_state(f"blocks.{i}.", dim, hidden, gen))
    if m["layer_norm_first"]:
        state["norm.weight"] = 1 + torch.randn(dim, generator=gen) * 0.2
        state["norm.bias"] = torch.randn(dim, generator=gen) * 0.2
    return state


def fairseq_classifier_cfg(pretrain_cfg: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """The cfg of a ``mae_image_classification`` run fine-tuned from ``pretrain_cfg``."""
    model = {
        "_name": "mae_image_classification", "model_path": "/checkpoint/d2v2/base_imagenet.pt",
        "no_pretrained_weights": False, "linear_classifier": False, "num_classes": 5, "mixup": 0.7, "cutmix": 1.0,
        "label_smoothing": 0.1, "drop_path_rate": 0.1, "layer_decay": 0.65, "mixup_prob": 0.9,
        "mixup_switch_prob": 0.5, "mixup_mode": "batch", "pretrained_model_args": copy.deepcopy(pretrain_cfg),
        "data": "${task.data}", "norm_eps": None, "remove_alibi": False, "encoder_dropout": 0.0,
        "post_mlp_drop": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, "dropout_input": 0.0,
        "layerdrop": 0.0, "prenet_layerdrop": 0.0, "prenet_dropout": 0.0, "use_fc_norm": True,
        "prediction_mode": "MEAN_POOLING", "no_decay_blocks": True, **overrides,
    }
    return {"_name": None, "common": {"seed": 1}, "task": {"_name": "image_classification", "data": "/imagenet"},
            "optimization": {"max_update": 100000}, "model": model}


def fairseq_classifier_state(pretrain_cfg: dict[str, Any], num_classes: int, seed: int = 0) -> dict[str, Tensor]:
    """``MaeImageClassificationModel.state_dict()``: the backbone under ``model.``, ``fc_norm``, ``head``."""
    gen = torch.Generator().manual_seed(seed + 1000)
    dim = int(_m(pretrain_cfg)["embed_dim"])
    state = {f"model.{k}": v for k, v in fairseq_multi_image_state(pretrain_cfg, seed, decoder=False).items()}
    state["fc_norm.weight"] = 1 + torch.randn(dim, generator=gen) * 0.2
    state["fc_norm.bias"] = torch.randn(dim, generator=gen) * 0.2
    state["head.weight"] = torch.randn(num_classes, dim, generator=gen) * 0.2
    state["head.bias"] = torch.randn(num_classes, generator=gen) * 0.2
    return state


# --------------------------------------------------------------------------- forward passes


def extract_features(state: dict[str, Tensor], cfg: dict[str, Any], images: Tensor,
                     remove_extra_tokens: bool = True, norm_eps: float | None = None) -> dict[str, Any]:
    """``Data2VecMultiModel.extract_features(images, mode="IMAGE", mask=False)`` in eval mode:
    ``x`` (extra tokens removed unless asked otherwise) and ``layer_results`` (the shared blocks'
    FFN outputs, extra tokens included, as fairseq's ``layer_results``)."""
    m, image = _m(cfg), _image(cfg)
    eps = float(norm_eps if norm_eps is not None else m["norm_eps"])
    heads, first = int(m["num_heads"]), bool(m["layer_norm_first"])
    p = int(image["patch_size"])
    # local encoder: timm PatchEmbed (+ Linear when the modality width differs)
    if M + "local_encoder.proj.weight" in state:
        conv_w, conv_b = state[M + "local_encoder.proj.weight"], state[M + "local_encoder.proj.bias"]
    else:
        conv_w, conv_b = state[M + "local_encoder.0.proj.weight"], state[M + "local_encoder.0.proj.bias"]
    x = F.conv2d(images, conv_w, conv_b, stride=p).flatten(2).transpose(1, 2)
    if M + "local_encoder.1.weight" in state:
        x = _linear(x, state, M + "local_encoder.1")
    # contextualized_features: fixed positions, then extra tokens in front, then the context encoder
    x = x + state[M + "fixed_positional_encoder.positions"]
    extra = int(image["num_extra_tokens"])
    if extra:
        x = torch.cat([state[M + "extra_tokens"].expand(x.shape[0], -1, -1), x], dim=1)
    if not first:
        x = _layer_norm(x, state, M + "context_encoder.norm", eps)
    for i in range(int(image["prenet_depth"])):
        x, _ = alt_block(x, state, f"{M}context_encoder.blocks.{i}.", heads, eps, layer_norm_first=first)
    layer_results = []
    for i in range(int(m["depth"])):
        x, t = alt_block(x, state, f"blocks.{i}.", heads, eps, layer_norm_first=first)
        layer_results.append(t)
    if first:
        x = _layer_norm(x, state, "norm", eps)
    if remove_extra_tokens:
        x = x[:, extra:]
    return {"x": x, "layer_results": layer_results}


def classifier_logits(state: dict[str, Tensor], cfg: dict[str, Any], images: Tensor) -> Tensor:
    """``MaeImageClassificationModel.forward(images)`` in eval mode (no labels): the logits."""
    top = cfg["model"]
    pretrained = top["pretrained_model_args"]
    backbone = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    mode = top["prediction_mode"]
    x = extract_features(backbone, pretrained, images, remove_extra_tokens=mode != "CLS_TOKEN",
                         norm_eps=top.get("norm_eps"))["x"]
    x = x.mean(dim=1) if mode == "MEAN_POOLING" else x[:, 0]
    if top["use_fc_norm"]:
        x = _layer_norm(x, state, "fc_norm", 1e-6)
    return _linear(x, state, "head")


def decoder_2d(state: dict[str, Tensor], cfg: dict[str, Any], x: Tensor) -> Tensor:
    """``Decoder2d.forward(x)`` for ``(B, H*W, D)`` inputs: conv (same padding) -> LayerNorm over
    channels without affine (eps 1e-5) -> GELU per block, residual where widths match, Linear."""
    image = _image(cfg)
    dec = image["decoder"]
    side = int(image["input_size"]) // int(image["patch_size"])
    b, t, c = x.shape
    h = x.transpose(1, 2).reshape(b, c, side, side)
    residual = h
    k = int(dec["decoder_kernel"])
    for i in range(int(dec["decoder_layers"])):
        h = F.conv2d(h, state[f"{M}decoder.blocks.{i}.0.weight"], state[f"{M}decoder.blocks.{i}.0.bias"],
                     padding=k // 2, groups=int(dec["decoder_groups"]))
        if k % 2 == 0:
            h = h[..., :-1, :-1]
        h = F.layer_norm(h.transpose(-3, -1), h.shape[1:2]).transpose(-3, -1)
        h = F.gelu(h)
        if dec["decoder_residual"] and residual.shape[1] == h.shape[1]:
            h = h + residual
        residual = h
    h = h.reshape(b, -1, t).transpose(1, 2)
    return _linear(h, state, f"{M}decoder.proj")


def make_targets(layer_results: list[Tensor], cfg: dict[str, Any]) -> Tensor:
    """``Data2VecMultiModel.make_targets`` on the teacher's ``layer_results`` (extra tokens
    already removed): instance norm per layer over time, average of the top K, layer norm."""
    m = _m(cfg)
    top = layer_results[-int(m["average_top_k_layers"]):]
    if m["instance_norm_target_layer"]:
        top = [F.instance_norm(t.float().transpose(1, 2)).transpose(1, 2) for t in top]
    y = sum(t.float() for t in top) / len(top)
    if m["layer_norm_targets"]:
        y = F.layer_norm(y, y.shape[-1:])
    return y
