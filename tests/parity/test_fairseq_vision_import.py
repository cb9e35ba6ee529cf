"""fairseq data2vec 2.0 image checkpoints: what the import makes of a checkpoint beyond its outputs
-- the spec it writes, old tensor names, config drift, missing tensors, a file without EMA, the
settings it refuses -- on the checkpoints fairseq itself wrote (tests/fairseq_oracle/fixtures/,
see test_fairseq_oracle_vision.py for their outputs), edited where a test needs another file."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

from d2v.api import plugins
from d2v.cli.main import main
from d2v.api.errors import SpecError
from d2v.interop.fairseq import import_fairseq, read_fairseq_checkpoint
from d2v.spec.model import build_task_model
from d2v.interop.weights import load_initial_weights
from fairseq_fixtures import save_fairseq_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")
ATOL = 1e-5
FIXTURES = Path(__file__).resolve().parents[1] / "fairseq_oracle" / "fixtures"
PRETRAINED = FIXTURES / "vision2" / "checkpoint.pt"
CLASSIFIER = FIXTURES / "vision2_cls" / "checkpoint.pt"
M = "modality_encoders.IMAGE."


def recorded(family: str = "vision2") -> dict:
    return torch.load(FIXTURES / family / "outputs.pt", weights_only=True)


def edited(source: Path, destination: Path, edit) -> Path:
    """``source`` re-saved in fairseq's layout after ``edit(cfg, model, ema)`` changed it in place."""
    ckpt = read_fairseq_checkpoint(source)
    cfg, model, ema = copy.deepcopy(ckpt.cfg), dict(ckpt.model), dict(ckpt.ema)
    edit(cfg, model, ema)
    return save_fairseq_checkpoint(destination, cfg, model, ema or None, num_updates=ckpt.num_updates)


def student_out(model, images):
    with torch.no_grad():
        features = model.feature_extractor(images)
        return model.encoder(features.features, features.padding_mask).last_hidden_state


def test_the_spec_carries_the_checkpoints_objective():
    _, result = import_fairseq(PRETRAINED)
    objective = result.spec["objective"]
    assert objective["clone_batch"] == 2 and objective["cls_loss"] == 0.01 and objective["ema_scope"] == "all"
    assert objective["masking"] == {"name": "inverse_block", "dims": 2, "inverse": True, "mask_prob": 0.8,
                                    "mask_length": 3, "mask_prob_adjust": 0.07}
    assert (objective["decoder_dim"], objective["decoder_kernel"], objective["decoder_layers"],
            objective["decoder_groups"], objective["decoder_input_dropout"]) == (16, 3, 2, 16, 0.0)
    assert objective["target"] == {"name": "data2vec", "top_k": 2, "layer_norm": "instance", "final_norm": "layer",
                                   "loss": "l2", "loss_scale": None}
    ema = (objective["ema_decay"], objective["ema_end_decay"], objective["ema_anneal_end_step"])
    assert ema == (0.9, 0.99, 100)
    encoder = result.spec["encoder"]
    assert (encoder["layers"], encoder["prenet_layers"], encoder["dim"], encoder["heads"], encoder["ffn_dim"]) == \
        (3, 1, 32, 4, 64)
    assert encoder["layer_norm_eps"] == 1e-6 and encoder["add_pooling_layer"] is False
    _, result = import_fairseq(CLASSIFIER)
    assert result.spec["encoder"]["drop_path_rate"] == 0.1  # the fine-tuning run's regularisation


def test_no_hugging_face_export_and_a_spec_initialises_from_the_pt_directly(tmp_path, capsys):
    # no Hugging Face class has this architecture: --to hf says so and points at --to d2v
    assert main(["convert", str(PRETRAINED), str(tmp_path / "hf"), "--to", "hf"]) != 0
    assert "--to d2v" in capsys.readouterr().err
    spec = {"preset": "data2vec2-vision-tiny", "feature_extractor": {"image_size": 32, "patch_size": 8},
            "encoder": {"dim": 32, "layers": 3, "prenet_layers": 1, "heads": 4, "ffn_dim": 64},
            "head": {"name": "image_classification", "num_labels": 3}, "init": {"checkpoint": str(PRETRAINED)}}
    model = build_task_model(spec, plugins.registry())
    load_initial_weights(model, PRETRAINED)
    want = recorded()
    got = model.eval()({"inputs": want["images"]}).last_hidden_state
    torch.testing.assert_close(got, want["encoder_out"], atol=ATOL, rtol=0)


