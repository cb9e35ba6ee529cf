"""data2vec 2.0 (core/d2v/ssl/distill2.py, plugins/d2v_targets/decoders.py) on the tiny audio model."""

from __future__ import annotations

import pickle

import pytest
import torch
from distill_helpers import build_tiny, train_on_waves, waves
from torch import nn

from d2v.api import plugins
from d2v.ssl.batch_masks import ConvFrameLengths, Data2Vec2Masks
from d2v.ssl.distill2 import Data2Vec2, decoder_input
from d2v.api.errors import SpecError
from d2v.api.interfaces import FeatureExtractor, FeatureExtractorOutput
from d2v.ssl.masking import InverseBlockMask
from d2v_targets.data2vec import Data2VecTarget
from d2v_targets.decoders import Decoder1d, Decoder2d

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py

AUDIO_MASK = {"name": "inverse_block", "dims": 1, "inverse": False, "mask_prob": 0.5, "mask_length": 3,
              "mask_prob_adjust": 0.05}


def build(**objective) -> Data2Vec2:
    return build_tiny({"name": "data2vec2", "clone_batch": 3, "decoder_dim": 32, "decoder_layers": 2, "decoder_kernel": 3,
                       "target": {"name": "data2vec", "top_k": 2}, "masking": AUDIO_MASK, **objective})


def test_registered_with_the_audio_base_defaults():
    comp = plugins.registry().get("objective", "data2vec2")
    assert comp.resolve() is Data2Vec2
    params = comp.parameters()
    assert (params["clone_batch"], params["decoder_dim"], params["decoder_kernel"], params["decoder_layers"],
            params["decoder_groups"], params["mask_noise_std"]) == (8, 384, 7, 4, 16, 0.01)
    assert (params["ema_decay"], params["ema_end_decay"], params["ema_anneal_end_step"]) == (0.999, 0.99999, 75000)


# ------------------------------------------------------------------ gather / scatter


def test_student_on_kept_tokens_equals_encoder_on_those_tokens_alone():
    torch.manual_seed(0)
    model = build().eval()
    batch = waves(batch=3)
    batch["padding_mask"][1, 3200:] = True  # one padded example: padding is kept, never masked
    M = model.clone_batch
    with torch.no_grad():
        fe = model.feature_extractor(batch["inputs"], batch["padding_mask"])
        B, T, _ = fe.features.shape
        mask = model._masks({}, B, T, fe.padding_mask, fe.features.device)
        feats, pad = fe.features.repeat_interleave(M, 0), fe.padding_mask.repeat_interleave(M, 0)
        hidden, ids_keep, _ = model.encode_kept(feats, pad, mask)
        assert hidden.shape[:2] == ids_keep.shape == (B * M, T - int(mask[0].sum()))
        for r in range(B * M):
            assert torch.equal(ids_keep[r], torch.nonzero(~mask[r]).flatten())  # kept, in order
            assert not (mask[r] & pad[r]).any()
            zeroed = feats[r : r + 1].masked_fill(mask[r, None, :, None], 0.0)
            embedded = model.encoder.embed(zeroed, pad[r : r + 1], torch.zeros_like(mask[r : r + 1]))
            real = ~mask[r] & ~pad[r]
            alone = model.encoder.contextualize(embedded[:, real]).last_hidden_state[0]  # no padding at all
            assert torch.allclose(hidden[r][~pad[r][ids_keep[r]]], alone, atol=1e-5)


def test_masked_frames_are_zeroed_before_the_positional_conv():
    model = build()
    seen = {}
    original = model.encoder.embed
    model.encoder.embed = lambda x, pad, mask: (seen.update(x=x, mask=mask), original(x, pad, mask))[1]
    batch = Data2Vec2Masks(model.masking, model.clone_batch, ConvFrameLengths(
        model.feature_extractor.conv_kernel, model.feature_extractor.conv_stride))(waves())
    model(batch)
    mask = batch["precomputed_mask"].flatten(0, 1)
    assert seen["x"][mask].abs().sum() == 0 and seen["x"][~mask].abs().sum() > 0
    assert not seen["mask"].any()  # no mask embedding, no SpecAugment


# ------------------------------------------------------------------ clone_batch


