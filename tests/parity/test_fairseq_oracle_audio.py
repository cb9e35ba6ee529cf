"""fairseq's own speech checkpoints -> d2v, against the outputs fairseq itself computed.

The fixtures in ``tests/fairseq_oracle/fixtures/audio*/`` were written by fairseq-fixed 0.12.3.1
(its ``data2vec_audio``, ``data2vec_multi`` and ``wav2vec_ctc`` models, saved by its ``Trainer``)
with ``tests/fairseq_oracle/audio.py``; ``outputs.pt`` holds what fairseq computed. Regenerate
them in the oracle venv (``tests/fairseq_oracle/README.md``)::

    python tests/fairseq_oracle/make_fixtures.py audio1 audio1_preln audio1_ctc audio2 \
        audio2_layer_scale audio2_preln audio2_ctc audio_alibi

(``audio_alibi``, fairseq's ALiBi slopes and biases, is read by ``tests/unit/test_alibi.py``.)

Each checkpoint is imported as a user would (``d2v convert``, then the converted directory is
loaded) and run on the recorded inputs: encoder outputs (or CTC logits) on a padded batch, and
for pretraining checkpoints the first continued update -- fairseq's batch and mask fed to d2v's
objective built from the import (student, EMA teacher, regression head or decoder): targets,
predictions and loss must be fairseq's, and so must the EMA step after it. 1.0 files exported
with ``--to hf`` must give fairseq's outputs in transformers too. Tolerance 1e-5 (fp32; the loss
relative). Pre-LN files and files whose config disagrees with their tensors are refused by name.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from fairseq_fixtures import save_fairseq_checkpoint
from max_diff import MaxDiff

import d2v.cli.main
from d2v.api import plugins
from d2v.interop.convert import load_d2v_checkpoint
from d2v.api.errors import SpecError
from d2v.interop.fairseq import import_fairseq, read_fairseq_checkpoint
from d2v.spec.model import TaskModel, build_model
from d2v.interop.weights import load_initial_weights

pytestmark = pytest.mark.usefixtures("single_thread")

FIXTURES = Path(__file__).resolve().parents[1] / "fairseq_oracle" / "fixtures"
ATOL = 1e-5
MAX_DIFF = MaxDiff(ATOL)
PRETRAINED = ("audio1", "audio2", "audio2_layer_scale")


assert_close = MAX_DIFF.check


def teardown_module(module):
    MAX_DIFF.report("fairseq oracle, audio")


def fixture(family: str) -> tuple[Path, dict]:
    folder = FIXTURES / family
    return folder / "checkpoint.pt", torch.load(folder / "outputs.pt", weights_only=True)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """``d2v convert`` of each fixture (once per family), loaded back: a fine-tuned model as
    ``load_d2v_checkpoint`` gives it; a pretraining one whole (student, teacher, head or
    decoder), as a run with ``model.init.checkpoint: DIR`` and the directory's spec builds it."""
    folders: dict[str, Path] = {}

    def load(family: str) -> torch.nn.Module:
        if family not in folders:
            out = tmp_path_factory.mktemp(family) / "d2v"
            assert d2v.cli.main.main(["convert", str(FIXTURES / family / "checkpoint.pt"), str(out)]) == 0
            folders[family] = out
        out = folders[family]
        spec = yaml.safe_load((out / "spec.yaml").read_text())
        if spec["task"] != "pretrain":
            return load_d2v_checkpoint(out)
        model = build_model(spec["model"], plugins.registry(), "pretrain")
        load_initial_weights(model, out, strict=True)
        return model.eval()

    return load


# --------------------------------------------------------------------------- encoder outputs


@pytest.mark.parametrize("family", PRETRAINED)
def test_encoder_output_on_a_padded_batch(family, converted):
    path, outputs = fixture(family)
    model = converted(family)
    backbone = TaskModel(model.feature_extractor, model.encoder).eval()
    with torch.no_grad():
        out = backbone({"inputs": outputs["source"], "padding_mask": outputs["padding_mask"]})
    assert_close(f"{family} encoder output", out.last_hidden_state, outputs["hidden"])
    if outputs["hidden_padding_mask"].numel():
        assert torch.equal(out.padding_mask, outputs["hidden_padding_mask"])

    # the Python API gives the same model
    imported, _ = import_fairseq(path)
    with torch.no_grad():
        again = TaskModel(imported.feature_extractor, imported.encoder).eval()(
            {"inputs": outputs["source"], "padding_mask": outputs["padding_mask"]})
    assert_close(f"{family} encoder output (import_fairseq)", again.last_hidden_state, outputs["hidden"])


