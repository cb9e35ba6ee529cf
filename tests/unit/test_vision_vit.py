"""data2vec 2.0's ViT (vision.vit + vision.vit_transformer): sin-cos positions against the
formula, the kept-token path against the full path, pooling, presets, and the data2vec2
objective training with it."""

from __future__ import annotations

import math

import pytest
import torch

from d2v.api import plugins
from d2v.spec.config import resolve_model_section
from d2v.api.errors import SpecError
from d2v.spec.model import build_model, build_task_model
from d2v_vision.sincos import sincos_2d
from d2v_vision.vit_encoder import ViTEncoder
from d2v_vision.vit_patches import ViTPatchEmbedding

pytestmark = pytest.mark.usefixtures("single_thread")


def formula(dim: int, row: int, col: int, channel: int) -> float:
    """MAE's 2-D sin-cos code written per channel: the first half encodes the column."""
    half, quarter = dim // 2, dim // 4
    pos, k = (col, channel) if channel < half else (row, channel - half)
    omega = 1.0 / 10000 ** ((k % quarter) / quarter)
    return math.sin(pos * omega) if k < quarter else math.cos(pos * omega)


@pytest.mark.parametrize("dim,grid", [(8, (2, 2)), (16, (3, 5)), (32, (4, 4))])
def test_sincos_positions_follow_the_formula(dim, grid):
    table = sincos_2d(dim, grid)
    assert table.shape == (grid[0] * grid[1], dim) and table.dtype == torch.float32
    for index in range(grid[0] * grid[1]):
        row, col = divmod(index, grid[1])
        expected = torch.tensor([formula(dim, row, col, c) for c in range(dim)])
        torch.testing.assert_close(table[index], expected, atol=1e-6, rtol=0)
    with pytest.raises(SpecError, match="divisible by 4"):
        sincos_2d(6, (2, 2))


def test_patch_embedding_adds_positions_and_puts_the_cls_first():
    torch.manual_seed(0)
    fe = ViTPatchEmbedding(dim=16, image_size=8, patch_size=4, num_extra_tokens=1)
    images = torch.randn(2, 3, 8, 8)
    out = fe(images).features
    patches = torch.nn.functional.conv2d(images, fe.projection.weight, fe.projection.bias, stride=4)
    patches = patches.flatten(2).transpose(1, 2)
    torch.testing.assert_close(out[:, 1:], patches + sincos_2d(16, (2, 2)))
    torch.testing.assert_close(out[:, 0], fe.extra_tokens[0, 0].expand(2, -1))
    assert fe.grid_size == (2, 2) and "positions" in fe.state_dict()
    # another (non-square) size: the same formula on that grid
    wide = fe(torch.randn(1, 3, 8, 12)).features
    assert wide.shape == (1, 1 + 6, 16)
    with pytest.raises(SpecError, match="multiple of patch_size"):
        fe(torch.randn(1, 3, 9, 8))


def tiny_encoder(**kw) -> ViTEncoder:
    torch.manual_seed(0)
    return ViTEncoder(dim=16, layers=3, prenet_layers=1, heads=2, ffn_dim=32, **kw).eval()


@pytest.mark.parametrize("layer_norm_first", [False, True])
def test_kept_tokens_give_the_full_path_restricted_to_them(layer_norm_first):
    """Dropping tokens equals attending only to them: positions travel with the tokens."""
    enc = tiny_encoder(layer_norm_first=layer_norm_first)
    x = enc.embed(torch.randn(2, 17, 16))
    keep = torch.tensor([[0, 2, 5, 11, 16], [0, 1, 3, 4, 9]])
    kept = x.gather(1, keep[..., None].expand(-1, -1, 16))
    got = enc.contextualize(kept, position_ids=keep, output_layer_targets=True)
    pad = torch.ones(2, 17, dtype=torch.bool).scatter(1, keep, False)
    full = enc.contextualize(x, pad, output_layer_targets=True)
    pick = lambda t: t.gather(1, keep[..., None].expand(-1, -1, 16))  # noqa: E731
    torch.testing.assert_close(got.last_hidden_state, pick(full.last_hidden_state), atol=1e-5, rtol=0)
    for a, b in zip(got.layer_targets, full.layer_targets):
        torch.testing.assert_close(a, pick(b), atol=1e-5, rtol=0)


