"""d2v's audio encoder with data2vec 2.0's options (``alibi: true, zero_padded_frames: false``)
computes fairseq 2.0 audio's forward: the test-only reference
(tests/fairseq_reference/audio_multi.py, written from fairseq's source) on fairseq-named random
weights vs the d2v feature extractor + encoder given the same weights mapped by hand, on a
padded batch. This proves the architecture; the importer (d2v_audio.fairseq*) has its own tests.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from d2v_audio.encoder import AudioTransformerEncoder
from d2v_audio.feature_extractor import ConvFeatureExtractor
from fairseq_reference.audio_multi import (
    M,
    conv_spec,
    fairseq_multi_audio_cfg,
    fairseq_multi_audio_features,
    fairseq_multi_audio_state,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def d2v_backbone(cfg: dict, state: dict[str, Tensor]) -> tuple[ConvFeatureExtractor, AudioTransformerEncoder]:
    """The d2v modules for ``cfg`` with ``state``'s weights: the prenet blocks and the main
    blocks become one stack of post-LN layers, ``context_encoder.norm`` the encoder's
    ``layer_norm``, fused ``qkv`` splits into q/k/v, ``alibi_scale`` ``(n, 1, H|1, 1, 1)`` -> ``(n, H|1)``."""
    m, audio = cfg["model"], cfg["model"]["modalities"]["audio"]
    spec = conv_spec(cfg)
    dim, heads = m["embed_dim"], m["num_heads"]
    prenet, depth = audio["prenet_depth"], m["depth"]
    fe = ConvFeatureExtractor(conv_dim=[c for c, _, _ in spec], conv_kernel=[k for _, k, _ in spec],
                              conv_stride=[s for _, _, s in spec], conv_bias=False, dim=dim)
    enc = AudioTransformerEncoder(
        dim=dim, layers=prenet + depth, heads=heads, ffn_dim=int(dim * m["mlp_ratio"]),
        layer_norm_eps=m["norm_eps"], num_pos_conv_layers=audio["conv_pos_depth"],
        pos_conv_kernel=max(3, audio["conv_pos_width"] // audio["conv_pos_depth"]),
        pos_conv_groups=audio["conv_pos_groups"], alibi=audio["use_alibi_encoder"],
        alibi_scale_per_head=audio["learned_alibi_scale_per_head"],
        alibi_scale_per_layer=audio["learned_alibi_scale_per_layer"], zero_padded_frames=False,
    )
    fe_state = {"norm.weight": state[f"{M}project_features.1.weight"], "norm.bias": state[f"{M}project_features.1.bias"],
                "proj.weight": state[f"{M}project_features.2.weight"], "proj.bias": state[f"{M}project_features.2.bias"]}
    for i in range(len(spec)):
        fe_state[f"conv_layers.{i}.conv.weight"] = state[f"{M}local_encoder.conv_layers.{i}.0.weight"]
        fe_state[f"conv_layers.{i}.norm.weight"] = state[f"{M}local_encoder.conv_layers.{i}.2.1.weight"]
        fe_state[f"conv_layers.{i}.norm.bias"] = state[f"{M}local_encoder.conv_layers.{i}.2.1.bias"]
    fe.load_state_dict(fe_state)

    enc_state = {"mask_embedding": enc.mask_embedding.detach(),
                 "layer_norm.weight": state[f"{M}context_encoder.norm.weight"],
                 "layer_norm.bias": state[f"{M}context_encoder.norm.bias"]}
    for i in range(audio["conv_pos_depth"]):
        enc_state[f"pos_conv.layers.{i}.conv.weight"] = state[f"{M}relative_positional_encoder.{1 + i}.0.weight"]
        enc_state[f"pos_conv.layers.{i}.conv.bias"] = state[f"{M}relative_positional_encoder.{1 + i}.0.bias"]
    blocks = [f"{M}context_encoder.blocks.{i}." for i in range(prenet)] + [f"blocks.{i}." for i in range(depth)]
    for j, fs in enumerate(blocks):
        ours = f"layers.{j}."
        for part, (w, b) in {"q_proj": (0, 1), "k_proj": (1, 2), "v_proj": (2, 3)}.items():
            enc_state[f"{ours}attention.{part}.weight"] = state[f"{fs}attn.qkv.weight"][w * dim:b * dim]
            enc_state[f"{ours}attention.{part}.bias"] = state[f"{fs}attn.qkv.bias"][w * dim:b * dim]
        for theirs, mine in (("attn.proj", "attention.out_proj"), ("norm1", "attention_norm"),
                             ("mlp.fc1", "ffn.fc1"), ("mlp.fc2", "ffn.fc2"), ("norm2", "ffn_norm")):
            enc_state[f"{ours}{mine}.weight"] = state[f"{fs}{theirs}.weight"]
            enc_state[f"{ours}{mine}.bias"] = state[f"{fs}{theirs}.bias"]
    if audio["use_alibi_encoder"]:
        scale = state[f"{M}alibi_scale"]
        enc_state["alibi_scale"] = scale.reshape(scale.shape[0], scale.shape[2])
    enc.load_state_dict(enc_state)
    return fe.eval(), enc.eval()


def padded_batch() -> tuple[Tensor, Tensor]:
    torch.manual_seed(3)
    lengths = (1600, 1100, 700)
    source = torch.randn(len(lengths), max(lengths))
    padding = torch.arange(max(lengths))[None, :] >= torch.tensor(lengths)[:, None]
    return source.masked_fill(padding, 0.0), padding


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # recipe: per-head learned scale, one prenet block
        {"audio": {"prenet_depth": 0}},  # base_audio_only_task.yaml: prenet_depth 0
        {"audio": {"learned_alibi_scale_per_layer": True}},  # per-layer scales, prenet takes the first
        {"audio": {"learned_alibi_scale_per_head": False, "prenet_depth": 2}},
    ],
)
def test_d2v_encoder_equals_fairseq_2_audio_reference(overrides):
    cfg = fairseq_multi_audio_cfg(**overrides)
    state = fairseq_multi_audio_state(cfg, seed=7)
    assert state[f"{M}alibi_scale"].min() < 0 or state[f"{M}alibi_scale"].numel() == 1  # the clamp is exercised
    source, padding = padded_batch()
    expected = fairseq_multi_audio_features(state, cfg, source, padding)
    fe, enc = d2v_backbone(cfg, state)
    with torch.no_grad():
        feats = fe(source, padding)
        embedded = enc.embed(feats.features, feats.padding_mask)
        ours = enc.contextualize(embedded, feats.padding_mask).last_hidden_state
    assert ours.shape == expected.shape
    err = (ours - expected).abs().max().item()
    print(f"max abs error vs fairseq 2.0 audio reference {overrides}: {err:.2e}")
    assert err < 1e-5


def test_reference_is_sensitive_to_what_d2v_must_match():
    """The comparison above is not vacuous: zeroing padded frames (Hugging Face) or dropping
    ALiBi changes the reference's valid frames by far more than the tolerance."""
    cfg = fairseq_multi_audio_cfg()
    state = fairseq_multi_audio_state(cfg, seed=7)
    source, padding = padded_batch()
    expected = fairseq_multi_audio_features(state, cfg, source, padding)
    fe, enc = d2v_backbone(cfg, state)
    zeroing = AudioTransformerEncoder(**{**enc.hparams, "zero_padded_frames": True}).eval()
    zeroing.load_state_dict(enc.state_dict())
    no_alibi_cfg = fairseq_multi_audio_cfg(audio={"use_alibi_encoder": False})
    no_alibi = fairseq_multi_audio_features(
        {k: v for k, v in state.items() if "alibi" not in k}, no_alibi_cfg, source, padding)
    with torch.no_grad():
        feats = fe(source, padding)
        zeroed = zeroing.contextualize(zeroing.embed(feats.features, feats.padding_mask),
                                       feats.padding_mask).last_hidden_state
    valid = ~feats.padding_mask
    assert (zeroed - expected)[valid].abs().max() > 1e-3
    assert (no_alibi - expected)[valid].abs().max() > 1e-3


