"""ALiBi (d2v.nn.alibi) and the audio encoder's data2vec 2.0 options (alibi, zero_padded_frames):
slopes and biases against the published formula and against fairseq's own ``get_alibi`` (its
values recorded in ``tests/fairseq_oracle/fixtures/audio_alibi/``, regenerated with
``python tests/fairseq_oracle/make_fixtures.py audio_alibi``), the encoder against a hand-written attention,
the kept-token path against the full bias gathered at the kept positions, the scale clamp,
parameter shapes, EMA of the scale, and the Hugging Face exporter's refusal."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor
from hypothesis import given, settings
from hypothesis import strategies as st

from d2v.nn.alibi import alibi_bias_1d, alibi_bias_2d, alibi_slopes
from d2v.api.errors import SpecError
from d2v_audio.encoder import AudioTransformerEncoder

pytestmark = pytest.mark.usefixtures("single_thread")

#: what fairseq's get_alibi computes (tests/fairseq_oracle/audio.py, family audio_alibi)
FAIRSEQ = torch.load(Path(__file__).resolve().parents[1] / "fairseq_oracle" / "fixtures" / "audio_alibi" / "outputs.pt",
                     weights_only=True)

TINY = dict(dim=32, layers=2, heads=4, ffn_dim=64, num_pos_conv_layers=2, pos_conv_kernel=5, pos_conv_groups=4,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0)


# --------------------------------------------------------------------------- slopes and biases


def test_slopes_for_8_heads_are_the_published_values():
    assert alibi_slopes(8).tolist() == [1 / 2**k for k in range(1, 9)]


def test_slopes_for_12_heads_follow_the_non_power_of_two_rule():
    # 8 heads' slopes 2^-1..2^-8, then every other slope of 16 heads (2^-0.5, 2^-1.5, ...), first 4
    expected = [2.0**-k for k in range(1, 9)] + [2.0 ** -(0.5 + k) for k in range(4)]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(expected), rtol=1e-7, atol=0)


@given(st.integers(1, 64))
@settings(max_examples=40, deadline=None)
def test_slopes_match_fairseqs_get_slopes(heads):
    torch.testing.assert_close(alibi_slopes(heads), FAIRSEQ[f"slopes_{heads}"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("heads", [4, 8, 12, 16])
def test_1d_bias_is_slope_times_minus_distance(heads):
    T = 9
    bias = alibi_bias_1d(torch.arange(T), alibi_slopes(heads))
    slopes = alibi_slopes(heads)
    for h in range(heads):
        for i in range(T):
            for j in range(T):
                assert bias[h, i, j].item() == pytest.approx(-slopes[h].item() * abs(i - j), rel=1e-6, abs=1e-7)
    torch.testing.assert_close(bias, FAIRSEQ[f"bias_1d_{heads}"])


def test_2d_bias_is_manhattan_distance_on_the_grid():
    width, heads = 3, 4
    bias = alibi_bias_2d(torch.arange(9), alibi_slopes(heads), width)
    slopes = alibi_slopes(heads)
    for i in range(9):
        for j in range(9):
            d = abs(i // width - j // width) + abs(i % width - j % width)
            torch.testing.assert_close(bias[:, i, j], -slopes * d)
    torch.testing.assert_close(bias, FAIRSEQ["bias_2d_4"])


def test_bad_heads_or_width_are_spec_errors():
    with pytest.raises(SpecError, match="head"):
        alibi_slopes(0)
    with pytest.raises(SpecError, match="width"):
        alibi_bias_2d(torch.arange(4), alibi_slopes(2), 0)


# --------------------------------------------------------------------------- encoder vs hand-written attention


def hand_written(encoder: AudioTransformerEncoder, x: Tensor, padding: Tensor | None, positions: Tensor) -> Tensor:
    """The post-LN layers with ``softmax(q k^T / sqrt(d) + scale_h * slope_h * -|p_i - p_j|)``."""
    heads = encoder.heads
    b, t, dim = x.shape
    hd = dim // heads
    scales = encoder.alibi_scale.detach().clamp_min(0)
    slopes = FAIRSEQ[f"slopes_{heads}"]
    distance = -(positions[:, :, None] - positions[:, None, :]).abs().float()  # (B, T, T)
    for index, layer in enumerate(encoder.layers):
        att = layer.attention
        q = att.q_proj(x).view(b, t, heads, hd).transpose(1, 2)
        k = att.k_proj(x).view(b, t, heads, hd).transpose(1, 2)
        v = att.v_proj(x).view(b, t, heads, hd).transpose(1, 2)
        scale = scales[index if scales.shape[0] > 1 else 0].expand(heads)
        logits = q @ k.transpose(-1, -2) / math.sqrt(hd) + (scale * slopes)[None, :, None, None] * distance[:, None]
        if padding is not None:
            logits = logits.masked_fill(padding[:, None, None, :], float("-inf"))
        out = att.out_proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(b, t, dim))
        x = layer.attention_norm(x + out)
        x = layer.ffn_norm(x + layer.ffn(x))
    return x



def _encoder(**options) -> AudioTransformerEncoder:
    torch.manual_seed(0)
    enc = AudioTransformerEncoder(**TINY, alibi=True, **options).eval()
    with torch.no_grad():
        enc.alibi_scale.copy_(torch.rand(enc.alibi_scale.shape) * 2)
    return enc


@pytest.mark.parametrize("per_layer,per_head", [(False, True), (True, True), (True, False), (False, False)])
def test_encoder_with_alibi_equals_hand_written_attention_on_a_padded_batch(per_layer, per_head):
    enc = _encoder(alibi_scale_per_layer=per_layer, alibi_scale_per_head=per_head)
    x = torch.randn(3, 11, 32)
    padding = torch.zeros(3, 11, dtype=torch.bool)
    padding[1, 7:] = True
    padding[2, 4:] = True
    with torch.no_grad():
        out = enc.contextualize(x, padding).last_hidden_state
        ref = hand_written(enc, x, padding, torch.arange(11).expand(3, -1))
    valid = ~padding
    assert (out - ref)[valid].abs().max().item() < 1e-5
    assert (out - ref).abs().max().item() < 1e-5  # padded queries too: same keys, same bias


def test_kept_token_path_equals_full_bias_gathered_at_kept_positions():
    enc = _encoder(alibi_scale_per_layer=True)
    x = torch.randn(2, 12, 32)
    ids_keep = torch.stack([torch.tensor([0, 2, 3, 7, 8, 11]), torch.tensor([1, 4, 5, 6, 9, 10])])
    kept = x.gather(1, ids_keep[..., None].expand(-1, -1, 32))
    with torch.no_grad():
        out = enc.contextualize(kept, None, position_ids=ids_keep).last_hidden_state
        ref = hand_written(enc, kept, None, ids_keep)
        # the same through fairseq's masked_alibi: gather the full (T, T) bias at the kept rows/columns
        full = enc._alibi_bias(x, None).expand(2, -1, -1, -1)
        gathered = torch.stack([full[b][:, ids_keep[b]][:, :, ids_keep[b]] for b in range(2)])
        torch.testing.assert_close(enc._alibi_bias(kept, ids_keep), gathered)
        plain = enc.contextualize(kept, None).last_hidden_state  # positions 0..K-1: a different bias
    assert (out - ref).abs().max().item() < 1e-5
    assert (out - plain).abs().max().item() > 1e-3


def test_kept_token_path_with_padding_keeps_padding_masked():
    enc = _encoder()
    kept = torch.randn(2, 5, 32)
    ids_keep = torch.tensor([[0, 3, 4, 6, 9], [1, 2, 5, 7, 8]])
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    with torch.no_grad():
        out = enc.contextualize(kept, pad, position_ids=ids_keep).last_hidden_state
        ref = hand_written(enc, kept, pad, ids_keep)
        changed = kept.clone()
        changed[1, 3:] = 100.0
        out2 = enc.contextualize(changed, pad, position_ids=ids_keep).last_hidden_state
    assert (out - ref).abs().max().item() < 1e-5
    assert (out2[1, :3] - out[1, :3]).abs().max().item() < 1e-5  # padded keys are never attended


def test_negative_scales_are_clamped_at_zero():
    enc = _encoder()
    x = torch.randn(2, 8, 32)
    with torch.no_grad():
        enc.alibi_scale.fill_(-2.0)
        negative = enc.contextualize(x).last_hidden_state
        enc.alibi_scale.zero_()
        zero = enc.contextualize(x).last_hidden_state
        no_alibi = AudioTransformerEncoder(**TINY).eval()
        no_alibi.load_state_dict({k: v for k, v in enc.state_dict().items() if k != "alibi_scale"})
        plain = no_alibi.contextualize(x).last_hidden_state
    torch.testing.assert_close(negative, zero, rtol=0, atol=0)
    torch.testing.assert_close(zero, plain, rtol=0, atol=1e-6)


@pytest.mark.parametrize("per_layer,per_head,shape", [(False, True, (1, 4)), (True, True, (2, 4)),
                                                      (True, False, (2, 1)), (False, False, (1, 1))])
def test_scale_shapes_init_and_learnability(per_layer, per_head, shape):
    enc = AudioTransformerEncoder(**TINY, alibi=True, alibi_scale_per_layer=per_layer,
                                  alibi_scale_per_head=per_head, alibi_scale_init=0.5)
    assert tuple(enc.alibi_scale.shape) == shape
    assert torch.all(enc.alibi_scale == 0.5)
    assert enc.alibi_scale.requires_grad
    assert not AudioTransformerEncoder(**TINY, alibi=True, alibi_learned_scale=False).alibi_scale.requires_grad
    assert "alibi_slopes" not in enc.state_dict()  # derived from heads, not saved


def test_scale_gets_gradients():
    enc = _encoder()
    enc.contextualize(torch.randn(2, 6, 32)).last_hidden_state.pow(2).sum().backward()
    assert enc.alibi_scale.grad is not None and enc.alibi_scale.grad.abs().sum() > 0


def test_alibi_off_registers_nothing_and_keeps_the_old_state_dict():
    enc = AudioTransformerEncoder(**TINY)
    assert not hasattr(enc, "alibi_scale") or enc.alibi_scale is None
    assert not any("alibi" in k for k in enc.state_dict())


def test_mismatched_position_ids_are_a_spec_error():
    enc = _encoder()
    with pytest.raises(SpecError, match="position_ids"):
        enc.contextualize(torch.randn(1, 5, 32), position_ids=torch.arange(4)[None])


# --------------------------------------------------------------------------- zero_padded_frames


def test_zero_padded_frames_false_lets_padding_reach_the_positional_conv():
    torch.manual_seed(0)
    zeroing = AudioTransformerEncoder(**TINY).eval()
    keeping = AudioTransformerEncoder(**TINY, zero_padded_frames=False).eval()
    keeping.load_state_dict(zeroing.state_dict())
    x = torch.randn(2, 10, 32)
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[1, 6:] = True
    with torch.no_grad():
        a, b = zeroing.embed(x, pad), keeping.embed(x, pad)
        zeroed_input = keeping.embed(x.masked_fill(pad[..., None], 0.0), pad)
    torch.testing.assert_close(a, zeroed_input)
    assert (a[0] - b[0]).abs().max() == 0  # no padding: identical
    assert (a[1, :6] - b[1, :6]).abs().max() > 1e-4  # valid frames near the padding see it through the conv


# --------------------------------------------------------------------------- EMA teacher


def test_teacher_includes_and_averages_alibi_scale():
    from d2v.ssl.distill import make_teacher
    from d2v_audio.feature_extractor import ConvFeatureExtractor

    fe = ConvFeatureExtractor(conv_dim=[32, 32], conv_kernel=[10, 3], conv_stride=[5, 2], dim=32)
    enc = AudioTransformerEncoder(**TINY, alibi=True)
    teacher = make_teacher(fe, enc, "encoder", [])
    names = dict(teacher.model.named_parameters())
    assert "alibi_scale" in names
    with torch.no_grad():
        enc.alibi_scale.fill_(3.0)  # teacher still at 1.0
    teacher.update(enc, 0.9)
    torch.testing.assert_close(names["alibi_scale"], torch.full((1, 4), 0.9 * 1.0 + 0.1 * 3.0))


def test_teacher_copies_a_frozen_scale():
    from d2v.ssl.distill import make_teacher
    from d2v_audio.feature_extractor import ConvFeatureExtractor

    fe = ConvFeatureExtractor(conv_dim=[32], conv_kernel=[10], conv_stride=[5], dim=32)
    enc = AudioTransformerEncoder(**TINY, alibi=True, alibi_learned_scale=False)
    teacher = make_teacher(fe, enc, "encoder", [])
    with torch.no_grad():
        enc.alibi_scale.fill_(3.0)
    teacher.update(enc, 0.9)
    torch.testing.assert_close(dict(teacher.model.named_parameters())["alibi_scale"], torch.full((1, 4), 3.0))


# --------------------------------------------------------------------------- Hugging Face export


@pytest.mark.parametrize("options", [{"alibi": True}, {"zero_padded_frames": False}])
def test_hf_export_refuses_data2vec2_audio_options(options):
    from d2v.spec.model import build_model
    from d2v.api.plugins import registry
    from d2v_audio.hf import AudioModelConverter

    model = build_model({"preset": "data2vec-audio-tiny", "encoder": options}, registry(), "finetune")
    with pytest.raises(SpecError, match="ALiBi"):
        AudioModelConverter().to_hf(model)


def test_alibi_gradient_flows_through_sdpa_float_mask():
    enc = _encoder()
    x = torch.randn(2, 6, 32, requires_grad=True)
    enc.contextualize(x, torch.tensor([[False] * 6, [False] * 4 + [True] * 2])).last_hidden_state.sum().backward()
    assert torch.isfinite(x.grad).all()
