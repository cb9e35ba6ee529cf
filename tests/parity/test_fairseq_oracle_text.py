"""fairseq's own text checkpoints, imported with ``d2v convert``, compute what fairseq computed.

The fixtures in tests/fairseq_oracle/fixtures/text*/ were produced by fairseq itself
(fairseq-fixed 0.12.3.1: its data2vec models, tasks and ``Trainer``, which saved
``checkpoint.pt``); ``outputs.pt`` holds what fairseq computed on fixed padded batches. Regenerate
them in the oracle venv (tests/fairseq_oracle/README.md)::

    python tests/fairseq_oracle/make_fixtures.py text1 text1_preln text1_cls text1_cls_d2v \
        text2 text2_variant text2_cls text2_preln     # text2_cls reads text2's checkpoint

Checked here, within 1e-5 (fp32): encoder outputs at real tokens, classifier logits, and for the
pretraining checkpoints the first continued update -- the teacher's targets, the student's
predictions and the loss per masked token -- on fairseq's batch and mask, from the converted
checkpoint (student, EMA teacher, regression head or decoder, update count), and the EMA step
after it (annealed decay, an averaged and a copied teacher tensor). The 2.0 update is on
an unpadded batch, as fairseq's text pretraining feeds it: on padded ones fairseq's instance-normed
targets and its decoder include the padded positions, d2v's leave them out. Pre-LN files are refused.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from max_diff import MaxDiff

from d2v.api import plugins
from d2v.cli.main import main
from d2v.interop.convert import load_d2v_checkpoint
from d2v.ssl.distill2 import decoder_input
from d2v.spec.model import build_model
from d2v.interop.weights import load_initial_weights

pytestmark = pytest.mark.usefixtures("single_thread")
FIXTURES = Path(__file__).resolve().parents[1] / "fairseq_oracle" / "fixtures"
PAD = 1
ATOL = 1e-5
MAX_DIFF = MaxDiff(ATOL)


close = MAX_DIFF.check


def same_loss(name: str, got: torch.Tensor, fairseq_sum: float, sample_size: int) -> None:
    """fairseq's criterion returns the summed loss and the masked-token count; d2v their ratio."""
    want = fairseq_sum / sample_size
    relative = abs(float(got.detach()) - want) / abs(want)
    MAX_DIFF.record(name, relative)
    assert relative <= 1e-5, f"{name}: d2v {float(got.detach()):.8g} vs fairseq {want:.8g} (relative {relative:.2g})"


def recorded(family: str) -> dict:
    return torch.load(FIXTURES / family / "outputs.pt", weights_only=True)


def converted(family: str, tmp_path: Path, *options: str) -> Path:
    out = tmp_path / family
    assert main(["convert", str(FIXTURES / family / "checkpoint.pt"), str(out), *options]) == 0
    return out


def pretraining_model(out: Path) -> torch.nn.Module:
    """The converted checkpoint as ``d2v run`` continues it: the spec's objective, every weight."""
    spec = yaml.safe_load((out / "spec.yaml").read_text())
    assert spec["task"] == "pretrain" and "objective" in spec["model"]
    model = build_model(spec["model"], plugins.registry(), "pretrain")
    load_initial_weights(model, out, strict=True)
    return model.train()


def encoder_matches(name: str, out: Path, fairseq: dict) -> None:
    """The student backbone on the padded batch, at real tokens (fairseq zeroes its padding embeddings)."""
    tokens = fairseq["tokens"]
    real = tokens.ne(PAD)
    with torch.no_grad():
        hidden = load_d2v_checkpoint(out)({"inputs": tokens, "padding_mask": ~real}).last_hidden_state
    close(name, hidden[real], fairseq["encoder_out"][real])


# --------------------------------------------------------------------------- data2vec 1.0


def test_text1_encoder_matches_fairseq(tmp_path):
    encoder_matches("text1 encoder", converted("text1", tmp_path), recorded("text1"))


def test_text1_continued_pretraining_matches_fairseqs_next_update(tmp_path, capsys):
    out = converted("text1", tmp_path, "--dict", str(FIXTURES / "text1" / "dict.txt"))
    report = capsys.readouterr().out
    assert "not imported" not in report and "data.processor.masking" in report
    fairseq = recorded("text1")
    model = pretraining_model(out)
    assert int(model.num_updates) == fairseq["num_updates"]
    tokens, mask = fairseq["tokens"], fairseq["mask"]
    batch = {"inputs": fairseq["masked_tokens"], "teacher_inputs": tokens, "corrupted_mask": mask,
             "padding_mask": tokens.eq(PAD)}
    with torch.no_grad():  # the objective's own parts, as its forward runs them
        fe = model.feature_extractor(batch["inputs"], batch["padding_mask"])
        targets = model.target(model._teacher_output(batch, fe.features, fe.padding_mask), mask)
        student = model.encoder(fe.features, fe.padding_mask, None).last_hidden_state
        predictions = model.regression_head(student[mask])
    close("text1 targets", targets, fairseq["targets"])
    close("text1 predictions", predictions, fairseq["predictions"])
    update = model(batch)
    assert update.sample_size == fairseq["sample_size"]
    same_loss("text1 loss (relative)", update.loss, fairseq["loss"], fairseq["sample_size"])

    teacher = model.teacher.model
    ema_step_matches("text1", model, fairseq, teacher["encoder"].layers[1].ffn.fc1.weight,
                     teacher["feature_extractor"].word_embeddings.weight)