def test_state_names_and_shapes_follow_fairseq_modules():
    cfg = fairseq_multi_audio_cfg()
    state = fairseq_multi_audio_state(cfg, seed=0)
    assert state[f"{M}local_encoder.conv_layers.0.0.weight"].shape == (32, 1, 10)
    assert state[f"{M}local_encoder.conv_layers.2.2.1.weight"].shape == (32,)
    assert state[f"{M}project_features.2.weight"].shape == (32, 32)
    assert state[f"{M}relative_positional_encoder.2.0.weight"].shape == (32, 8, 5)  # 4 groups, k = max(3, 10 // 2)
    assert state[f"{M}alibi_scale"].shape == (1, 1, 4, 1, 1)
    assert state[f"{M}decoder.blocks.1.0.weight"].shape == (16, 4, 7)
    assert state[f"{M}decoder.proj.weight"].shape == (32, 16)
    assert state["blocks.1.attn.qkv.weight"].shape == (96, 32)
    assert state[f"{M}context_encoder.blocks.0.mlp.fc1.weight"].shape == (128, 32)
    assert not any(k.startswith("norm.") for k in state)  # layer_norm_first: false
    per_layer = fairseq_multi_audio_state(fairseq_multi_audio_cfg(audio={"learned_alibi_scale_per_layer": True}), 0)
    assert per_layer[f"{M}alibi_scale"].shape == (3, 1, 4, 1, 1)  # prenet_depth 1 + depth 2
    cfg["model"]["modalities"]["audio"]["feature_encoder_spec"] = "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]"
    assert conv_spec(cfg) == [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2
