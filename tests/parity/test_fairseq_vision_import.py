"""fairseq data2vec 2.0 image checkpoints import exactly: tiny checkpoints in fairseq's on-disk
layout (tests/fairseq_fixtures.py) with fairseq's names and shapes; the forward pass written out
from fairseq's source (tests/fairseq_reference/image_multi.py) on those weights equals the
imported d2v model's within 1e-5 (fp32) -- student, EMA teacher, decoder, fine-tuned logits --
through ``import_fairseq`` and through ``d2v convert``."""

from __future__ import annotations

import copy

import pytest
import torch

from d2v import plugins
from d2v.cli import main
from d2v.convert import load_d2v_checkpoint
from d2v.errors import SpecError
from d2v.fairseq import import_fairseq
from d2v.model import build_task_model
from fairseq_fixtures import save_fairseq_checkpoint
from fairseq_reference.image_multi import (
    M,
    classifier_logits,
    decoder_2d,
    extract_features,
    fairseq_classifier_cfg,
    fairseq_classifier_state,
    fairseq_multi_image_cfg,
    fairseq_multi_image_state,
    make_targets,
)

pytestmark = pytest.mark.usefixtures("single_thread")
ATOL = 1e-5


def images(n: int = 3, size: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(7))


def student_out(model, x):
    fe = model.feature_extractor(x)
    return model.encoder(fe.features, fe.padding_mask, output_layer_targets=True)


def pretrain_checkpoint(tmp_path, cfg=None, *, ema=True, dictconfig=True, edit=None):
    cfg = cfg or fairseq_multi_image_cfg()
    state = fairseq_multi_image_state(cfg, seed=0)
    teacher = fairseq_multi_image_state(cfg, seed=1, decoder=False) if ema else None
    if edit is not None:
        edit(state, teacher)
    path = save_fairseq_checkpoint(tmp_path / "d2v2_image.pt", cfg, state, teacher, dictconfig=dictconfig)
    return path, cfg, state, teacher


VARIANTS = {
    "base_like": {},
    "no_prenet_pre_ln": {"layer_norm_first": True, "image": {"prenet_depth": 0}},
    "patch_width_differs": {"image": {"embed_dim": 24, "prenet_depth": 2}, "depth": 1},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_pretraining_checkpoint_student_teacher_and_decoder_match_fairseq(tmp_path, variant):
    cfg = fairseq_multi_image_cfg(**{k: (dict(v) if isinstance(v, dict) else v) for k, v in VARIANTS[variant].items()})
    path, cfg, state, teacher = pretrain_checkpoint(tmp_path, cfg, dictconfig=variant != "base_like")
    model, result = import_fairseq(path)
    assert result.task == "pretrain" and result.spec["objective"]["name"] == "data2vec2"
    x = images()
    ref = extract_features(state, cfg, x)
    out = student_out(model, x)
    torch.testing.assert_close(out.last_hidden_state[:, 1:], ref["x"], atol=ATOL, rtol=0)
    depth = cfg["model"]["depth"]
    for got, want in zip(out.layer_targets[-depth:], ref["layer_results"]):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)

    # teacher = fairseq's _ema (patch embedding included: ema_local_encoder), and its targets
    teacher_model = model.teacher.model
    fe = teacher_model["feature_extractor"](x)
    t_out = teacher_model["encoder"](fe.features, output_layer_targets=True)
    t_ref = extract_features(teacher, cfg, x)
    torch.testing.assert_close(t_out.last_hidden_state[:, 1:], t_ref["x"], atol=ATOL, rtol=0)
    want_targets = make_targets([t[:, 1:] for t in t_ref["layer_results"]], cfg)
    got_targets = model.target.build(t_out, skip_tokens=1)
    torch.testing.assert_close(got_targets, want_targets, atol=ATOL, rtol=0)
    assert not torch.allclose(t_out.last_hidden_state, out.last_hidden_state)

    # decoder
    dec_in = torch.randn(2, 16, cfg["model"]["embed_dim"], generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model.decoder(dec_in), decoder_2d(state, cfg, dec_in), atol=ATOL, rtol=0)

    # every fairseq tensor was used; the pretraining objective runs on the import
    assert not any("not imported" in n for n in result.notes), result.notes
    model.train()
    loss = model({"inputs": x}).loss
    assert torch.isfinite(loss)