@pytest.mark.parametrize("family", ("audio1_ctc", "audio2_ctc"))
def test_ctc_logits_on_a_padded_batch(family, converted):
    path, outputs = fixture(family)
    model = converted(family).eval()
    with torch.no_grad():
        logits = model({"inputs": outputs["source"], "padding_mask": outputs["padding_mask"]}).logits
    assert_close(f"{family} logits", logits, outputs["logits"])
    assert model.head.blank_id == 0 and len(model.head.vocab.tokens) == 32


def test_the_comparison_is_not_vacuous(converted):
    """What d2v must match is visible at this tolerance: zeroing padded frames before the
    positional conv (as Hugging Face and data2vec 1.0 do) or dropping ALiBi moves fairseq 2.0's
    valid frames by far more than 1e-5."""
    _, outputs = fixture("audio2")
    model = converted("audio2")
    valid = ~outputs["hidden_padding_mask"]
    for change in ({"zero_padded_frames": True}, {"alibi": False}):
        encoder = type(model.encoder)(**{**model.encoder.hparams, **change})
        encoder.load_state_dict(model.encoder.state_dict(), strict=False)
        with torch.no_grad():
            out = TaskModel(model.feature_extractor, encoder).eval()(
                {"inputs": outputs["source"], "padding_mask": outputs["padding_mask"]})
        assert (out.last_hidden_state - outputs["hidden"])[valid].abs().max() > 1e-3, change


@pytest.mark.parametrize("family", ("audio1", "audio1_ctc"))
def test_hugging_face_export_computes_what_fairseq_computed(family, tmp_path):
    """``d2v convert --to hf`` of a fairseq 1.0 file: transformers' Data2VecAudio gives fairseq's
    encoder output (or CTC logits) on the padded batch."""
    transformers = pytest.importorskip("transformers")
    path, outputs = fixture(family)
    assert d2v.cli.main.main(["convert", str(path), str(tmp_path / "hf"), "--to", "hf"]) == 0
    cls = transformers.Data2VecAudioForCTC if family.endswith("_ctc") else transformers.Data2VecAudioModel
    hf = cls.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        out = hf(outputs["source"], attention_mask=(~outputs["padding_mask"]).long())
    if family.endswith("_ctc"):
        assert_close(f"{family} --to hf logits", out.logits, outputs["logits"])
    else:
        assert_close(f"{family} --to hf encoder output", out.last_hidden_state, outputs["hidden"])


# --------------------------------------------------------------------------- the first continued update


def capture_regression(model) -> list:
    """Record (predictions, targets) as the objective hands them to its loss."""
    seen = []
    regression_loss = model._regression_loss

    def recording(prediction, targets):
        seen.append((prediction.detach(), targets.detach()))
        return regression_loss(prediction, targets)

    model._regression_loss = recording
    return seen


