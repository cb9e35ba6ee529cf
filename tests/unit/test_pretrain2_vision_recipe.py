"""experiments/pretrain2_vision_in1k.yaml is fairseq's published data2vec 2.0 ViT-B recipe
(examples/data2vec/config/v2/base_images_only_task.yaml), key by key; the values below are that
file's (or, where it is silent, its dataclass defaults', named in the comments); the objective's
are read off the model the spec builds (32 wide), its masks drawn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from d2v.api import plugins
from d2v.spec.config import load_spec, resolve_model_section

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def spec():
    return load_spec(ROOT / "experiments" / "pretrain2_vision_in1k.yaml")


def test_backbone_is_the_published_vit_b(spec):
    model = resolve_model_section(dict(spec["model"]), plugins.registry())
    fe, enc = model["feature_extractor"], model["encoder"]
    assert fe["name"] == "vision.vit" and enc["name"] == "vision.vit_transformer"
    assert fe["image_size"] == 224 and fe["patch_size"] == 16                    # input_size, patch_size
    assert enc["dim"] == 768 and enc["heads"] == 12 and enc["ffn_dim"] == 3072    # embed_dim, num_heads, mlp_ratio 4
    assert enc["layers"] == 12 and enc["prenet_layers"] == 2                      # depth 10 + prenet_depth 2
    assert enc["layer_norm_eps"] == 1e-6                                          # norm_eps
    for key in ("dropout", "post_mlp_dropout", "attention_dropout", "activation_dropout", "drop_path_rate"):
        assert enc[key] == 0.0, key                       # encoder_dropout, post_mlp_drop, ... all 0
    assert enc.get("layer_norm_first", False) is False                           # layer_norm_first default


@pytest.fixture(scope="module")
def built(spec):
    """The recipe built as it is but 32 wide."""
    from d2v.spec.model import build_model

    model = dict(spec["model"])
    model["encoder"] = {**model["encoder"], "dim": 32, "heads": 4, "ffn_dim": 64}
    torch.manual_seed(0)
    return build_model(model, plugins.registry(), "pretrain")


def test_objective_is_the_published_one(built):
    """The built objective (not the YAML): its masks, decoder, target, loss scale and teacher."""
    from d2v.ssl.distill2 import Data2Vec2

    model = built
    assert isinstance(model, Data2Vec2)
    # 16 masked copies per image (clone_batch: 16); inverse block masking of the 14 x 14 patches
    # (mask_prob 0.8, mask_length 3, mask_prob_adjust 0.07, inverse_mask): exactly int(196 * 0.2) = 39 kept
    masks = model.make_batch_transform()({"inputs": torch.zeros(2, 3, 224, 224)},
                                         rng=np.random.default_rng(0))["precomputed_mask"]
    assert masks.shape == (2, 16, 196) and bool((masks.sum(-1) == 196 - 39).all())
    assert (model.masking.mask_length, model.masking.mask_prob_adjust, model.masking.dims) == (3, 0.07, 2)
    # decoder: decoder_dim 768, decoder_kernel 3, decoder_layers 6, decoder_groups 16, input_dropout 0,
    # residual (default), 1 projection layer
    convs = [block.conv for block in model.decoder.blocks]
    assert len(convs) == 6 and all((c.out_channels, c.kernel_size, c.groups) == (768, (3, 3), 16) for c in convs)
    assert model.decoder.residual is True and isinstance(model.decoder.proj, torch.nn.Linear)
    assert model.decoder_input_dropout == 0.0 and model.mask_noise_std == 0.01
    assert model.cls_loss == 0.01                                                # cls_loss: 0.01
    # average_top_k_layers 10, instance_norm_target_layer, layer_norm_targets, loss_beta 0, loss_scale None
    target = model.target
    assert (target.top_k, target.layer_norm, target.final_norm, target.loss_type) == (10, "instance", "layer", "l2")
    assert target.scale_for(32) == pytest.approx(32 ** -0.5) and model.target_feature == "ffn"
    # ema_encoder_only: false, ema_local_encoder: true: the teacher has its own patch embedding too
    assert set(dict(model.teacher.model.named_children())) == {"feature_extractor", "encoder"}
    # ema_decay 0.9998 -> ema_end_decay 0.99999, linearly over ema_anneal_end_step 100000
    for updates, decay in ((0, 0.9998), (50000, 0.999895), (100000, 0.99999), (375300, 0.99999)):
        model.num_updates.fill_(updates)
        assert model.current_decay() == pytest.approx(decay, abs=1e-12), updates
    model.num_updates.fill_(0)
    assert (model.min_target_std, model.min_pred_std) == (0.0, 0.0)             # min_target_var, min_pred_var: 0


def test_optimisation_and_data_are_the_published_ones(spec):
    optim, schedule, trainer = spec["optim"], spec["schedule"], spec["trainer"]
    assert optim["name"] == "adamw" and optim["lr"] == 1e-3 and optim["betas"] == [0.9, 0.95]
    assert optim["weight_decay"] == 0.05 and optim["eps"] == 1e-8                # adam_eps default
    assert schedule == {"name": "cosine", "warmup_steps": 50040, "final_lr_scale": 0.0}
    assert trainer["max_steps"] == 375300 and trainer["clip_norm"] == 4.0
    assert trainer["mixed_precision"] == "fp16" and trainer["save_every"] == 25000 and trainer["keep_last"] == 1
    assert trainer["log_every"] == 200
    assert spec["data"]["loader"]["batch_size"] == 16 and spec["data"]["loader"]["num_workers"] == 10
    proc = spec["data"]["processor"]
    assert (proc["crop_size"], proc["min_crop_scale"], proc["hflip"]) == (224, 0.2, 0.5)  # RandomResizedCrop(0.2, 1)
    assert proc["image_mean"] == [0.485, 0.456, 0.406] and proc["image_std"] == [0.229, 0.224, 0.225]
    assert spec["seed"] == 1