def test_legacy_position_name_and_encoder_mask_are_handled_as_fairseq_does(tmp_path):
    def legacy(cfg, model, ema):
        for weights in (model, ema):
            weights[M + "positional_encoder.pos_embed"] = weights.pop(M + "fixed_positional_encoder.positions")
            weights[M + "encoder_mask"] = torch.zeros(1)

    model, result = import_fairseq(edited(PRETRAINED, tmp_path / "legacy.pt", legacy))
    want = recorded()
    torch.testing.assert_close(student_out(model, want["images"]), want["encoder_out"], atol=ATOL, rtol=0)
    assert not any("not imported" in n for n in result.notes), result.notes


def test_config_drift_is_noted_not_fatal(tmp_path):
    def drift(cfg, model, ema):
        cfg["model"]["a_future_option"] = 3
        del cfg["model"]["norm_eps"]  # an older fairseq: the default (1e-6) applies
        del cfg["model"]["modalities"]["image"]["decoder"]["input_dropout"]

    model, result = import_fairseq(edited(PRETRAINED, tmp_path / "drift.pt", drift))
    notes = "\n".join(result.notes)
    assert "cfg.model.norm_eps is missing; fairseq's default 1e-06" in notes
    assert "decoder.input_dropout is missing" in notes and "ignored: a_future_option" in notes
    want = recorded()
    torch.testing.assert_close(student_out(model, want["images"]), want["encoder_out"], atol=ATOL, rtol=0)


def test_a_missing_tensor_is_named(tmp_path):
    path = edited(PRETRAINED, tmp_path / "a.pt", lambda c, m, e: m.pop("blocks.1.mlp.fc2.weight"))
    with pytest.raises(SpecError, match=r"lacks 1 tensors.*blocks\.1\.mlp\.fc2\.weight"):
        import_fairseq(path)
    path = edited(PRETRAINED, tmp_path / "b.pt", lambda c, m, e: e.pop(M + "context_encoder.norm.bias"))
    with pytest.raises(SpecError, match=r"_ema\.modality_encoders\.IMAGE\.context_encoder\.norm\.bias"):
        import_fairseq(path)
    path = edited(CLASSIFIER, tmp_path / "c.pt", lambda c, m, e: m.pop("model." + M + "extra_tokens"))
    with pytest.raises(SpecError, match=r"model\.modality_encoders\.IMAGE\.extra_tokens"):
        import_fairseq(path)