@pytest.mark.parametrize("family", PRETRAINED)
def test_first_continued_update_equals_fairseqs(family, converted):
    """fairseq's batch and mask through d2v's imported objective (train mode, dropout 0 as the
    fixture's config): the loss fairseq's trainer would divide by ``sample_size`` is d2v's
    ``loss * sample_size``, from the same targets and predictions; the EMA step that follows
    uses fairseq's decay and gives fairseq's teacher."""
    _, outputs = fixture(family)
    model = converted(family)
    source, mask = outputs["update_source"], outputs["update_mask"]
    batch = {"inputs": source, "padding_mask": None}
    if "clone_batch" in outputs:  # data2vec 2.0: (B * M, T) rows -> (B, M, T)
        assert model.clone_batch == outputs["clone_batch"]
        batch["precomputed_mask"] = mask.view(source.shape[0], model.clone_batch, -1)
    else:
        batch["mask"] = mask
    seen = capture_regression(model)
    model.train()
    try:
        with torch.no_grad():
            out = model(batch)
    finally:
        model.eval()
        del model._regression_loss
    (predictions, targets), = seen
    if family == "audio2_layer_scale":  # ema_encoder_only: the student's prenet, pos conv and scales
        assert model.teacher.copy_keys == ("pos_conv", "layer_norm", "alibi_scale", "layers.0")
    assert_close(f"{family} update targets", targets, outputs["targets"])
    assert_close(f"{family} update predictions", predictions, outputs["predictions"])
    assert out.sample_size == outputs["sample_size"]
    loss_sum = out.loss.item() * out.sample_size
    relative = abs(loss_sum - outputs["loss"]) / abs(outputs["loss"])
    MAX_DIFF.record(f"{family} update loss (relative)", relative)
    assert relative <= 1e-5, f"{family}: loss {loss_sum} vs fairseq's {outputs['loss']}"

    # then the EMA step after that update, at fairseq's position in the decay schedule
    model.train()
    model.after_optimizer_step(1)
    assert int(model.num_updates) == outputs["ema_step"]
    assert model.current_decay() == pytest.approx(outputs["ema_decay"], rel=1e-6)
    teacher = model.teacher.model.state_dict()
    for theirs, ours in TEACHER_NAMES[family].items():
        assert_close(f"{family} teacher after the EMA step", teacher[ours].flatten(),
                     outputs["teacher_after"][theirs].flatten())


#: the teacher tensors fairseq recorded after its EMA step (fairseq EMA name -> d2v teacher name)
TEACHER_NAMES = {
    "audio1": {"pos_conv.0.0.weight": "pos_conv.layers.0.conv.weight",  # copied, not averaged
               "layers.1.fc1.weight": "layers.1.ffn.fc1.weight",
               "layers.0.self_attn_layer_norm.weight": "layers.0.attention_norm.weight"},
    "audio2": {"blocks.1.mlp.fc1.weight": "layers.1.ffn.fc1.weight",
               "modality_encoders.AUDIO.alibi_scale": "alibi_scale",
               "modality_encoders.AUDIO.relative_positional_encoder.1.0.weight": "pos_conv.layers.0.conv.weight",
               "modality_encoders.AUDIO.context_encoder.norm.weight": "layer_norm.weight"},
    "audio2_layer_scale": {"1.mlp.fc1.weight": "layers.2.ffn.fc1.weight",  # after the prenet block
                           "0.norm1.weight": "layers.1.attention_norm.weight"},
}


# --------------------------------------------------------------------------- refusals, named


