"""fairseq data2vec 2.0 audio (``data2vec_multi``, mode AUDIO), written out from fairseq's source
with plain torch ops on the fairseq-named state dict -- the reference the audio importer and
d2v's ALiBi encoder are tested against. Nothing here imports d2v or fairseq.

Read from fairseq: ``examples/data2vec/models/data2vec2.py`` (``Data2VecMultiConfig``,
``make_block``, ``forward`` with ``features_only``), ``modalities/audio.py`` (``D2vAudioConfig``,
``AudioEncoder``: conv extractor, ``project_features``, the positional conv Sequential,
``convert_padding_mask``), ``modalities/base.py`` (``D2vModalityConfig``,
``ModalitySpecificEncoder.contextualized_features``, ``alibi_scale``, ``get_alibi``),
``modalities/modules.py`` (``BlockEncoder``, ``AltBlock``, ``AltAttention``, ``Decoder1d``),
``fairseq/models/wav2vec/wav2vec2.py`` (``ConvFeatureExtractionModel``); timm's ``Mlp``.

Parameter names follow the module attributes:

* ``modality_encoders.AUDIO.local_encoder.conv_layers.{i}.0.weight`` (Conv1d, no bias);
  ``extractor_mode: layer_norm``: ``.2.1.weight/bias`` (Sequential(TransposeLast,
  Fp32LayerNorm, TransposeLast) at index 2, after Dropout at 1); ``default``: layer 0 only,
  ``.2.weight/bias`` (Fp32GroupNorm(dim, dim));
* ``modality_encoders.AUDIO.project_features.1`` (LayerNorm) and ``.2`` (Linear), after TransposeLast at 0;
* ``modality_encoders.AUDIO.relative_positional_encoder.{1+i}.0.weight/bias`` (grouped Conv1d;
  TransposeLast at 0); with ``conv_pos_pre_ln`` the whole thing is wrapped:
  ``relative_positional_encoder.0`` (LayerNorm) and ``.1.{1+i}.0``;
* ``modality_encoders.AUDIO.context_encoder.norm`` (when not ``layer_norm_first``) and
  ``.context_encoder.blocks.{i}.*`` (the ``prenet_depth`` prenet blocks);
* ``modality_encoders.AUDIO.alibi_scale`` ``(prenet_depth + depth or 1, 1, heads or 1, 1, 1)``;
* ``modality_encoders.AUDIO.decoder.blocks.{i}.0.weight/bias`` and ``.decoder.proj.*``;
* ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``; ``norm.*`` when ``layer_norm_first``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fairseq_reference import defaults
from fairseq_reference.blocks import alt_block, block_state, layer_norm as _layer_norm, linear as _linear

M = "modality_encoders.AUDIO."

# --------------------------------------------------------------------------- config


def fairseq_multi_audio_cfg(**overrides: Any) -> dict[str, Any]:
    """A whole fairseq cfg (as a checkpoint stores it, ``${..}`` interpolations unresolved) for a
    tiny audio ``data2vec_multi`` with base_audio_only_task's settings: 32 wide, 2 blocks, 4
    heads, conv spec ``[(32,10,5)] + [(32,3,2)]*2``, one prenet block, ALiBi with learned
    per-head scales.

    ``overrides`` set ``cfg.model`` keys; ``audio={...}``, ``decoder={...}`` and ``task={...}``
    update ``modalities.audio``, its ``decoder`` and ``cfg.task``.
    """
    audio = overrides.pop("audio", {})
    decoder = overrides.pop("decoder", {})
    task = overrides.pop("task", {})
    model = defaults.multi_model(dict(
        depth=2, num_heads=4, norm_eps=1e-05, layerdrop=0.05, embed_dim=32, average_top_k_layers=2,
        clone_batch=8, instance_norm_target_layer=True, ema_end_decay=0.99999,
        ema_anneal_end_step=75000, ema_encoder_only=False, supported_modality='AUDIO',
        modalities={"_name": None, "audio": defaults.modality("AUDIO", dict(
            prenet_depth=1, prenet_layerdrop=0.05, prenet_dropout=0.1, mask_prob=0.5,
            mask_prob_adjust=0.05, use_alibi_encoder=True, learned_alibi_scale=True,
            learned_alibi_scale_per_head=True,
            decoder=defaults.decoder(dict(decoder_dim=16, decoder_groups=4, decoder_kernel=7, decoder_layers=2) | decoder),
            # D2vAudioConfig's own fields
            extractor_mode='layer_norm', feature_encoder_spec='[(32, 10, 5)] + [(32, 3, 2)] * 2',
            conv_pos_width=10, conv_pos_groups=4, conv_pos_depth=2, conv_pos_pre_ln=False) | audio)},
    ) | overrides)
    return {
        "_name": None,
        "common": {"fp16": True, "seed": 1, "log_interval": 200, "log_format": "json"},
        "checkpoint": {"save_interval_updates": 25000, "keep_interval_updates": 1, "no_epoch_checkpoints": True},
        "task": {"_name": "audio_pretraining", "data": "/private/home/abaevski/data/librispeech/full",
                 "labels": None, "sample_rate": 16000, "normalize": True, "enable_padding": False,
                 "max_sample_size": 320000, "min_sample_size": 32000, "num_batch_buckets": 0,
                 "precompute_mask_config": {}, **task},
        "dataset": {"num_workers": 6, "max_tokens": 1000000, "required_batch_size_multiple": 1},
        "optimization": {"max_update": 400000, "lr": [0.00075]},
        "optimizer": {"_name": "adam", "adam_betas": [0.9, 0.98], "adam_eps": 1e-6, "weight_decay": 0.01},
        "lr_scheduler": {"_name": "cosine", "warmup_updates": 8000},
        "model": model,
        "criterion": {"_name": "model", "log_keys": ["ema_decay", "target_var", "pred_var", "model_norm",
                                                     "ema_norm", "masked_pct"]},
    }


def _resolve(cfg: dict[str, Any], value: Any) -> Any:
    """``"${a.b}"`` -> ``cfg["a"]["b"]`` (the only interpolations these cfgs hold)."""
    if isinstance(value, str):
        found = re.fullmatch(r"\$\{([\w.]+)\}", value)
        if found:
            node: Any = cfg
            for key in found.group(1).split("."):
                node = node[key]
            return _resolve(cfg, node)
    return value


def _audio(cfg: dict[str, Any]) -> dict[str, Any]:
    return cfg["model"]["modalities"]["audio"]


def conv_spec(cfg: dict[str, Any]) -> list[tuple[int, int, int]]:
    """``feature_encoder_spec`` -- a python expression fairseq ``eval``s -- parsed without eval:
    ``[(dim, kernel, stride)] * n`` terms joined by ``+``."""
    spec = _audio(cfg)["feature_encoder_spec"].replace(" ", "")
    layers: list[tuple[int, int, int]] = []
    for term in spec.split("+"):
        found = re.fullmatch(r"\[((?:\(\d+,\d+,\d+\),?)+)\](?:\*(\d+))?", term)
        if not found:
            raise ValueError(f"cannot parse feature_encoder_spec term {term!r}")
        items = [tuple(int(v) for v in t) for t in re.findall(r"\((\d+),(\d+),(\d+)\)", found.group(1))]
        layers.extend(items * int(found.group(2) or 1))
    return layers


def _pos_kernel(audio: dict[str, Any]) -> int:
    return max(3, int(audio["conv_pos_width"]) // int(audio["conv_pos_depth"]))


def _pos_prefix(audio: dict[str, Any]) -> str:
    return f"{M}relative_positional_encoder." + ("1." if audio["conv_pos_pre_ln"] else "")


# --------------------------------------------------------------------------- weights


def fairseq_multi_audio_state(cfg: dict[str, Any], seed: int = 0) -> dict[str, Tensor]:
    """Random weights under fairseq's exact names and shapes (``Data2VecMultiModel.state_dict()``
    minus ``_ema``, decoder included); ``alibi_scale`` is drawn around 1 with one entry below 0
    (fairseq clamps it at 0) whenever it has more than one entry."""
    gen = torch.Generator().manual_seed(seed)
    m, audio = cfg["model"], _audio(cfg)
    dim = int(m["embed_dim"])
    hidden = int(dim * float(m["mlp_ratio"]))
    state: dict[str, Tensor] = {}

    def rand(*shape: int, scale: float = 0.2) -> Tensor:
        return torch.randn(*shape, generator=gen) * scale

    in_dim = 1
    for i, (out_dim, kernel, _stride) in enumerate(conv_spec(cfg)):
        state[f"{M}local_encoder.conv_layers.{i}.0.weight"] = rand(out_dim, in_dim, kernel, scale=1 / math.sqrt(in_dim * kernel))
        if audio["extractor_mode"] == "layer_norm":
            state[f"{M}local_encoder.conv_layers.{i}.2.1.weight"] = 1 + rand(out_dim)
            state[f"{M}local_encoder.conv_layers.{i}.2.1.bias"] = rand(out_dim)
        elif i == 0:
            state[f"{M}local_encoder.conv_layers.0.2.weight"] = 1 + rand(out_dim)
            state[f"{M}local_encoder.conv_layers.0.2.bias"] = rand(out_dim)
        in_dim = out_dim
    state[f"{M}project_features.1.weight"] = 1 + rand(in_dim)
    state[f"{M}project_features.1.bias"] = rand(in_dim)
    state[f"{M}project_features.2.weight"] = rand(dim, in_dim)
    state[f"{M}project_features.2.bias"] = rand(dim)

    if audio["conv_pos_pre_ln"]:
        state[f"{M}relative_positional_encoder.0.weight"] = 1 + rand(dim)
        state[f"{M}relative_positional_encoder.0.bias"] = rand(dim)
    k, groups = _pos_kernel(audio), int(audio["conv_pos_groups"])
    for i in range(int(audio["conv_pos_depth"])):
        state[f"{_pos_prefix(audio)}{1 + i}.0.weight"] = rand(dim, dim // groups, k, scale=1 / math.sqrt(dim // groups * k))
        state[f"{_pos_prefix(audio)}{1 + i}.0.bias"] = rand(dim)

    if not m["layer_norm_first"]:
        state[f"{M}context_encoder.norm.weight"] = 1 + rand(dim)
        state[f"{M}context_encoder.norm.bias"] = rand(dim)
    for i in range(int(audio["prenet_depth"])):
        state.update(block_state(f"{M}context_encoder.blocks.{i}.", dim, hidden, gen))

    if audio["use_alibi_encoder"]:
        depth = int(audio["prenet_depth"]) + int(_resolve(cfg, audio["model_depth"]))
        shape = (depth if audio["learned_alibi_scale_per_layer"] else 1, 1,
                 int(_resolve(cfg, audio["num_alibi_heads"])) if audio["learned_alibi_scale_per_head"] else 1, 1, 1)
        scale = float(audio["alibi_scale"]) + rand(*shape, scale=0.5)
        if scale.numel() > 1:
            scale.view(-1)[0] = -0.3
        state[f"{M}alibi_scale"] = scale

    dec = audio["decoder"]
    if dec is not None:
        ddim, dk, dgroups = int(dec["decoder_dim"]), int(dec["decoder_kernel"]), int(dec["decoder_groups"])
        for i in range(int(dec["decoder_layers"])):
            cin = dim if i == 0 else ddim
            state[f"{M}decoder.blocks.{i}.0.weight"] = rand(ddim, cin // dgroups, dk, scale=0.3)
            state[f"{M}decoder.blocks.{i}.0.bias"] = rand(ddim, scale=0.1)
        n_proj = int(dec["projection_layers"])
        if n_proj == 1:
            state[f"{M}decoder.proj.weight"] = rand(dim, ddim)
            state[f"{M}decoder.proj.bias"] = rand(dim, scale=0.1)
        else:  # Sequential(Linear, GELU, Linear, GELU, ..., Linear): Linears at even indices
            cur = ddim
            for j in range(n_proj - 1):
                nxt = int(cur * float(dec["projection_ratio"])) if j == 0 else cur
                state[f"{M}decoder.proj.{2 * j}.weight"] = rand(nxt, cur)
                state[f"{M}decoder.proj.{2 * j}.bias"] = rand(nxt, scale=0.1)
                cur = nxt
            state[f"{M}decoder.proj.{2 * (n_proj - 1)}.weight"] = rand(dim, cur)
            state[f"{M}decoder.proj.{2 * (n_proj - 1)}.bias"] = rand(dim, scale=0.1)

    for i in range(int(m["depth"])):
        state.update(block_state(f"blocks.{i}.", dim, hidden, gen))
    if m["layer_norm_first"]:
        state["norm.weight"] = 1 + rand(dim)
        state["norm.bias"] = rand(dim)
    return state


# --------------------------------------------------------------------------- forward pieces


def _conv_features(state: dict[str, Tensor], cfg: dict[str, Any], source: Tensor) -> Tensor:
    """``ConvFeatureExtractionModel``: ``(B, S)`` -> ``(B, C, T)``; dropout 0, no conv bias."""
    x = source[:, None, :]
    mode = _audio(cfg)["extractor_mode"]
    for i, (_dim, _kernel, stride) in enumerate(conv_spec(cfg)):
        name = f"{M}local_encoder.conv_layers.{i}"
        x = F.conv1d(x, state[f"{name}.0.weight"], stride=stride)
        if mode == "layer_norm":  # Fp32LayerNorm over channels, eps 1e-5
            x = _layer_norm(x.transpose(1, 2), state, f"{name}.2.1", 1e-5).transpose(1, 2)
        elif i == 0:  # Fp32GroupNorm(dim, dim): per channel over time
            x = F.group_norm(x, x.shape[1], state[f"{name}.2.weight"], state[f"{name}.2.bias"], 1e-5)
        x = F.gelu(x)
    return x


def _frame_padding(cfg: dict[str, Any], padding_mask: Tensor, frames: int) -> Tensor:
    """``AudioEncoder.convert_padding_mask``: valid lengths by the conv formula
    ``floor((L - k) / s + 1)``, everything from there on padded (an all-False mask when the
    sample-rate mask has no padding)."""
    if not bool(padding_mask.any()):
        return torch.zeros(padding_mask.shape[0], frames, dtype=torch.bool)
    lengths = (~padding_mask.bool()).long().sum(-1).double()
    for _dim, kernel, stride in conv_spec(cfg):
        lengths = torch.floor((lengths - kernel) / stride + 1)
    return torch.arange(frames)[None, :] >= lengths.long()[:, None]


def _positional_conv(state: dict[str, Tensor], cfg: dict[str, Any], x: Tensor) -> Tensor:
    """The ``relative_positional_encoder`` Sequential: ``(B, T, D)`` -> ``(B, T, D)``; each block
    Conv1d (padding k//2) -> SamePad (drop the last frame for even k) -> LayerNorm over
    channels without affine (eps 1e-5) -> GELU."""
    audio = _audio(cfg)
    if audio["conv_pos_pre_ln"]:
        x = _layer_norm(x, state, f"{M}relative_positional_encoder.0", 1e-5)
    k, groups = _pos_kernel(audio), int(audio["conv_pos_groups"])
    h = x.transpose(1, 2)
    for i in range(int(audio["conv_pos_depth"])):
        name = f"{_pos_prefix(audio)}{1 + i}.0"
        h = F.conv1d(h, state[f"{name}.weight"], state[f"{name}.bias"], padding=k // 2, groups=groups)
        if k % 2 == 0:
            h = h[..., :-1]
        h = F.layer_norm(h.transpose(1, 2), (h.shape[1],), eps=1e-5).transpose(1, 2)
        h = F.gelu(h)
    return h.transpose(1, 2)


def alibi_slopes_reference(heads: int) -> list[float]:
    """fairseq ``get_alibi``'s ``get_slopes``: the geometric slopes for a power of two, else
    those of the power below followed by every other slope of the power above."""
    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(heads).is_integer():
        return power_of_two(heads)
    below = 2 ** math.floor(math.log2(heads))
    return power_of_two(below) + alibi_slopes_reference(2 * below)[0::2][: heads - below]


def alibi_reference(time_steps: int, heads: int) -> Tensor:
    """``get_alibi(T, heads)`` (dims 1): ``(H, T, T)``, ``slope_h * -|i - j|``."""
    slopes = torch.tensor(alibi_slopes_reference(heads))
    pos = torch.arange(time_steps)
    distance = (pos[None, :] - pos[:, None]).abs() * -1
    return slopes[:, None, None] * distance[None].float()


# --------------------------------------------------------------------------- the forward


@torch.no_grad()
def fairseq_multi_audio_features(state: dict[str, Tensor], cfg: dict[str, Any], source: Tensor,
                                 padding_mask: Tensor | None) -> Tensor:
    """What ``Data2VecMultiModel.extract_features(source, mode="AUDIO", padding_mask=padding_mask,
    mask=False)["x"]`` returns in eval mode: ``(B, T, embed_dim)`` at frame rate.

    Steps (eval: every dropout, layerdrop and drop-path off): conv extractor -> ``project_features``
    (LayerNorm, Linear) -> frame padding mask -> ``x + relative_positional_encoder(x)`` (padded
    frames are *not* zeroed first) -> ALiBi bias ``get_alibi`` times ``alibi_scale.clamp_min(0)``
    (a single scale row is folded in once; per-layer rows scale each block, prenet blocks taking
    the first ``prenet_depth``) -> ``context_encoder`` (norm unless ``layer_norm_first``, prenet
    blocks) -> ``blocks`` -> ``norm`` when ``layer_norm_first``.
    """
    m, audio = cfg["model"], _audio(cfg)
    heads, eps = int(m["num_heads"]), float(m["norm_eps"])
    ln_first = bool(m["layer_norm_first"])
    prenet = int(audio["prenet_depth"])

    x = _conv_features(state, cfg, source.float()).transpose(1, 2)
    x = _layer_norm(x, state, f"{M}project_features.1", 1e-5)
    x = _linear(x, state, f"{M}project_features.2")
    batch, frames, _ = x.shape

    pad = None if padding_mask is None else _frame_padding(cfg, padding_mask, frames)
    x = x + _positional_conv(state, cfg, x)

    bias, scale = None, None
    if audio["use_alibi_encoder"]:
        alibi_heads = int(_resolve(cfg, audio["num_alibi_heads"]))
        bias = alibi_reference(frames, alibi_heads)[None].expand(batch, -1, -1, -1)
        scale = state[f"{M}alibi_scale"].clamp_min(0)
        if scale.shape[0] == 1:
            bias = bias * scale.squeeze(0)
            scale = None

    def block_bias(index: int) -> Tensor | None:
        if bias is None or scale is None:
            return bias
        return bias * scale[index]

    if not ln_first:
        x = _layer_norm(x, state, f"{M}context_encoder.norm", eps)
    for i in range(prenet):
        x = alt_block(x, state, f"{M}context_encoder.blocks.{i}.", heads, eps, layer_norm_first=ln_first,
                      padding_mask=pad, alibi_bias=block_bias(i))[0]
    for i in range(int(m["depth"])):
        x = alt_block(x, state, f"blocks.{i}.", heads, eps, layer_norm_first=ln_first, padding_mask=pad,
                      alibi_bias=block_bias(prenet + i))[0]
    if ln_first:
        x = _layer_norm(x, state, "norm", eps)
    return x
