"""data2vec 2.0 image checkpoints written by fairseq itself import into d2v and compute what
fairseq computed (1e-5, fp32).

The fixtures in ``tests/fairseq_oracle/fixtures/vision2*/`` came from fairseq's own code
(fairseq-fixed 0.12.3.1, ``examples/data2vec``): tiny models trained for two updates and saved by
fairseq's ``Trainer``, with fairseq's outputs beside them (``outputs.pt``). Regenerate them in the
oracle venv (tests/fairseq_oracle/README.md)::

    python tests/fairseq_oracle/make_fixtures.py vision2 vision2_prenorm vision2_ema_blocks vision2_cls vision2_cls_token

* ``vision2`` (post-LN blocks): student and EMA teacher outputs, the per-block FFN outputs, and
  the first continued update after fairseq resumed the file -- teacher targets, ``Decoder2d``
  predictions and loss on fairseq's mask, with ``clone_batch`` 2 and the CLS loss -- and the EMA
  decay after it, through ``import_fairseq`` and through ``d2v convert``.
* ``vision2_prenorm``: the same with ``layer_norm_first: true`` and a teacher that runs the
  student's patch embedding (no ``ema_local_encoder``); ``vision2_ema_blocks``: ``ema_encoder_only``
  (fairseq's teacher averages the shared blocks only) with a patch embedding narrower than the
  model. Their teachers are checked through the targets (fairseq runs them on student parts).
* ``vision2_cls`` / ``vision2_cls_token``: ``mae_image_classification`` logits (mean pooling +
  ``fc_norm`` as released; the CLS token without ``fc_norm``).
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
from d2v.interop.fairseq import import_fairseq
from d2v.spec.model import build_model
from d2v.interop.weights import load_initial_weights

pytestmark = pytest.mark.usefixtures("single_thread")

FIXTURES = Path(__file__).resolve().parents[1] / "fairseq_oracle" / "fixtures"
PRETRAINING = ("vision2", "vision2_prenorm", "vision2_ema_blocks")
CLASSIFIERS = ("vision2_cls", "vision2_cls_token")
ATOL = 1e-5
MAX_DIFF = MaxDiff(ATOL)


@pytest.fixture(scope="module", autouse=True)
def diff_table():
    """Print every measured difference (``pytest -s``) once the module is done."""
    yield
    MAX_DIFF.report("fairseq oracle, vision")


def assert_matches(family: str, check: str, got: torch.Tensor, want: torch.Tensor) -> None:
    MAX_DIFF.check(f"{family} {check}", got.detach(), want)


def recorded(family: str) -> dict:
    return torch.load(FIXTURES / family / "outputs.pt", weights_only=True)


def converted(family: str, tmp_path: Path, task: str) -> torch.nn.Module:
    """``d2v convert`` the fixture, then build the converted spec's model for ``task`` and load
    its weights, as a run initialised from the converted directory does."""
    out = tmp_path / family
    assert main(["convert", str(FIXTURES / family / "checkpoint.pt"), str(out)]) == 0
    spec = yaml.safe_load((out / "spec.yaml").read_text())
    assert spec["task"] == task
    model = build_model(spec["model"], plugins.registry(), task)
    load_initial_weights(model, out, strict=True)
    return model.eval()


def encoder_outputs(feature_extractor, encoder, images: torch.Tensor, target_feature: str = "ffn"):
    with torch.no_grad():
        features = feature_extractor(images)
        return encoder(features.features, features.padding_mask, output_layer_targets=True,
                       target_feature=target_feature)


def check_backbones(family: str, model, want: dict) -> None:
    depth = want["layer_ffn"].shape[0]
    student = encoder_outputs(model.feature_extractor, model.encoder, want["images"], model.target_feature)
    assert_matches(family, "student encoder output (eval)", student.last_hidden_state, want["encoder_out"])
    assert_matches(family, "student per-block targets (FFN or block end)", torch.stack(student.layer_targets[-depth:]),
                   want["layer_ffn"])
    if "teacher_encoder_out" in want:  # not with ema_encoder_only: fairseq's teacher is its shared blocks alone
        teacher = model.teacher.model
        t_out = encoder_outputs(teacher["feature_extractor"], teacher["encoder"], want["images"])
        assert_matches(family, "EMA teacher encoder output", t_out.last_hidden_state, want["teacher_encoder_out"])


def check_next_update(family: str, model, want: dict) -> None:
    """fairseq's next update on the same images, mask and decoder noise: targets, predictions,
    loss per masked patch (fairseq's loss / sample_size) and the EMA decay that follows it."""
    seen = {}
    build = model.target.build

    def recording_build(*args, **kwargs):
        seen["targets"] = build(*args, **kwargs)
        return seen["targets"]

    model.target.build = recording_build
    hook = model.decoder.register_forward_hook(lambda module, args, out: seen.__setitem__("decoded", out))
    images, mask = want["images"], want["mask"]
    batch = {"inputs": images, "precomputed_mask": mask.view(len(images), -1, mask.shape[-1])}
    try:
        model.train()
        torch.manual_seed(want["noise_seed"])  # the decoder's noise at masked patches, as fairseq drew it
        out = model(batch)
    finally:
        hook.remove()
        del model.target.build
    assert_matches(family, "next update: teacher targets", seen["targets"], want["targets"])
    assert_matches(family, "next update: decoder predictions", seen["decoded"][mask], want["predictions"])
    assert out.sample_size == want["sample_size"]
    fairseq_loss = want["loss"] / want["sample_size"]
    relative = abs(out.loss.item() - fairseq_loss) / fairseq_loss
    MAX_DIFF.record(f"{family} next update: loss (relative)", relative)
    assert relative <= 1e-5, f"{family}: loss {out.loss.item()} != fairseq's {fairseq_loss}"
    assert int(model.num_updates) == want["num_updates"]
    model.after_optimizer_step(1)  # this run's first step: fairseq's update num_updates + 1
    assert model.current_decay() == pytest.approx(want["next_ema_decay"], rel=1e-7)


@pytest.mark.parametrize("family", PRETRAINING)
def test_imported_pretraining_checkpoint_computes_what_fairseq_did(family):
    want = recorded(family)
    model, result = import_fairseq(FIXTURES / family / "checkpoint.pt")
    assert result.task == "pretrain" and result.spec["objective"]["name"] == "data2vec2"
    assert not any("not imported" in note for note in result.notes), result.notes
    check_backbones(family, model, want)
    check_next_update(family, model, want)


@pytest.mark.parametrize("family", PRETRAINING)
def test_converted_pretraining_checkpoint_continues_as_fairseq_would(family, tmp_path):
    want = recorded(family)
    model = converted(family, tmp_path, "pretrain")
    check_backbones(family, model, want)
    check_next_update(family, model, want)
    backbone = load_d2v_checkpoint(tmp_path / family)  # the converted student alone
    assert_matches(family, "student via d2v convert + load_d2v_checkpoint",
                   backbone({"inputs": want["images"]}).last_hidden_state, want["encoder_out"])


def test_pre_ln_checkpoints_keep_fairseqs_block_arithmetic():
    """fairseq's pre-LN ``AltBlock`` has no residual around its MLP; the import says so in the spec."""
    _, result = import_fairseq(FIXTURES / "vision2_prenorm" / "checkpoint.pt")
    assert result.spec["encoder"]["layer_norm_first"] is True and result.spec["encoder"]["mlp_residual"] is False
    _, result = import_fairseq(FIXTURES / "vision2" / "checkpoint.pt")
    assert "mlp_residual" not in result.spec["encoder"]


@pytest.mark.parametrize("family", CLASSIFIERS)
def test_classifier_logits_match_fairseq(family, tmp_path):
    want = recorded(family)
    model, result = import_fairseq(FIXTURES / family / "checkpoint.pt")
    assert result.task == "finetune" and result.spec["head"] == {"name": "image_classification", "num_labels": 5}
    assert not any("not imported" in note for note in result.notes), result.notes
    with torch.no_grad():
        out = model({"inputs": want["images"]})
        assert_matches(family, "encoder output (import_fairseq)", out.last_hidden_state, want["encoder_out"])
        assert_matches(family, "logits (import_fairseq)", out.logits, want["logits"])
        loss = model({"inputs": want["images"], "labels": want["labels"]}).loss
        assert_matches(family, "eval loss per image", loss, torch.tensor(want["eval_loss"] / want["sample_size"]))
        again = converted(family, tmp_path, "finetune")
        assert_matches(family, "logits (d2v convert)", again({"inputs": want["images"]}).logits, want["logits"])