@pytest.mark.parametrize("family", ("audio1_preln", "audio2_preln"))
def test_pre_ln_checkpoints_are_refused_by_name(family, tmp_path, capsys):
    """fairseq's ``layer_norm_first: true`` (pre-LN blocks): d2v's audio encoder is post-LN, so
    the checkpoint is refused, saying which setting and why -- never imported as another model."""
    path, _ = fixture(family)
    with pytest.raises(SpecError, match=r"cfg\.model\.layer_norm_first=true \(pre-LN.* is post-LN\)"):
        import_fairseq(path)
    assert d2v.cli.main.main(["convert", str(path), str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert "layer_norm_first=true" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def rewrite(family: str, path: Path, edit_cfg=None, drop: tuple[str, ...] = ()) -> Path:
    """A fixture with its config edited or tensors removed (a damaged or mislabelled file)."""
    ckpt = read_fairseq_checkpoint(FIXTURES / family / "checkpoint.pt")
    cfg = ckpt.cfg
    if edit_cfg:
        edit_cfg(cfg)
    weights = {k: v for k, v in ckpt.model.items() if k not in drop}
    return save_fairseq_checkpoint(path, cfg, weights, ckpt.ema or None)


def test_alibi_flag_that_disagrees_with_the_stored_scale_is_named(tmp_path, capsys):
    """cfg says one ALiBi scale for all heads, the file holds one per head: the error names the
    tensor, both shapes and the settings that decide them."""
    def shared_scale(cfg):
        cfg["model"]["modalities"]["audio"]["learned_alibi_scale_per_head"] = False

    path = rewrite("audio2", tmp_path / "mislabelled.pt", shared_scale)
    with pytest.raises(SpecError) as err:
        import_fairseq(path)
    message = str(err.value)
    assert "modality_encoders.AUDIO.alibi_scale" in message and "(1, 1, 4, 1, 1)" in message
    assert "learned_alibi_scale_per_head" in message
    assert d2v.cli.main.main(["convert", str(path), str(tmp_path / "out")]) != 0
    assert "alibi_scale" in capsys.readouterr().err


@pytest.mark.parametrize("family", ("audio1_ctc", "audio2_ctc"))
def test_ctc_without_w2v_args_reads_w2v_path_or_says_what_is_missing(family, tmp_path):
    """No ``cfg.model.w2v_args``: like fairseq, d2v reads the pretrained model's config from
    ``cfg.model.w2v_path``; when that file is not there either, the error says what is missing."""
    # the pretrained file fairseq would read: only its cfg matters (the CTC file has every weight)
    stored = read_fairseq_checkpoint(FIXTURES / family / "checkpoint.pt").cfg["model"]["w2v_args"]
    pretrained = save_fairseq_checkpoint(tmp_path / "pretrained.pt", stored, {})

    def no_w2v_args(w2v_path):
        def edit(cfg):
            del cfg["model"]["w2v_args"]
            cfg["model"]["w2v_path"] = w2v_path
        return edit

    lost = rewrite(family, tmp_path / "lost.pt", no_w2v_args("/checkpoints/gone.pt"))
    with pytest.raises(SpecError, match=r"w2v_args .* is missing.*w2v_path \('/checkpoints/gone.pt'\)"):
        import_fairseq(lost)

    found = rewrite(family, tmp_path / "found.pt", no_w2v_args(str(pretrained)))
    model, _ = import_fairseq(found)
    _, outputs = fixture(family)
    with torch.no_grad():
        logits = model({"inputs": outputs["source"], "padding_mask": outputs["padding_mask"]}).logits
    assert_close(f"{family} logits (config from w2v_path)", logits, outputs["logits"])


# --------------------------------------------------------------------------- what the import makes of the file


def test_2_0_import_reports_nothing_left_behind_and_keeps_fairseqs_objective(capsys, tmp_path):
    path, _ = fixture("audio2")
    ckpt = read_fairseq_checkpoint(path)
    model, result = import_fairseq(path)
    audio = ckpt.cfg["model"]["modalities"]["audio"]
    encoder, objective = result.spec["encoder"], result.spec["objective"]
    assert encoder["alibi"] is True and encoder["zero_padded_frames"] is False
    assert encoder["alibi_scale_per_head"] is True and encoder["alibi_scale_per_layer"] is False
    assert objective["name"] == "data2vec2" and objective["ema_scope"] == "encoder" and objective["copy_keys"] == []
    assert objective["clone_batch"] == ckpt.cfg["model"]["clone_batch"]
    assert (objective["decoder_dim"], objective["decoder_kernel"], objective["decoder_layers"]) == (
        audio["decoder"]["decoder_dim"], audio["decoder"]["decoder_kernel"], audio["decoder"]["decoder_layers"])
    assert objective["masking"]["mask_prob"] == audio["mask_prob"]
    assert objective["ema_anneal_end_step"] == ckpt.cfg["model"]["ema_anneal_end_step"]
    assert int(model.num_updates) == ckpt.num_updates == 2  # the EMA decay schedule continues
    # every tensor of the file used (teacher and decoder included), every config key known
    assert not any("not imported" in n or "missing" in n or "unknown" in n for n in result.notes), result.notes
    # Hugging Face's Data2VecAudio has no ALiBi: the export refuses, saying so
    assert d2v.cli.main.main(["convert", str(path), str(tmp_path / "hf"), "--to", "hf"]) != 0
    assert "ALiBi" in capsys.readouterr().err


def test_2_0_ctc_import_takes_the_fine_tuning_settings():
    path, _ = fixture("audio2_ctc")
    model, result = import_fairseq(path)
    outer = read_fairseq_checkpoint(path).cfg["model"]
    spec, encoder = result.spec, result.spec["encoder"]
    assert spec["head"]["vocab"] == "librispeech" and spec["freeze"] == ["feature_extractor.conv_layers"]
    assert encoder["alibi_learned_scale"] is False and not model.encoder.alibi_scale.requires_grad  # update_alibi
    assert (encoder["dropout"], encoder["layerdrop"], encoder["mask_time_prob"], encoder["mask_feature_prob"]) == (
        outer["dropout"], outer["layerdrop"], outer["mask_prob"], outer["mask_channel_prob"])
    assert any("N(0, mask_noise_std) noise" in n for n in result.notes)
    assert not any("not imported" in n for n in result.notes), result.notes


def test_2_0_config_drift_is_noted_and_damage_named(tmp_path):
    def drift(cfg):
        cfg["model"]["modalities"]["audio"]["rebuild_batches"] = True  # a key this fairseq does not know
        del cfg["model"]["norm_affine"]  # and one it expects

    _, result = import_fairseq(rewrite("audio2", tmp_path / "drift.pt", drift))
    assert any("cfg.model.modalities.audio: keys unknown" in n and "rebuild_batches" in n for n in result.notes)
    assert any("cfg.model.norm_affine is missing; fairseq's default True" in n for n in result.notes)

    with pytest.raises(SpecError, match=r"lacks 1 weight\(s\).*blocks\.1\.attn\.qkv\.bias"):
        import_fairseq(rewrite("audio2", tmp_path / "broken.pt", drop=("blocks.1.attn.qkv.bias",)))

    def pre_ln_conv(cfg):
        cfg["model"]["modalities"]["audio"]["conv_pos_pre_ln"] = True

    with pytest.raises(SpecError, match=r"conv_pos_pre_ln=true \(a LayerNorm before the positional conv\)"):
        import_fairseq(rewrite("audio2", tmp_path / "pre_ln_conv.pt", pre_ln_conv))


def test_2_0_without_an_ema_teacher_imports_the_backbone_and_says_so(tmp_path):
    ckpt = read_fairseq_checkpoint(FIXTURES / "audio2" / "checkpoint.pt")
    path = save_fairseq_checkpoint(tmp_path / "no_ema.pt", ckpt.cfg, ckpt.model)
    model, result = import_fairseq(path)
    assert "objective" not in result.spec and isinstance(model, TaskModel)
    assert any("backbone only" in n and "no EMA teacher" in n for n in result.notes)
    assert any("not imported" in n and "modality_encoders.AUDIO.decoder.proj.weight" in n for n in result.notes)


@pytest.mark.parametrize("family,key,value,extra", [
    ("audio1", "encoder_layers", 1, "encoder.layers.1."),
    ("audio1", "conv_feature_layers", "[(8, 10, 5)] + [(8, 3, 2)]", "feature_extractor.conv_layers.2."),
    ("audio2", "depth", 1, "blocks.1."),
    ("audio2", "modalities.audio.use_alibi_encoder", False, "modality_encoders.AUDIO.alibi_scale"),
])
def test_a_config_describing_a_smaller_model_than_the_file_is_named(family, key, value, extra, tmp_path):
    """fewer layers, conv blocks or no ALiBi in the config than tensors in the file: fairseq's
    strict load refuses such a file, and so does d2v, naming the tensors left over."""
    def edit(cfg):
        node, *path = cfg["model"], *key.split(".")
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value

    with pytest.raises(SpecError, match=rf"backbone tensor\(s\) its config does not account for: .*{re.escape(extra)}"):
        import_fairseq(rewrite(family, tmp_path / "smaller.pt", edit))


def test_more_target_layers_than_the_model_has_average_them_all_as_fairseq_does(tmp_path):
    def edit(cfg):
        cfg["model"]["average_top_k_layers"] = 5

    _, result = import_fairseq(rewrite("audio1", tmp_path / "top5.pt", edit))
    assert result.spec["objective"]["target"]["top_k"] == 2
    assert any("average_top_k_layers=5 exceeds the 2 layers" in n for n in result.notes)