def ema_step_matches(family: str, model, fairseq: dict, averaged: torch.Tensor, copied: torch.Tensor | None = None):
    """The EMA step after the update (student unchanged here, as fairseq's recording): the decay
    annealed at the next update count, an averaged and a copied teacher tensor."""
    model.after_optimizer_step(1)
    assert int(model.num_updates) == fairseq["num_updates"] + 1
    assert model.current_decay() == pytest.approx(fairseq["ema_decay"], rel=1e-12)
    close(f"{family} EMA step", averaged, fairseq["teacher_averaged"])
    if copied is not None:
        close(f"{family} EMA step", copied, fairseq["teacher_copied"])


def test_text1_broken_teacher_is_named(tmp_path, capsys):
    state = torch.load(FIXTURES / "text1" / "checkpoint.pt", weights_only=False)  # fairseq saved plain containers
    del state["model"]["encoder._ema"]["layers.1.fc2.weight"]
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    assert main(["convert", str(path), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "EMA teacher" in error and "encoder.layers.1.fc2.weight" in error and "Traceback" not in error


@pytest.mark.parametrize("family", ["text1_cls", "text1_cls_d2v"])
def test_text1_classifier_logits_match_fairseq(tmp_path, capsys, family):
    """RoBERTa (fairseq's README recipe) and ``data2vec_text`` with its own classification head."""
    fairseq = recorded(family)
    model = load_d2v_checkpoint(converted(family, tmp_path))
    assert "not imported" not in capsys.readouterr().out  # the pretraining leftovers are named as left out
    tokens = fairseq["tokens"]
    with torch.no_grad():
        close(f"{family} logits", model({"inputs": tokens, "padding_mask": tokens.eq(PAD)}).logits, fairseq["logits"])


# --------------------------------------------------------------------------- data2vec 2.0


@pytest.mark.parametrize("family", ["text2", "text2_variant"])
def test_text2_encoder_matches_fairseq(tmp_path, family):
    encoder_matches(f"{family} encoder", converted(family, tmp_path), recorded(family))


@pytest.mark.parametrize("family", ["text2", "text2_variant"])
def test_text2_continued_pretraining_matches_fairseqs_next_update(tmp_path, family):
    fairseq = recorded(family)
    model = pretraining_model(converted(family, tmp_path))
    assert int(model.num_updates) == fairseq["num_updates"]
    tokens = fairseq["update_tokens"]  # unpadded, as fairseq's text pretraining batches are
    batch = {"inputs": tokens, "padding_mask": tokens.eq(PAD), "precomputed_mask": fairseq["mask"]}
    clones = model.clone_batch
    with torch.no_grad():  # the objective's own parts, as its forward runs them
        fe = model.feature_extractor(tokens, batch["padding_mask"])
        mask = model._masks(batch, len(tokens), tokens.shape[1], fe.padding_mask, tokens.device)
        targets, _ = model._targets(model._teacher_output(batch, fe.features, fe.padding_mask), mask)
        hidden, _, restore = model.encode_kept(fe.features.repeat_interleave(clones, 0), None, mask)
        predictions = model.decoder(decoder_input(hidden, restore, model.mask_noise_std))[mask]
    close(f"{family} targets", targets, fairseq["targets"])
    close(f"{family} predictions", predictions, fairseq["predictions"])
    update = model(batch)
    assert update.sample_size == fairseq["sample_size"]
    same_loss(f"{family} loss (relative)", update.loss, fairseq["loss"], fairseq["sample_size"])
    ema_step_matches(family, model, fairseq, model.teacher.model.layers[1].ffn.fc1.weight)


def test_text2_classifier_saved_without_its_backbone_config(tmp_path, capsys):
    """fairseq's sentence_prediction keeps only ``model_path`` (here a path that no longer exists)."""
    classifier = str(FIXTURES / "text2_cls" / "checkpoint.pt")
    assert main(["convert", classifier, str(tmp_path / "refused")]) == 2
    error = capsys.readouterr().err
    for expected in ("pretrained_model_args is null", "model_path", "depth 2, width 16", "attention heads",
                     "--backbone PATH"):
        assert expected in error, error
    assert "prenet_depth" not in error
    assert main(["convert", classifier, str(tmp_path / "wrong"), "--backbone",
                 str(FIXTURES / "text1" / "checkpoint.pt")]) == 2
    assert "not data2vec_multi" in capsys.readouterr().err

    fairseq = recorded("text2_cls")
    out = converted("text2_cls", tmp_path, "--backbone", str(FIXTURES / "text2" / "checkpoint.pt"))
    assert "backbone's config was read from" in capsys.readouterr().out
    tokens = fairseq["tokens"]
    with torch.no_grad():
        logits = load_d2v_checkpoint(out)({"inputs": tokens, "padding_mask": tokens.eq(PAD)}).logits
    close("text2_cls logits", logits, fairseq["logits"])


@pytest.mark.parametrize("family, setting", [("text1_preln", "normalize_before: true (pre-LN; text.transformer is post-LN)"),
                                             ("text2_preln", "layer_norm_first: true (pre-LN; text.transformer is post-LN)")])
def test_pre_ln_checkpoints_are_refused_by_name(tmp_path, capsys, family, setting):
    """d2v's text encoder is post-LN; fairseq's pre-LN files stop the import, naming the setting."""
    assert main(["convert", str(FIXTURES / family / "checkpoint.pt"), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert setting in error and "Traceback" not in error
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_report_max_diffs():
    """The largest difference per check (``pytest -s`` shows them); all within tolerance."""
    MAX_DIFF.report("fairseq oracle, text")
    assert MAX_DIFF.worst <= ATOL