def test_mlp_residual_false_is_fairseqs_pre_ln_block():
    """fairseq's pre-LN AltBlock: ``r = x = mlp(norm2(x)); x = r + drop(x)`` (no residual around
    the MLP); d2v's own pre-LN block keeps it. Post-LN has no such variant."""
    x = torch.randn(2, 5, 16)
    ours, fairseqs = tiny_encoder(layer_norm_first=True), tiny_encoder(layer_norm_first=True, mlp_residual=False)
    fairseqs.load_state_dict(ours.state_dict())
    block_ours, block_fairseq = ours.layers[0], fairseqs.layers[0]
    h = x + block_ours.attention(block_ours.norm1(x), None)
    ffn = block_ours.mlp(block_ours.norm2(h))
    torch.testing.assert_close(block_ours(x, None)[0], h + ffn)
    torch.testing.assert_close(block_fairseq(x, None)[0], ffn + ffn)
    with pytest.raises(SpecError, match="mlp_residual: false exists only for pre-LN"):
        tiny_encoder(mlp_residual=False)


def test_pooling_means_the_patches_or_takes_the_cls():
    x = torch.randn(2, 5, 16)
    mean = tiny_encoder().contextualize(x)
    torch.testing.assert_close(mean.pooler_output,
                               torch.nn.functional.layer_norm(mean.last_hidden_state[:, 1:].mean(1), (16,), eps=1e-6))
    cls = tiny_encoder(use_mean_pooling=False, use_pooler_norm=False).contextualize(x)
    torch.testing.assert_close(cls.pooler_output, cls.last_hidden_state[:, 0])
    assert tiny_encoder(add_pooling_layer=False).contextualize(x).pooler_output is None
    with pytest.raises(SpecError, match="prenet_layers"):
        ViTEncoder(dim=16, layers=2, prenet_layers=3, heads=2, ffn_dim=32)


def test_layer_targets_are_the_ffn_outputs_and_masking_replaces_the_token():
    enc = tiny_encoder()
    x = torch.randn(1, 5, 16)
    out = enc(x, output_layer_targets=True, output_hidden_states=True)
    assert len(out.layer_targets) == 3 and len(out.hidden_states) == 4
    block = enc.layers[-1]
    h = out.hidden_states[-2]
    attended = block.norm1(h + block.attention(h, None))
    torch.testing.assert_close(out.layer_targets[-1], block.mlp(attended))
    mask = torch.tensor([[False, True, False, False, True]])
    embedded = enc.embed(x, mask=mask)
    torch.testing.assert_close(embedded[0, 1], enc.layer_norm(enc.mask_embedding))


def test_presets_have_the_published_shapes():
    registry = plugins.registry()
    base = resolve_model_section({"preset": "data2vec2-vision-base"}, registry)
    assert base["encoder"]["layers"] == 12 and base["encoder"]["prenet_layers"] == 2 and base["encoder"]["dim"] == 768
    large = resolve_model_section({"preset": "data2vec2-vision-large"}, registry)
    assert (large["encoder"]["layers"], large["encoder"]["prenet_layers"], large["encoder"]["dim"]) == (24, 0, 1024)
    model = build_task_model({"preset": "data2vec2-vision-tiny",
                              "head": {"name": "image_classification", "num_labels": 3}}, registry)
    out = model({"inputs": torch.randn(2, 3, 32, 32), "labels": torch.tensor([0, 2])})
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)


def test_the_data2vec2_objective_trains_the_vit():
    torch.manual_seed(0)
    spec = {
        "preset": "data2vec2-vision-tiny",
        "feature_extractor": {"image_size": 16},
        "encoder": {"add_pooling_layer": False},
        "objective": {
            "name": "data2vec2", "clone_batch": 2, "cls_loss": 0.01, "ema_scope": "all", "encoder_zero_mask": False,
            "target": {"name": "data2vec", "top_k": 2, "layer_norm": "instance", "final_norm": "layer"},
            "masking": {"name": "inverse_block", "dims": 2, "inverse": True, "mask_prob": 0.75, "mask_length": 2,
                        "mask_prob_adjust": 0.0},
            "decoder_type": "2d", "decoder_dim": 32, "decoder_kernel": 3, "decoder_layers": 2, "decoder_groups": 16,
            "decoder_input_dropout": 0.0, "ema_decay": 0.99, "ema_end_decay": 0.99, "ema_anneal_end_step": 10,
        },
    }
    model = build_model(spec, plugins.registry(), "pretrain").train()
    assert {n.split(".")[0] for n, _ in model.teacher.named_parameters()} == {"model"}
    assert any(n.startswith("model.feature_extractor.projection") for n, _ in model.teacher.named_parameters())
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    images = torch.randn(4, 3, 16, 16)
    losses = []
    for step in range(20):
        out = model({"inputs": images})
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        model.after_optimizer_step(step + 1)  # the EMA teacher follows, patch embedding included
        losses.append(float(out.loss.detach()))
        assert "cls_loss" in out.logs and 0.7 < out.logs["masked_frac"] < 0.8
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses
