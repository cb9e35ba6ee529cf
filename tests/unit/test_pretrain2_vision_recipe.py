"""experiments/pretrain2_vision_in1k.yaml is fairseq's published data2vec 2.0 ViT-B recipe
(examples/data2vec/config/v2/base_images_only_task.yaml), key by key; the values below are that
file's (or, where it is silent, its dataclass defaults', named in the comments)."""

from __future__ import annotations

from pathlib import Path

import pytest

from d2v import plugins
from d2v.config import load_spec, resolve_model_section

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


def test_objective_is_the_published_one(spec):
    obj = spec["model"]["objective"]
    assert obj["name"] == "data2vec2" and obj["clone_batch"] == 16
    assert obj["target"] == {"name": "data2vec", "top_k": 10, "layer_norm": "instance", "final_norm": "layer",
                             "loss": "l2", "loss_scale": None}  # average_top_k_layers, instance_norm_target_layer,
    #                                                          layer_norm_targets, loss_beta 0, loss_scale None
    assert obj["masking"] == {"name": "inverse_block", "dims": 2, "inverse": True, "mask_prob": 0.8,
                              "mask_length": 3, "mask_prob_adjust": 0.07}
    assert (obj["decoder_type"], obj["decoder_dim"], obj["decoder_kernel"], obj["decoder_layers"],
            obj["decoder_groups"], obj["decoder_input_dropout"]) == ("2d", 768, 3, 6, 16, 0.0)
    assert obj["decoder_residual"] is True                                       # decoder_residual default
    assert obj["mask_noise_std"] == 0.01 and obj["cls_loss"] == 0.01
    assert obj["ema_scope"] == "all"                      # ema_encoder_only: false, ema_local_encoder: true
    assert (obj["ema_decay"], obj["ema_end_decay"], obj["ema_anneal_end_step"]) == (0.9998, 0.99999, 100000)
    assert obj["target_feature"] == "ffn"                                        # end_of_block_targets: false
    assert obj["min_target_std"] == 0.0 and obj["min_pred_std"] == 0.0           # min_target_var, min_pred_var


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
