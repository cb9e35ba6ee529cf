"""fairseq data2vec 2.0 text (``data2vec_multi``, TEXT), written out from fairseq's source with
plain torch ops on the fairseq-named state dict -- the reference the importer is tested against.
Nothing here imports d2v.

Read from fairseq (examples/data2vec/models/): ``data2vec2.py`` (``Data2VecMultiModel.forward``
with ``features_only``, ``make_block``, ``make_targets``), ``modalities/text.py``
(``TextLocalEncoder``: ``embed_tokens`` + learned positions from ``utils.make_positions``,
``layernorm_embedding``), ``modalities/base.py`` (``contextualized_features``: no prenet, no
extra tokens for text), ``modalities/modules.py`` (``AltBlock``, ``AltAttention``, ``Decoder1d``),
``data2vec_text_classification.py`` and fairseq's ``RobertaClassificationHead``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fairseq_reference import defaults
from fairseq_reference.blocks import alt_block, block_state, layer_norm as _layer_norm, linear as _linear

M = "modality_encoders.TEXT."
PAD = 1  # fairseq Dictionary: <s>=0 <pad>=1 </s>=2 <unk>=3


# --------------------------------------------------------------------------- config and weights


def fairseq_multi_text_cfg(**overrides: Any) -> dict[str, Any]:
    """A whole fairseq cfg (as a released checkpoint stores it) for a tiny text ``data2vec_multi``:
    base_text_only_task's settings at 32 wide, 2 blocks, 4 heads, 30 positions.

    ``overrides`` set ``cfg.model`` keys; ``text={...}`` and ``decoder={...}`` update
    ``modalities.text`` and its ``decoder``.
    """
    text = overrides.pop("text", {})
    decoder = overrides.pop("decoder", {})
    model = defaults.multi_model(dict(
        loss_scale=1.0, depth=2, num_heads=4, norm_eps=1e-05, embed_dim=32, average_top_k_layers=2,
        clone_batch=8, instance_norm_target_layer=True, ema_decay=0.9999, ema_end_decay=0.99999,
        ema_anneal_end_step=100000, supported_modality='TEXT',
        modalities={"_name": None, "text": defaults.modality("TEXT", dict(
            prenet_depth=0, mask_prob=0.48, mask_length=1,
            decoder=defaults.decoder(dict(decoder_dim=24, decoder_groups=1, decoder_kernel=9, decoder_layers=3,
            decoder_residual=False, projection_layers=2) | decoder),
            # D2vTextConfig's own fields
            max_source_positions=28, learned_pos=True, dropout=0.1, no_scale_embedding=True,
            layernorm_embedding=True, no_token_positional_embeddings=False) | text)},
    ) | overrides)
    return {
        "_name": None,
        "common": {"fp16": True, "seed": 1, "log_interval": 200},
        "checkpoint": {"save_interval_updates": 50000, "keep_interval_updates": 1},
        "task": {"_name": "masked_lm", "data": "/fsx/bookwiki", "sample_break_mode": "none",
                 "tokens_per_sample": 512, "skip_masking": True, "d2v2_multi": True},
        "dataset": {"batch_size": 4},
        "optimization": {"max_update": 1000000, "lr": [0.0002], "clip_norm": 1.0},
        "model": model,
        "criterion": {"_name": "model", "log_keys": ["ema_decay", "target_var", "pred_var"]},
    }


def _m(cfg: dict[str, Any]) -> dict[str, Any]:
    return cfg["model"]


def _text(cfg: dict[str, Any]) -> dict[str, Any]:
    return cfg["model"]["modalities"]["text"]


def fairseq_multi_text_state(cfg: dict[str, Any], seed: int = 0, *, vocab: int = 50,
                             decoder: bool = True) -> dict[str, Tensor]:
    """Random weights under fairseq's exact names and shapes (``Data2VecMultiModel.state_dict()``
    minus ``_ema``); ``decoder=False`` leaves the decoder out (``remove_pretraining_modules``)."""
    gen = torch.Generator().manual_seed(seed)
    m, text = _m(cfg), _text(cfg)
    dim = int(m["embed_dim"])
    hidden = int(dim * float(m["mlp_ratio"]))
    positions = int(text["max_source_positions"]) + PAD + 1  # fairseq's PositionalEmbedding offset
    state = {
        f"{M}local_encoder.embed_tokens.weight": torch.randn(vocab, dim, generator=gen) * 0.5,
        f"{M}local_encoder.embed_positions.weight": torch.randn(positions, dim, generator=gen) * 0.5,
        f"{M}local_encoder.layernorm_embedding.weight": 1 + torch.randn(dim, generator=gen) * 0.2,
        f"{M}local_encoder.layernorm_embedding.bias": torch.randn(dim, generator=gen) * 0.2,
    }
    if decoder:
        dec = text["decoder"]
        ddim, k, groups = int(dec["decoder_dim"]), int(dec["decoder_kernel"]), int(dec["decoder_groups"])
        for i in range(int(dec["decoder_layers"])):
            cin = dim if i == 0 else ddim
            state[f"{M}decoder.blocks.{i}.0.weight"] = torch.randn(ddim, cin // groups, k, generator=gen) * 0.2
            state[f"{M}decoder.blocks.{i}.0.bias"] = torch.randn(ddim, generator=gen) * 0.1
        width = ddim
        linears = []
        for i in range(int(dec["projection_layers"]) - 1):
            nxt = int(width * float(dec["projection_ratio"])) if i == 0 else width
            linears.append((width, nxt))
            width = nxt
        linears.append((width, dim))
        if len(linears) == 1:
            state[f"{M}decoder.proj.weight"] = torch.randn(dim, ddim, generator=gen) * 0.2
            state[f"{M}decoder.proj.bias"] = torch.randn(dim, generator=gen) * 0.1
        else:
            for j, (cin, cout) in enumerate(linears):  # nn.Sequential(Linear, GELU, Linear, ...)
                state[f"{M}decoder.proj.{2 * j}.weight"] = torch.randn(cout, cin, generator=gen) * 0.2
                state[f"{M}decoder.proj.{2 * j}.bias"] = torch.randn(cout, generator=gen) * 0.1
    for i in range(int(m["depth"])):
        state.update(block_state(f"blocks.{i}.", dim, hidden, gen))
    return state


def fairseq_ema_state(cfg: dict[str, Any], seed: int = 1) -> dict[str, Tensor]:
    """``_ema`` as ``ema_encoder_only`` saves it: the EMA of ``blocks`` (``"{i}.attn.qkv.weight"``)."""
    full = fairseq_multi_text_state(cfg, seed, decoder=False)
    return {k[len("blocks."):]: v for k, v in full.items() if k.startswith("blocks.")}


def fairseq_text_classifier_cfg(pretrain_cfg: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """The cfg of a ``data2vec_text_classification`` run fine-tuned from ``pretrain_cfg``."""
    model = {"_name": "data2vec_text_classification", "pooler_dropout": 0.0, "pooler_activation_fn": "tanh",
             "quant_noise_pq": 0, "quant_noise_pq_block_size": 8, "spectral_norm_classification_head": False,
             "model_path": "/checkpoint/d2v2/nlp_base.pt", "no_pretrained_weights": False,
             "pretrained_model_args": copy.deepcopy(pretrain_cfg), **overrides}
    return {"_name": None, "common": {"seed": 1, "fp16": True},
            "task": {"_name": "sentence_prediction", "data": "/glue/MNLI-bin", "num_classes": 3, "d2v2_multi": True},
            "optimization": {"max_update": 123873, "lr": [2e-05]}, "model": model}


def fairseq_text_classifier_state(pretrain_cfg: dict[str, Any], num_classes: int, seed: int = 0,
                                  head: str = "sentence_classification_head") -> dict[str, Tensor]:
    """``Data2VecTextClassificationModel.state_dict()``: the backbone under ``model.`` (no
    decoder, no ``_ema``) and ``classification_heads.<head>.{dense,out_proj}``."""
    gen = torch.Generator().manual_seed(seed + 1000)
    dim = int(_m(pretrain_cfg)["embed_dim"])
    state = {f"model.{k}": v for k, v in fairseq_multi_text_state(pretrain_cfg, seed, decoder=False).items()}
    state[f"classification_heads.{head}.dense.weight"] = torch.randn(dim, dim, generator=gen) * 0.3
    state[f"classification_heads.{head}.dense.bias"] = torch.randn(dim, generator=gen) * 0.2
    state[f"classification_heads.{head}.out_proj.weight"] = torch.randn(num_classes, dim, generator=gen) * 0.3
    state[f"classification_heads.{head}.out_proj.bias"] = torch.randn(num_classes, generator=gen) * 0.2
    return state


# --------------------------------------------------------------------------- forward passes


def make_positions(tokens: Tensor, padding_idx: int = PAD) -> Tensor:
    """fairseq ``utils.make_positions``: ``padding_idx + 1, + 2, ...`` over non-pad tokens,
    ``padding_idx`` at padding."""
    real = tokens.ne(padding_idx).int()
    return (torch.cumsum(real, dim=1).type_as(real) * real).long() + padding_idx


def local_encoder(state: dict[str, Tensor], tokens: Tensor, prefix: str = "") -> Tensor:
    """``TextLocalEncoder.forward`` in eval mode: tokens + positions (no embedding scale),
    ``layernorm_embedding`` (fairseq LayerNorm, eps 1e-5)."""
    p = prefix + M + "local_encoder."
    x = F.embedding(tokens, state[p + "embed_tokens.weight"])
    x = x + F.embedding(make_positions(tokens), state[p + "embed_positions.weight"])
    return _layer_norm(x, state, p + "layernorm_embedding", 1e-5)


def extract_features(state: dict[str, Tensor], cfg: dict[str, Any], tokens: Tensor,
                     padding_mask: Tensor | None = None, prefix: str = "",
                     blocks: str = "blocks.") -> dict[str, Any]:
    """``Data2VecMultiModel.extract_features(tokens, mode="TEXT", padding_mask=..., mask=False)``
    in eval mode: ``x`` and ``layer_results`` (each block's FFN output). ``blocks`` names the
    Transformer blocks (``""`` for an ``ema_encoder_only`` ``_ema``)."""
    m = _m(cfg)
    x = local_encoder(state, tokens, prefix)
    layer_results = []
    for i in range(int(m["depth"])):
        x, t = alt_block(x, state, f"{prefix}{blocks}{i}.", int(m["num_heads"]), float(m["norm_eps"]),
                         padding_mask=padding_mask)
        layer_results.append(t)
    return {"x": x, "padding_mask": padding_mask, "layer_results": layer_results}


def decoder_1d(state: dict[str, Tensor], cfg: dict[str, Any], x: Tensor) -> Tensor:
    """``Decoder1d.forward(x)`` for ``(B, T, D)``: conv (same padding) -> LayerNorm over channels
    without affine (eps 1e-5) -> GELU per block, residual where widths match (if enabled), then
    the projection (``Linear`` or ``Linear -> GELU -> Linear``)."""
    dec = _text(cfg)["decoder"]
    k = int(dec["decoder_kernel"])
    h = x.transpose(1, 2)
    residual = h
    for i in range(int(dec["decoder_layers"])):
        h = F.conv1d(h, state[f"{M}decoder.blocks.{i}.0.weight"], state[f"{M}decoder.blocks.{i}.0.bias"],
                     padding=k // 2, groups=int(dec["decoder_groups"]))
        if k % 2 == 0:
            h = h[..., :-1]
        h = F.layer_norm(h.transpose(1, 2), h.shape[1:2]).transpose(1, 2)
        h = F.gelu(h)
        if dec["decoder_residual"] and residual.shape[1] == h.shape[1]:
            h = h + residual
        residual = h
    h = h.transpose(1, 2)
    if f"{M}decoder.proj.weight" in state:
        return _linear(h, state, f"{M}decoder.proj")
    j = 0
    while f"{M}decoder.proj.{j + 2}.weight" in state:
        h = F.gelu(_linear(h, state, f"{M}decoder.proj.{j}"))
        j += 2
    return _linear(h, state, f"{M}decoder.proj.{j}")


def make_targets(layer_results: list[Tensor], cfg: dict[str, Any]) -> Tensor:
    """``Data2VecMultiModel.make_targets``: instance norm per layer over time, average of the top K."""
    m = _m(cfg)
    top = layer_results[-int(m["average_top_k_layers"]):]
    if m["instance_norm_target_layer"]:
        top = [F.instance_norm(t.float().transpose(1, 2)).transpose(1, 2) for t in top]
    y = sum(t.float() for t in top) / len(top)
    if m["layer_norm_targets"]:
        y = F.layer_norm(y, y.shape[-1:])
    return y


def classifier_logits(state: dict[str, Tensor], cfg: dict[str, Any], tokens: Tensor,
                      head: str = "sentence_classification_head") -> Tensor:
    """``Data2VecTextClassificationModel.forward`` in eval mode: the backbone's features with the
    padding mask fairseq's sentence_prediction task passes, then ``RobertaClassificationHead``
    (``<s>`` -> dense -> tanh -> out_proj; dropout is off)."""
    pretrain = cfg["model"]["pretrained_model_args"]
    x = extract_features(state, pretrain, tokens, tokens.eq(PAD), prefix="model.")["x"]
    h = torch.tanh(_linear(x[:, 0], state, f"classification_heads.{head}.dense"))
    return _linear(h, state, f"classification_heads.{head}.out_proj")
