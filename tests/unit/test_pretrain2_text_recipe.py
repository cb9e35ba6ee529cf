"""experiments/pretrain2_text_base.yaml is fairseq's published data2vec 2.0 text Base recipe
(examples/data2vec/config/v2/base_text_only_task.yaml), key by key; the values below are that
file's (or, where it is silent, its dataclass defaults', named in the comments); the objective's
are read off the model the spec builds (32 wide), its masks drawn. The fairseq importer, reading
the same yaml's model section, arrives at the same objective."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from d2v.api import plugins
from d2v.spec.config import load_spec, resolve_model_section
from d2v.interop.fairseq import ConfigReader
from d2v.spec.model import build_model

ROOT = Path(__file__).resolve().parents[2]

#: base_text_only_task.yaml's ``model:`` section, verbatim
PUBLISHED_MODEL = {
    "_name": "data2vec_multi", "loss_beta": 0, "loss_scale": 1, "depth": 12, "embed_dim": 768, "clone_batch": 8,
    "ema_decay": 0.9999, "ema_end_decay": 0.99999, "ema_anneal_end_step": 100000, "ema_encoder_only": True,
    "average_top_k_layers": 12, "layer_norm_target_layer": False, "instance_norm_target_layer": True,
    "batch_norm_target_layer": False, "instance_norm_targets": False, "layer_norm_targets": False,
    "layerdrop": 0, "norm_eps": 1e-5, "supported_modality": "TEXT",
    "modalities": {"text": {"mask_prob": 0.48, "mask_length": 1, "mask_noise_std": 0.01, "prenet_depth": 0,
                            "decoder": {"input_dropout": 0.1, "decoder_dim": 768, "decoder_groups": 1,
                                        "decoder_kernel": 9, "decoder_layers": 5, "decoder_residual": False,
                                        "projection_layers": 2, "projection_ratio": 2.0}}},
}


@pytest.fixture(scope="module")
def spec():
    return load_spec(ROOT / "experiments" / "pretrain2_text_base.yaml")


def test_backbone_is_fairseqs_text_encoder(spec):
    model = resolve_model_section(dict(spec["model"]), plugins.registry())
    fe, enc = model["feature_extractor"], model["encoder"]
    assert fe["name"] == "text.embeddings" and enc["name"] == "text.transformer"
    assert fe["vocab_size"] == 50265 and fe["padding_idx"] == 1                # RoBERTa dict + <mask>, pad()
    assert fe["max_position_embeddings"] == 514                                # max_source_positions 512 + pad + 1
    assert fe["type_vocab_size"] == 0                                          # TextLocalEncoder: no token types
    assert fe["layer_norm_eps"] == 1e-5 and fe["dropout"] == 0.1               # LayerNorm default, text dropout
    assert enc["dim"] == 768 and enc["layers"] == 12 and enc["heads"] == 12    # embed_dim, depth, num_heads default
    assert enc["ffn_dim"] == 3072 and enc.get("activation", "gelu") == "gelu"  # mlp_ratio 4, nn.GELU (exact)
    assert enc["layer_norm_eps"] == 1e-5                                       # norm_eps
    assert enc["dropout"] == 0.1 and enc["attention_dropout"] == 0.1           # encoder_dropout/post_mlp_drop, attention_dropout
    assert enc.get("add_pooling_layer", False) is False


@pytest.fixture(scope="module")
def built(spec):
    """The recipe built as it is but 32 wide."""
    model = dict(spec["model"])
    model["encoder"] = {**model["encoder"], "dim": 32, "heads": 4, "ffn_dim": 64}
    torch.manual_seed(0)
    return build_model(model, plugins.registry(), "pretrain")


def test_objective_is_the_published_one(built):
    """The built objective (not the YAML): its masks, decoder, target, loss scale and teacher."""
    from d2v.ssl.distill2 import Data2Vec2

    model = built
    assert isinstance(model, Data2Vec2)
    # 8 masked copies per sequence (clone_batch: 8); mask_length 1 = MAE's random_masking with
    # mask_prob 0.48: it keeps int(T * 0.52) tokens, i.e. 18 of 37 masked (int(37 * 0.48) would be 17)
    masks = model.make_batch_transform()({"inputs": torch.randint(4, 100, (2, 37))},
                                         rng=np.random.default_rng(0))["precomputed_mask"]
    assert masks.shape == (2, 8, 37) and bool((masks.sum(-1) == 18).all())
    # decoder: decoder_dim 768, decoder_kernel 9, decoder_layers 5, decoder_groups 1, no residual,
    # projection_layers 2 with projection_ratio 2.0 (Linear 768 -> 1536, GELU, Linear -> dim), input_dropout 0.1
    convs = [block.conv for block in model.decoder.blocks]
    assert len(convs) == 5 and all((c.out_channels, c.kernel_size, c.groups) == (768, (9,), 1) for c in convs)
    assert model.decoder.residual is False
    assert [type(m).__name__ for m in model.decoder.proj] == ["Linear", "GELU", "Linear"]
    assert (model.decoder.proj[0].in_features, model.decoder.proj[0].out_features, model.decoder.proj[2].out_features) == (
        768, 1536, 32)
    assert model.decoder_input_dropout == 0.1 and model.mask_noise_std == 0.01  # mask_noise_std: 0.01
    assert model.encoder_zero_mask is True and model.cls_loss == 0.0            # D2vModalityConfig defaults
    # average_top_k_layers 12, instance_norm_target_layer, no layer_norm_targets, loss_beta 0, loss_scale 1
    target = model.target
    assert (target.top_k, target.layer_norm, target.final_norm, target.loss_type) == (12, "instance", None, "l2")
    assert target.scale_for(32) == 1.0 and model.target_feature == "ffn"         # end_of_block_targets false
    # ema_encoder_only: only the Transformer blocks are averaged, nothing copied
    assert type(model.teacher.model) is type(model.encoder) and model.teacher.copy_keys == ()
    # ema_decay 0.9999 -> ema_end_decay 0.99999, linearly over ema_anneal_end_step 100000
    for updates, decay in ((0, 0.9999), (50000, 0.999945), (100000, 0.99999), (10 ** 6, 0.99999)):
        model.num_updates.fill_(updates)
        assert model.current_decay() == pytest.approx(decay, abs=1e-12), updates
    model.num_updates.fill_(0)
    # min_target_var, min_pred_var; "if self.num_updates > 5000"
    assert (model.min_target_std, model.min_pred_std, model.collapse_check_after) == (0.1, 0.01, 5000)


def test_the_importer_reads_the_published_yaml_to_the_same_objective(spec):
    from d2v_text.fairseq_v2 import TextV2Arch, objective_spec

    arch = TextV2Arch(ConfigReader(PUBLISHED_MODEL, "cfg.model"))
    imported = objective_spec(arch, max_update=1000000)
    recipe = spec["model"]["objective"]
    for key, value in imported.items():
        assert recipe.get(key, value) == value, key


def test_optimisation_and_data_are_the_published_ones(spec):
    optim, schedule, trainer = spec["optim"], spec["schedule"], spec["trainer"]
    # composite adam, dynamic groups: no decay on 1-d tensors and biases (weight_decay_scale 0) = d2v's adamw
    assert optim["name"] == "adamw" and optim["lr"] == 2e-4 and optim["betas"] == [0.9, 0.98]
    assert optim["eps"] == 1e-6 and optim["weight_decay"] == 0.01
    assert schedule == {"name": "cosine", "warmup_steps": 4000, "final_lr_scale": 0.0}
    assert trainer["max_steps"] == 1000000 and trainer["clip_norm"] == 1.0
    assert trainer["mixed_precision"] == "fp16" and trainer["save_every"] == 50000 and trainer["keep_last"] == 1
    assert trainer["log_every"] == 200 and spec["seed"] == 1                   # log_interval, common.seed default
    assert spec["data"]["loader"]["batch_size"] == 4                           # dataset.batch_size (x 16 GPUs)
    assert spec["data"]["processor"]["max_length"] == 512                      # tokens_per_sample
    assert spec["data"]["processor"].get("masking") is None                    # skip_masking: the model masks


def test_the_recipe_builds_with_the_published_shapes(spec, single_thread):
    """A width-reduced build of the recipe (same keys) has no token-type table and fairseq's decoder."""
    model_spec = {**spec["model"], "encoder": {**spec["model"]["encoder"], "dim": 48, "layers": 2, "heads": 4,
                                               "ffn_dim": 96},
                  "feature_extractor": {**spec["model"]["feature_extractor"], "vocab_size": 40},
                  "objective": {**spec["model"]["objective"], "decoder_dim": 48,
                                "target": {**spec["model"]["objective"]["target"], "top_k": 2}}}
    model = build_model(model_spec, plugins.registry(), "pretrain")
    names = dict(model.named_parameters())
    assert not any("token_type" in n for n in names)
    assert names["decoder.proj.0.weight"].shape == (96, 48) and names["decoder.proj.2.weight"].shape == (48, 96)
    assert len(model.decoder.blocks) == 5 and model.decoder.blocks[0].conv.kernel_size == (9,)
    ids = torch.randint(4, 40, (2, 20))
    assert torch.isfinite(model.train()({"inputs": ids}).loss)
    from d2v.train.optim import adamw

    groups = adamw(model, **{k: v for k, v in spec["optim"].items() if k != "name"}).param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] for p in g["params"]}
    for name, param in model.named_parameters():
        if param.requires_grad:  # fairseq: len(p.shape) == 1 or name.endswith(".bias") -> no decay
            assert (id(param) in decayed) == (param.ndim > 1 and not name.endswith(".bias")), name