def test_the_spec_carries_the_published_objective(tmp_path):
    path, *_ = pretrain_checkpoint(tmp_path)
    _, result = import_fairseq(path)
    objective = result.spec["objective"]
    assert objective["clone_batch"] == 4 and objective["cls_loss"] == 0.01 and objective["ema_scope"] == "all"
    assert objective["masking"] == {"name": "inverse_block", "dims": 2, "inverse": True, "mask_prob": 0.8,
                                    "mask_length": 3, "mask_prob_adjust": 0.07}
    assert (objective["decoder_dim"], objective["decoder_kernel"], objective["decoder_layers"],
            objective["decoder_groups"], objective["decoder_input_dropout"]) == (32, 3, 2, 16, 0.0)
    assert objective["target"] == {"name": "data2vec", "top_k": 2, "layer_norm": "instance", "final_norm": "layer",
                                   "loss": "l2", "loss_scale": None}
    ema = (objective["ema_decay"], objective["ema_end_decay"], objective["ema_anneal_end_step"])
    assert ema == (0.9998, 0.99999, 100000)
    encoder = result.spec["encoder"]
    assert (encoder["layers"], encoder["prenet_layers"], encoder["dim"], encoder["heads"]) == (3, 1, 32, 4)
    assert encoder["layer_norm_eps"] == 1e-6 and encoder["add_pooling_layer"] is False