def test_clone_batch_shapes_and_repeat_interleaved_targets():
    torch.manual_seed(0)
    model = build(clone_batch=4)
    seen = {}
    model.teacher.model.register_forward_hook(lambda m, a, out: seen.update(teacher=a[0].shape))
    original = model.encoder.contextualize

    def spy(x, *args, **kwargs):
        seen["student"] = x.shape
        return original(x, *args, **kwargs)

    model.encoder.contextualize = spy
    batch = waves(batch=2)
    out = model(batch)
    B, M, T = 2, 4, 14
    masked = int(T * 0.5)
    assert seen["teacher"] == (B, T, 64)  # once per example
    assert seen["student"] == (B * M, T - masked, 64)  # M clones, kept tokens only
    assert out.sample_size == B * M * masked
    assert out.logs["masked_frac"] == pytest.approx(masked / T)

    with torch.no_grad():
        fe = model.feature_extractor(batch["inputs"], batch["padding_mask"])
        teacher_out = model.teacher(fe.features, fe.padding_mask, output_layer_targets=True)
        mask = model._masks({}, B, T, None, fe.features.device)
        targets, full = model._targets(teacher_out, mask)
    assert full.shape == (B, T, 64)
    expected = torch.cat([full[r // M][mask[r]] for r in range(B * M)])  # clone r belongs to example r // M
    assert torch.equal(targets, expected)


# ------------------------------------------------------------------ decoder


def test_decoder_input_keeps_outputs_and_puts_noise_at_masked_positions():
    torch.manual_seed(0)
    mask = torch.zeros(4, 300, dtype=torch.bool)
    for r in range(4):
        mask[r, torch.randperm(300)[:200]] = True
    from d2v.ssl.masking import keep_indices

    ids_keep, ids_restore = keep_indices(mask)
    kept = torch.randn(4, 100, 64)
    x = decoder_input(kept, ids_restore, 0.01)
    assert x.shape == (4, 300, 64)
    for r in range(4):
        assert torch.equal(x[r, ids_keep[r]], kept[r])
    noise = x[mask]
    assert noise.std().item() == pytest.approx(0.01, rel=0.05)
    assert abs(noise.mean().item()) < 1e-3


def test_decoder1d_shapes_residual_and_same_padding():
    x = torch.randn(2, 11, 32)
    for kernel in (3, 4, 7):
        assert Decoder1d(32, dim=16, kernel=kernel, layers=3, groups=4)(x).shape == (2, 11, 32)
    # zero convs: each block gives GELU(LN(0)) = 0, so with residual the decoder is proj(x)
    dec = Decoder1d(32, dim=32, kernel=3, layers=2, groups=4, residual=True)
    flat = Decoder1d(32, dim=32, kernel=3, layers=2, groups=4, residual=False)
    for d in (dec, flat):
        for block in d.blocks:
            nn.init.zeros_(block.conv.weight)
            nn.init.zeros_(block.conv.bias)
    flat.proj.load_state_dict(dec.proj.state_dict())
    with torch.no_grad():
        assert torch.allclose(dec(x), dec.proj(x), atol=1e-6)
        assert torch.allclose(flat(x), flat.proj(torch.zeros_like(x)), atol=1e-6)
    # text's two-layer projection
    text = Decoder1d(32, dim=32, kernel=9, layers=5, groups=1, residual=False, projection_layers=2)
    assert [type(m).__name__ for m in text.proj] == ["Linear", "GELU", "Linear"] and text.proj[0].out_features == 64


def test_decoder2d_shape():
    dec = Decoder2d(32, grid=(3, 4), dim=16, kernel=3, layers=2, groups=4)
    assert dec(torch.randn(2, 12, 32)).shape == (2, 12, 32)
    with pytest.raises(ValueError, match="3x4"):
        dec(torch.randn(2, 10, 32))


# ------------------------------------------------------------------ batch transform


@pytest.mark.parametrize("samples", [4800, 5000, 16000])
def test_batch_transform_is_picklable_and_masks_exactly(samples):
    model = build(clone_batch=4)
    transform = pickle.loads(pickle.dumps(model.make_batch_transform()))
    assert not isinstance(transform, nn.Module)
    batch = transform(waves(batch=3, samples=samples))
    T = model.feature_extractor(torch.zeros(1, samples)).features.shape[1]
    masks = batch["precomputed_mask"]
    assert masks.shape == (3, 4, T) and masks.dtype == torch.bool
    assert (masks.sum(-1) == int(T * 0.5)).all()  # exactly floor(T * R) masked in every clone
    assert len({tuple(m.tolist()) for m in masks.flatten(0, 1)}) > 1  # M different masks


def test_batch_transform_with_padding():
    model = build(clone_batch=2)
    batch = waves(batch=2, samples=8000)
    batch["padding_mask"][1, 4000:] = True
    batch = model.make_batch_transform()(batch)
    masks = batch["precomputed_mask"].flatten(0, 1)
    frame_pad = model.feature_extractor(batch["inputs"], batch["padding_mask"]).padding_mask
    pad = frame_pad.repeat_interleave(2, 0)
    assert not (masks & pad).any()
    counts = masks.sum(-1)
    assert (counts == counts[0]).all() and counts[0] == int((~frame_pad[1]).sum() * 0.5)
    out = model(batch)  # the forward uses exactly these masks
    assert out.sample_size == int(masks.sum())


def test_forward_without_or_with_mismatched_precomputed_masks():
    model = build()
    assert model(waves()).sample_size == 2 * 3 * 7
    batch = waves()
    batch["precomputed_mask"] = torch.zeros(2, 3, 5, dtype=torch.bool)
    with pytest.raises(SpecError, match=r"precomputed_mask has shape \(2, 3, 5\) but the features need \(2, 3, 14\)"):
        model(batch)


# ------------------------------------------------------------------ CLS hook (images)


class WithCLS(FeatureExtractor):
    """A feature extractor with one leading extra token, like an image patch embedding + CLS."""

    num_extra_tokens = 1

    def __init__(self, inner: FeatureExtractor):
        super().__init__()
        self.inner, self.dim = inner, inner.dim
        self.cls = nn.Parameter(torch.randn(inner.dim))

    def forward(self, inputs, padding_mask=None):
        out = self.inner(inputs, padding_mask)
        cls = self.cls.expand(out.features.shape[0], 1, -1)
        pad = None if out.padding_mask is None else nn.functional.pad(out.padding_mask, (1, 0), value=False)
        return FeatureExtractorOutput(features=torch.cat([cls, out.features], 1), padding_mask=pad)


def test_cls_loss_with_an_extra_token():
    torch.manual_seed(0)
    base = build()
    model = Data2Vec2(
        feature_extractor=WithCLS(base.feature_extractor), encoder=base.encoder, target=Data2VecTarget(top_k=2),
        masking=InverseBlockMask(dims=1, inverse=False, mask_prob=0.5, mask_length=3, mask_prob_adjust=0.05),
        clone_batch=2, decoder_dim=32, decoder_layers=1, cls_loss=0.01,
    )
    out = model(waves())
    assert out.sample_size == 2 * 2 * 7  # the CLS position is never masked nor regressed
    assert out.logs["cls_loss"] > 0
    out.loss.backward()
    assert model.feature_extractor.cls.grad is not None


# ------------------------------------------------------------------ training


def test_loss_decreases_on_a_tiny_synthetic_task():
    torch.manual_seed(0)
    model = build(clone_batch=2, ema_decay=0.99, ema_end_decay=0.999, ema_anneal_end_step=30)
    losses, out = train_on_waves(model, steps=30, transform=model.make_batch_transform())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, losses
    assert out.logs["target_std"] > 0.1
    assert model.current_decay() == pytest.approx(0.999)


def test_inputs_corrupted_by_the_processor_are_refused():
    """data2vec 2.0 drops tokens itself; BERT-masked inputs from the processor would leak
    corrupted tokens into the student, so the spec mistake is named."""
    from d2v.api.errors import SpecError

    model = build()
    batch = waves()
    with pytest.raises(SpecError, match="remove data.processor.masking"):
        model({**batch, "corrupted_mask": torch.zeros(2, 10, dtype=torch.bool)})


class _WidthAwareTarget(Data2VecTarget):
    """A plugin target that sizes itself from the encoder (e.g. a classifier over clusters)."""

    def __init__(self, *, input_dim: int, num_layers: int, **kwargs):
        super().__init__(**kwargs)
        self.seen = (input_dim, num_layers)


def test_an_objectives_target_is_given_the_encoder_width_like_a_head():
    """``input_dim`` / ``num_layers`` are injected into a target that takes them (the spec need
    not repeat the encoder's width), and ``d2v check`` does not ask for them."""
    from types import SimpleNamespace

    from d2v.spec.config import spec_from_dict, validate
    from d2v.api.hookspecs import hookimpl
    from d2v.spec.model import build_model

    class Plugin:
        @staticmethod
        @hookimpl
        def d2v_register(register):
            register("target", "width_aware", _WidthAwareTarget)

    plugins.register_plugin(SimpleNamespace(d2v_register=Plugin.d2v_register), "width-aware")
    try:
        model_spec = {"preset": "data2vec-audio-tiny",
                      "objective": {"name": "data2vec2", "clone_batch": 2,
                                    "target": {"name": "width_aware", "top_k": 2},
                                    "masking": {"name": "inverse_block", "dims": 1, "mask_prob": 0.5,
                                                "mask_length": 2}}}
        validate(spec_from_dict({"task": "pretrain", "model": model_spec,
                                 "data": {"processor": {"name": "audio"}, "train": {"name": "librispeech", "root": ".", "splits": ["x"]}},
                                 "optim": {"name": "adam"}}))
        model = build_model(model_spec, plugins.registry(), "pretrain")
        assert model.target.seen == (model.encoder.dim, model.encoder.num_layers)
    finally:
        plugins.unregister_plugin("width-aware")