def test_without_ema_the_teacher_starts_as_the_student(tmp_path):
    model, result = import_fairseq(edited(PRETRAINED, tmp_path / "no_ema.pt", lambda c, m, e: e.clear()))
    assert any("no _ema" in n for n in result.notes)
    want = recorded()
    teacher = model.teacher.model
    with torch.no_grad():
        features = teacher["feature_extractor"](want["images"])
        got = teacher["encoder"](features.features).last_hidden_state
    torch.testing.assert_close(got, want["encoder_out"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("key,value", [("use_alibi_encoder", True), ("transformer_decoder", True),
                                       ("fixed_positions", False)])
def test_unsupported_settings_fail_clearly(tmp_path, key, value):
    def unsupported(cfg, model, ema):
        cfg["model"]["modalities"]["image"][key] = value

    with pytest.raises(SpecError, match=key):
        import_fairseq(edited(PRETRAINED, tmp_path / "x.pt", unsupported))


def test_fresh_positions_are_fairseqs_sincos():
    """A model built from a spec (not imported) has the positions fairseq saved (MAE's formula)."""
    from d2v_vision.vit_patches import ViTPatchEmbedding

    fairseq = read_fairseq_checkpoint(PRETRAINED).model[M + "fixed_positional_encoder.positions"]
    fresh = ViTPatchEmbedding(dim=32, image_size=32, patch_size=8)
    torch.testing.assert_close(fresh.positions, fairseq, atol=1e-6, rtol=0)


def _set(section: tuple[str, ...], key: str, value):
    def edit(cfg, model, ema):
        node = cfg["model"]
        for name in section:
            node = node[name]
        node[key] = value
    return edit


IMAGE = ("modalities", "image")


@pytest.mark.parametrize("edit,message", [
    (_set((), "mlp_ratio", 4.0), r"by cfg\.model\.embed_dim and mlp_ratio, .*blocks\.0\.mlp\.fc1\.weight should be \(128, 32\), "
                                 r"but the checkpoint's is \(64, 32\)"),
    (_set((), "depth", 1), r"cfg\.model\.depth is 1 but the checkpoint has blocks\.1\.\*"),
    (_set((), "num_heads", 5), r"cfg\.model\.num_heads 5 does not divide cfg\.model\.embed_dim 32"),
    (_set(IMAGE, "patch_size", 16), r"patch_size, modality_encoders\.IMAGE\.local_encoder\.proj\.weight should be "
                                    r"\(32, 3, 16, 16\), but the checkpoint's is \(32, 3, 8, 8\)"),
    (_set(IMAGE, "input_size", 64), r"input_size and patch_size .*positions should be \(1, 64, 32\)"),
    (_set(IMAGE, "num_extra_tokens", 0), r"num_extra_tokens and cfg\.model\.embed_dim, modality_encoders\.IMAGE\.extra_tokens should be "
                                         r"\(1, 0, 32\), but the checkpoint's is \(1, 1, 32\)"),
    (_set(IMAGE, "prenet_depth", 0), r"prenet_depth is 0 but the checkpoint has "
                                     r"modality_encoders\.IMAGE\.context_encoder\.blocks\.0\.\*"),
    (_set(IMAGE + ("decoder",), "decoder_dim", 32), r"decoder_dim, decoder_groups and decoder_kernel, .*should be "
                                                    r"\(32, 2, 3, 3\), but the checkpoint's is \(16, 2, 3, 3\)"),
    (_set(IMAGE + ("decoder",), "decoder_layers", 3), r"decoder_layers is 3 but the checkpoint has 2 decoder blocks"),
])
def test_a_config_that_does_not_fit_the_weights_names_the_setting(tmp_path, edit, message):
    """Never a shape error from deep inside a d2v module: the config key that disagrees, by name."""
    with pytest.raises(SpecError, match=message):
        import_fairseq(edited(PRETRAINED, tmp_path / "bad.pt", edit))


@pytest.mark.parametrize("family,name", [("vision2", M + "extra_tokens"), ("vision2_ema_blocks", "1.mlp.fc1.weight")])
def test_an_ema_tensor_that_does_not_fit_is_named(tmp_path, family, name):
    def edit(cfg, model, ema):
        ema[name] = torch.zeros(*ema[name].shape[:-1], 7)

    shown = name if family == "vision2" else "blocks." + name
    with pytest.raises(SpecError, match=rf"_ema\.{re.escape(shown)} should be .* but the checkpoint's is"):
        import_fairseq(edited(FIXTURES / family / "checkpoint.pt", tmp_path / "bad.pt", edit))


def test_a_classifier_whose_backbone_config_does_not_fit_is_named(tmp_path):
    def edit(cfg, model, ema):
        cfg["model"]["pretrained_model_args"]["model"]["mlp_ratio"] = 3.0

    with pytest.raises(SpecError, match=r"pretrained_model_args\.model\.embed_dim and mlp_ratio, model\..*blocks\.0\.mlp\.fc1\.weight"):
        import_fairseq(edited(CLASSIFIER, tmp_path / "bad.pt", edit))


@pytest.mark.parametrize("family,scope,copied", [
    ("vision2", "all", []),
    ("vision2_prenorm", "all", ["feature_extractor.projection", "feature_extractor.patch_projection"]),
    ("vision2_ema_blocks", "encoder", ["layer_norm", "layers.0"]),
])
def test_the_teacher_runs_the_students_parts_where_fairseqs_does(family, scope, copied):
    """fairseq's teacher runs the student's own patch embedding (no ``ema_local_encoder``), or its
    LayerNorm and prenet (``ema_encoder_only``): d2v copies those at every update, averages the rest."""
    from d2v.ssl.ema import matches_any

    model, result = import_fairseq(FIXTURES / family / "checkpoint.pt")
    assert (result.spec["objective"]["ema_scope"], result.spec["objective"]["copy_keys"]) == (scope, copied)
    parts = {"feature_extractor": model.feature_extractor, "encoder": model.encoder}
    student = {f"{part}.{name}": p for part, module in parts.items() for name, p in module.named_parameters()}
    if scope == "encoder":
        student = {name[len("encoder."):]: p for name, p in student.items() if name.startswith("encoder.")}
    with torch.no_grad():
        for p in student.values():
            p.add_(1.0)  # an update that moved every weight
    model.after_optimizer_step(1)
    for name, t in model.teacher.model.named_parameters():
        assert torch.equal(t, student[name]) == matches_any(name, copied), name
