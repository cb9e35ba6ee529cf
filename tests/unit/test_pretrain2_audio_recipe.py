"""experiments/pretrain2_audio_ls960.yaml is fairseq's published data2vec 2.0 Base speech recipe
(examples/data2vec/config/v2/base_audio_only_task.yaml), key by key; the values below are that
file's (or, where it is silent, the defaults of its dataclasses -- Data2VecMultiConfig,
D2vModalityConfig, D2vAudioConfig, D2vDecoderConfig -- named in the comments). The objective's
values are read off the model the spec builds (32 wide), its masks drawn. Also: the demo uses the
same encoder options, and the spec builds a student whose teacher EMAs ``alibi_scale``."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

from d2v.api import plugins
from d2v.spec.config import load_spec, resolve_model_section
from d2v_audio.encoder import AudioTransformerEncoder
from d2v_audio.feature_extractor import ConvFeatureExtractor

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def spec():
    return load_spec(ROOT / "experiments" / "pretrain2_audio_ls960.yaml")


def with_defaults(component: type, settings: dict) -> dict:
    """A component's settings over its constructor defaults (what it is built with)."""
    defaults = {name: p.default for name, p in inspect.signature(component).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **settings}


@pytest.fixture(scope="module")
def backbone(spec):
    model = resolve_model_section(dict(spec["model"]), plugins.registry())
    return {"feature_extractor": with_defaults(ConvFeatureExtractor, model["feature_extractor"]),
            "encoder": with_defaults(AudioTransformerEncoder, model["encoder"])}


def test_feature_extractor_is_the_published_one(backbone):
    fe = backbone["feature_extractor"]
    assert fe["name"] == "audio.conv"
    # feature_encoder_spec: [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]
    assert fe["conv_dim"] == [512] * 7
    assert fe["conv_kernel"] == [10, 3, 3, 3, 3, 2, 2] and fe["conv_stride"] == [5, 2, 2, 2, 2, 2, 2]
    assert fe["conv_bias"] is False                     # AudioEncoder: ConvFeatureExtractionModel(conv_bias=False)
    assert fe["feat_proj_dropout"] == 0.0               # project_features: LayerNorm + Linear, no dropout


def test_encoder_is_the_published_one(backbone):
    enc = backbone["encoder"]
    assert enc["name"] == "audio.transformer"
    assert enc["dim"] == 768 and enc["heads"] == 12 and enc["ffn_dim"] == 3072  # embed_dim, num_heads, mlp_ratio 4
    assert enc["layers"] == 12                                                   # depth 12 + prenet_depth 0
    assert enc["layer_norm_eps"] == 1e-5                                         # norm_eps: 1e-5
    assert enc["dropout"] == 0.1                        # encoder_dropout, post_mlp_drop (defaults), prenet_dropout: 0.1
    assert enc["attention_dropout"] == 0.1              # attention_dropout default
    assert enc["activation_dropout"] == 0.0             # activation_dropout default
    assert enc["layerdrop"] == 0.05                     # layerdrop: 0.05, prenet_layerdrop: 0.05
    # conv_pos_depth: 5, conv_pos_width: 95 (kernel max(3, 95 // 5) = 19), conv_pos_groups: 16
    assert (enc["num_pos_conv_layers"], enc["pos_conv_kernel"], enc["pos_conv_groups"]) == (5, 19, 16)
    assert enc["alibi"] is True                         # use_alibi_encoder: true
    assert enc["alibi_scale_init"] == 1.0               # alibi_scale default 1.0
    assert enc["alibi_learned_scale"] is True           # learned_alibi_scale: true
    assert enc["alibi_scale_per_head"] is True          # learned_alibi_scale_per_head: true
    assert enc["alibi_scale_per_layer"] is False        # learned_alibi_scale_per_layer default
    assert enc["zero_padded_frames"] is False           # ModalitySpecificEncoder never zeroes padded frames
    assert enc.get("add_adapter", False) is False


@pytest.fixture(scope="module")
def built(spec):
    """The recipe built as it is but 32 wide (conv channels and model dimension)."""
    from d2v.spec.model import build_model

    model = dict(spec["model"])
    model["encoder"] = {**model["encoder"], "dim": 32, "heads": 4, "ffn_dim": 64}
    model["feature_extractor"] = {**model.get("feature_extractor", {}), "conv_dim": [32] * 7}
    torch.manual_seed(0)
    return build_model(model, plugins.registry(), "pretrain")