def test_convert_cli_writes_a_d2v_checkpoint_that_reloads_equal(tmp_path, capsys):
    path, cfg, state, _ = pretrain_checkpoint(tmp_path)
    assert main(["convert", str(path), str(tmp_path / "out")]) == 0
    assert "task pretrain" in capsys.readouterr().out
    # no Hugging Face class has this architecture: --to hf says so and points at --to d2v
    assert main(["convert", str(path), str(tmp_path / "hf"), "--to", "hf"]) != 0
    assert "--to d2v" in capsys.readouterr().err
    backbone = load_d2v_checkpoint(tmp_path / "out")
    x = images()
    out = backbone({"inputs": x})
    torch.testing.assert_close(out.last_hidden_state[:, 1:], extract_features(state, cfg, x)["x"], atol=ATOL, rtol=0)
    # and a fine-tuning spec initialises its backbone from the .pt directly
    spec = {"preset": "data2vec2-vision-tiny", "feature_extractor": {"image_size": 16},
            "encoder": {"dim": 32, "layers": 3, "prenet_layers": 1, "heads": 4, "ffn_dim": 128},
            "head": {"name": "image_classification", "num_labels": 3}, "init": {"checkpoint": str(path)}}
    from d2v.model import load_initial_weights  # noqa: PLC0415 (only this test needs it)

    model = build_task_model(spec, plugins.registry())
    load_initial_weights(model, path)
    torch.testing.assert_close(model.eval()({"inputs": x}).last_hidden_state[:, 1:],
                               extract_features(state, cfg, x)["x"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode,fc_norm", [("MEAN_POOLING", True), ("CLS_TOKEN", True), ("MEAN_POOLING", False)])
def test_finetuned_classifier_logits_match_fairseq(tmp_path, mode, fc_norm):
    pretrain = fairseq_multi_image_cfg()
    cfg = fairseq_classifier_cfg(pretrain, prediction_mode=mode, use_fc_norm=fc_norm)
    state = fairseq_classifier_state(pretrain, num_classes=5)
    if not fc_norm:
        del state["fc_norm.weight"], state["fc_norm.bias"]
    path = save_fairseq_checkpoint(tmp_path / "ft.pt", cfg, state)
    model, result = import_fairseq(path)
    assert result.task == "finetune" and result.spec["head"] == {"name": "image_classification", "num_labels": 5}
    x = images(4)
    want = classifier_logits(state, cfg, x)
    torch.testing.assert_close(model({"inputs": x}).logits, want, atol=ATOL, rtol=0)
    assert not any("not imported" in n for n in result.notes), result.notes
    assert result.spec["encoder"]["drop_path_rate"] == 0.1  # the fine-tuning run's regularisation

    assert main(["convert", str(path), str(tmp_path / "out")]) == 0
    from d2v.convert import load_d2v_checkpoint as reload  # the classifier comes back with its head

    again = reload(tmp_path / "out")
    torch.testing.assert_close(again({"inputs": x}).logits, want, atol=ATOL, rtol=0)


def test_legacy_position_name_and_encoder_mask_are_handled_as_fairseq_does(tmp_path):
    def legacy(state, teacher):
        for weights in (state, teacher):
            weights[M + "positional_encoder.pos_embed"] = weights.pop(M + "fixed_positional_encoder.positions")
            weights[M + "encoder_mask"] = torch.zeros(1)

    path, cfg, state, _ = pretrain_checkpoint(tmp_path, edit=legacy)
    model, result = import_fairseq(path)
    state = dict(state)
    state[M + "fixed_positional_encoder.positions"] = state.pop(M + "positional_encoder.pos_embed")
    torch.testing.assert_close(student_out(model, images()).last_hidden_state[:, 1:],
                               extract_features(state, cfg, images())["x"], atol=ATOL, rtol=0)
    assert not any("not imported" in n for n in result.notes), result.notes


def test_config_drift_is_noted_not_fatal(tmp_path):
    cfg = fairseq_multi_image_cfg()
    state = fairseq_multi_image_state(cfg, seed=0)
    drifted = copy.deepcopy(cfg)
    drifted["model"]["a_future_option"] = 3
    del drifted["model"]["mlp_ratio"]  # an older fairseq: the default (4) applies
    del drifted["model"]["modalities"]["image"]["decoder"]["input_dropout"]
    teacher = fairseq_multi_image_state(cfg, 1, decoder=False)
    path = save_fairseq_checkpoint(tmp_path / "drift.pt", drifted, state, teacher)
    model, result = import_fairseq(path)
    notes = "\n".join(result.notes)
    assert "cfg.model.mlp_ratio is missing; fairseq's default 4.0" in notes
    assert "decoder.input_dropout is missing" in notes and "ignored: a_future_option" in notes
    torch.testing.assert_close(student_out(model, images()).last_hidden_state[:, 1:],
                               extract_features(state, cfg, images())["x"], atol=ATOL, rtol=0)


def test_a_missing_tensor_is_named(tmp_path):
    path, *_ = pretrain_checkpoint(tmp_path, edit=lambda s, t: s.pop("blocks.1.mlp.fc2.weight"))
    with pytest.raises(SpecError, match=r"lacks 1 tensors.*blocks\.1\.mlp\.fc2\.weight"):
        import_fairseq(path)
    path, *_ = pretrain_checkpoint(tmp_path, edit=lambda s, t: t.pop(M + "context_encoder.norm.bias"))
    with pytest.raises(SpecError, match=r"_ema\.modality_encoders\.IMAGE\.context_encoder\.norm\.bias"):
        import_fairseq(path)
    pretrain = fairseq_multi_image_cfg()
    state = fairseq_classifier_state(pretrain, num_classes=5)
    del state["model." + M + "extra_tokens"]
    bad = save_fairseq_checkpoint(tmp_path / "ft.pt", fairseq_classifier_cfg(pretrain), state)
    with pytest.raises(SpecError, match=r"model\.modality_encoders\.IMAGE\.extra_tokens"):
        import_fairseq(bad)


def test_without_ema_the_teacher_starts_as_the_student(tmp_path):
    path, cfg, state, _ = pretrain_checkpoint(tmp_path, ema=False)
    model, result = import_fairseq(path)
    assert any("no _ema" in n for n in result.notes)
    fe = model.teacher.model["feature_extractor"](images())
    torch.testing.assert_close(model.teacher.model["encoder"](fe.features).last_hidden_state[:, 1:],
                               extract_features(state, cfg, images())["x"], atol=ATOL, rtol=0)


def test_unsupported_settings_fail_clearly(tmp_path):
    path, *_ = pretrain_checkpoint(tmp_path, fairseq_multi_image_cfg(image={"use_alibi_encoder": True}))
    with pytest.raises(SpecError, match="use_alibi_encoder"):
        import_fairseq(path)


def test_ema_encoder_only_teacher_averages_the_shared_blocks(tmp_path):
    """With ``ema_encoder_only`` fairseq's _ema holds only the shared blocks ("<j>.attn.qkv.weight")
    and the teacher runs the student's patch embedding, LayerNorm and prenet."""
    cfg = fairseq_multi_image_cfg(ema_encoder_only=True)
    state = fairseq_multi_image_state(cfg, seed=0)
    ema_full = fairseq_multi_image_state(cfg, seed=1, decoder=False)
    ema = {k[len("blocks."):]: v for k, v in ema_full.items() if k.startswith("blocks.")}
    path = save_fairseq_checkpoint(tmp_path / "eo.pt", cfg, state, ema)
    model, result = import_fairseq(path)
    assert result.spec["objective"]["ema_scope"] == "encoder"
    x = images()
    fe = model.feature_extractor(x)
    got = model.teacher(fe.features).last_hidden_state[:, 1:]
    mixed = {**state, **{f"blocks.{k}": v for k, v in ema.items()}}
    torch.testing.assert_close(got, extract_features(mixed, cfg, x)["x"], atol=ATOL, rtol=0)
    assert not any("not imported" in n for n in result.notes), result.notes


@pytest.mark.parametrize("dim,side", [(32, 4), (768, 14)])
def test_fresh_positions_are_fairseqs_sincos(dim, side):
    """A model built from a spec (not imported) has fairseq's positions: MAE's numpy formula."""
    from d2v_vision.vit_patches import ViTPatchEmbedding
    from fairseq_reference.image_multi import sincos_positions

    fe = ViTPatchEmbedding(dim=dim, image_size=side * 4, patch_size=4)
    want = torch.from_numpy(sincos_positions(dim, side)).float()
    torch.testing.assert_close(fe.positions[0], want, atol=1e-6, rtol=0)