def test_objective_is_the_published_one(built):
    """The built objective (not the YAML): its masks, decoder, target, loss scale and teacher."""
    from d2v.ssl.distill2 import Data2Vec2

    model = built
    assert isinstance(model, Data2Vec2)
    # 8 masked copies per example (clone_batch: 8), each with exactly int(T * 0.5) of its T frames
    # masked (compute_block_mask_1d, mask_prob: 0.5, mask_length: 5, mask_prob_adjust: 0.05, not inverted)
    inputs = torch.randn(2, 32000)
    masks = model.make_batch_transform()({"inputs": inputs, "padding_mask": torch.zeros_like(inputs, dtype=torch.bool)},
                                         rng=np.random.default_rng(0))["precomputed_mask"]
    frames = model.feature_extractor(inputs).features.shape[1]
    assert masks.shape == (2, 8, frames) and bool((masks.sum(-1) == int(frames * 0.5)).all())
    assert (model.masking.mask_length, model.masking.mask_prob_adjust, model.masking.inverse) == (5, 0.05, False)
    # decoder: decoder_dim 384, decoder_kernel 7, decoder_layers 4, decoder_groups 16, input_dropout 0.1;
    # decoder_residual true and projection_layers 1 are D2vDecoderConfig defaults
    convs = [block.conv for block in model.decoder.blocks]
    assert len(convs) == 4 and all((c.out_channels, c.kernel_size, c.groups) == (384, (7,), 16) for c in convs)
    assert model.decoder.residual is True and isinstance(model.decoder.proj, torch.nn.Linear)
    assert model.decoder_input_dropout == 0.1 and model.mask_noise_std == 0.01  # mask_noise_std: 0.01
    assert model.encoder_zero_mask is True and model.cls_loss == 0.0            # encoder_zero_mask, cls_loss defaults
    # average_top_k_layers: 8, instance_norm_target_layer: true, layer_norm_targets: false, loss_beta: 0,
    # loss_scale: null (1/sqrt(dim))
    target = model.target
    assert (target.top_k, target.layer_norm, target.final_norm, target.loss_type) == (8, "instance", None, "l2")
    assert target.scale_for(32) == pytest.approx(32 ** -0.5) and model.target_feature == "ffn"
    # ema_encoder_only: false, ema_local_encoder: false: the teacher averages the Transformer (with its
    # own conv positional encoder: nothing copied) and reuses the student's CNN
    assert type(model.teacher.model) is type(model.encoder) and model.teacher.copy_keys == ()
    # ema_decay 0.999 -> ema_end_decay 0.99999, linearly over ema_anneal_end_step 75000
    for updates, decay in ((0, 0.999), (37500, 0.999495), (75000, 0.99999), (400000, 0.99999)):
        model.num_updates.fill_(updates)
        assert model.current_decay() == pytest.approx(decay, abs=1e-12), updates
    model.num_updates.fill_(0)
    # min_target_var, min_pred_var defaults, checked after 5000 updates
    assert (model.min_target_std, model.min_pred_std, model.collapse_check_after) == (0.1, 0.01, 5000)


def test_optimisation_and_data_are_the_published_ones(spec):
    optim, schedule, trainer = spec["optim"], spec["schedule"], spec["trainer"]
    assert optim["name"] == "adam" and optim["lr"] == 7.5e-4                     # optimizer adam, lr [0.00075]
    assert optim["betas"] == [0.9, 0.98] and optim["eps"] == 1e-6                # adam_betas, adam_eps
    assert optim["weight_decay"] == 0.01                                         # weight_decay: 0.01
    assert schedule == {"name": "cosine", "warmup_steps": 8000, "final_lr_scale": 0.0}  # cosine, warmup_updates, min_lr 0
    assert trainer["max_steps"] == 400000                                        # max_update: 400000
    assert trainer.get("clip_norm", 0) == 0                                      # no clip_norm in the base recipe
    assert trainer["mixed_precision"] == "fp16"                                  # common.fp16: true
    assert trainer["save_every"] == 25000 and trainer["keep_last"] == 1          # save_interval_updates, keep_interval_updates
    assert trainer["log_every"] == 200                                           # log_interval: 200
    proc = spec["data"]["processor"]
    assert proc["sample_rate"] == 16000 and proc["normalize"] is True            # task.normalize: true
    assert (proc["min_samples"], proc["max_samples"]) == (32000, 320000)         # min/max_sample_size
    loader = spec["data"]["loader"]
    assert loader["max_batch_seconds"] * 16000 == 1_000_000                      # dataset.max_tokens per GPU
    assert loader["num_workers"] == 6                                            # dataset.num_workers: 6
    assert spec["seed"] == 1                                                     # common.seed default


def test_demo_uses_the_same_encoder_options():
    demo = load_spec(ROOT / "experiments" / "pretrain2_audio_demo.yaml")
    enc = resolve_model_section(dict(demo["model"]), plugins.registry())["encoder"]
    assert enc["alibi"] is True and enc["alibi_learned_scale"] is True and enc["alibi_scale_per_head"] is True
    assert enc["zero_padded_frames"] is False


def test_the_recipe_builds_a_student_whose_teacher_averages_alibi_scale(spec):
    """The recipe's objective at a tiny size: one training step gives alibi_scale a gradient and
    the EMA teacher moves its copy towards the student's."""
    from d2v.spec.model import build_model

    model_spec = dict(spec["model"])
    model_spec["preset"] = "data2vec-audio-tiny"
    model_spec["encoder"] = {**spec["model"]["encoder"], "layerdrop": 0.0}
    model_spec["objective"] = {**spec["model"]["objective"], "clone_batch": 2, "decoder_dim": 32,
                               "decoder_layers": 2, "target": {**spec["model"]["objective"]["target"], "top_k": 2}}
    torch.manual_seed(0)
    model = build_model(model_spec, plugins.registry(), "pretrain")
    assert tuple(model.encoder.alibi_scale.shape) == (1, 4)
    teacher_scale = dict(model.teacher.model.named_parameters())["alibi_scale"]
    lengths = torch.tensor([16000, 11000])
    inputs = torch.randn(2, 16000)
    padding = torch.arange(16000)[None, :] >= lengths[:, None]
    out = model({"inputs": inputs.masked_fill(padding, 0.0), "padding_mask": padding})
    out.loss.backward()
    assert model.encoder.alibi_scale.grad is not None and model.encoder.alibi_scale.grad.abs().sum() > 0
    with torch.no_grad():
        model.encoder.alibi_scale.add_(1.0)
    model.after_optimizer_step(1)  # the runner's EMA hook
    decay = model.current_decay()
    assert 0.99 < decay < 1.0
    torch.testing.assert_close(teacher_scale, torch.full((1, 4), decay * 1.0 + (1 - decay) * 2.0))
