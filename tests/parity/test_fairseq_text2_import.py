"""fairseq data2vec 2.0 text checkpoints: the spec the importer writes, Hugging Face export, config
drift, missing tensors and refusals -- on fairseq's own checkpoint (tests/fairseq_oracle/fixtures/text2,
saved by fairseq's Trainer; its outputs recorded by fairseq) and on copies of it edited here.

Exactness of student, teacher, decoder, update and classifier against fairseq is in
test_fairseq_oracle_text.py."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from d2v.cli.main import main
from d2v.api.errors import SpecError
from d2v.interop.fairseq import import_fairseq, read_fairseq_checkpoint
from fairseq_fixtures import save_fairseq_checkpoint
from max_diff import MaxDiff
from text_pooler import assert_pooler_is_reported

pytestmark = pytest.mark.usefixtures("single_thread")
FIXTURE = Path(__file__).resolve().parents[1] / "fairseq_oracle" / "fixtures" / "text2"
PAD = 1
M = "modality_encoders.TEXT."
ATOL = 1e-5
MAX_DIFF = MaxDiff(ATOL)


close = MAX_DIFF.check


def fairseq_outputs() -> dict:
    return torch.load(FIXTURE / "outputs.pt", weights_only=True)


def student(model, ids):
    with torch.no_grad():
        fe = model.feature_extractor(ids, ids.eq(PAD))
        return model.encoder(fe.features, fe.padding_mask).last_hidden_state


def edited_copy(tmp_path: Path, edit=None, *, ema: bool = True) -> Path:
    """fairseq's checkpoint rewritten after ``edit(cfg, weights, ema)`` changed it."""
    ckpt = read_fairseq_checkpoint(FIXTURE / "checkpoint.pt")
    cfg, weights, teacher = copy.deepcopy(ckpt.cfg), dict(ckpt.model), dict(ckpt.ema)
    if edit is not None:
        edit(cfg, weights, teacher)
    return save_fairseq_checkpoint(tmp_path / "edited.pt", cfg, weights, teacher if ema else None,
                                   num_updates=ckpt.num_updates)


def test_the_spec_carries_the_checkpoints_objective_and_backbone():
    _, result = import_fairseq(FIXTURE / "checkpoint.pt")
    obj = result.spec["objective"]
    assert obj["masking"] == {"name": "random", "mask_prob": 0.48}                   # mask_length 1
    assert obj["target"] == {"name": "data2vec", "top_k": 2, "layer_norm": "instance", "final_norm": None,
                             "loss": "l2", "loss_scale": 1.0}
    assert (obj["decoder_type"], obj["decoder_dim"], obj["decoder_kernel"], obj["decoder_layers"],
            obj["decoder_groups"], obj["decoder_residual"], obj["decoder_projection_layers"]) == \
        ("1d", 16, 5, 2, 1, False, 2)
    assert obj["clone_batch"] == 2 and obj["ema_scope"] == "encoder" and obj["copy_keys"] == []
    assert (obj["ema_decay"], obj["ema_end_decay"], obj["ema_anneal_end_step"]) == (0.99, 0.999, 20)
    assert obj["decoder_input_dropout"] == 0.0 and obj["mask_noise_std"] == 0.0
    fe, enc = result.spec["feature_extractor"], result.spec["encoder"]
    assert fe["type_vocab_size"] == 0 and fe["max_position_embeddings"] == 34 and fe["padding_idx"] == 1
    assert fe["layer_norm_eps"] == 1e-5 and enc["layer_norm_eps"] == 1e-5 and enc["ffn_dim"] == 32
    assert any("RoBERTa tokenizer" in n for n in result.notes)
    assert not any("not imported" in n for n in result.notes), result.notes


def test_hugging_face_export_equals_fairseq(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    fairseq = fairseq_outputs()
    ids = fairseq["tokens"]
    real = ids.ne(PAD)
    assert main(["convert", str(FIXTURE / "checkpoint.pt"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert_pooler_is_reported(tmp_path / "hf", capsys.readouterr().out)
    hf = transformers.Data2VecTextModel.from_pretrained(tmp_path / "hf", add_pooling_layer=False).eval()
    with torch.no_grad():
        got = hf(input_ids=ids, attention_mask=real.long()).last_hidden_state
    close("to_hf", got[real], fairseq["encoder_out"][real])


def test_config_drift_is_noted_not_fatal(tmp_path):
    def drift(cfg, weights, ema):
        cfg["model"]["a_future_option"] = 3  # a newer fairseq's key
        del cfg["model"]["modalities"]["text"]["decoder"]["input_dropout"]  # an older one's: the default applies

    model, result = import_fairseq(edited_copy(tmp_path, drift))
    notes = "\n".join(result.notes)
    assert "decoder.input_dropout is missing" in notes and "ignored: a_future_option" in notes
    fairseq = fairseq_outputs()
    real = fairseq["tokens"].ne(PAD)
    close("drift", student(model, fairseq["tokens"])[real], fairseq["encoder_out"][real])


def test_a_config_that_does_not_fit_the_tensors_is_named(tmp_path):
    def older(cfg, weights, ema):
        del cfg["model"]["mlp_ratio"]  # fairseq's default 4.0: FFN 64 wide, the tensors are 32

    with pytest.raises(SpecError, match=r"cfg\.model describes depth 2, width 16, FFN width 64, but the checkpoint's "
                                         r"tensors have depth 2, width 16, FFN width 32"):
        import_fairseq(edited_copy(tmp_path, older))


def test_a_missing_tensor_is_named(tmp_path):
    with pytest.raises(SpecError, match=r"lacks 1 tensors.*blocks\.1\.attn\.qkv\.bias"):
        import_fairseq(edited_copy(tmp_path, lambda c, w, e: w.pop("blocks.1.attn.qkv.bias")))
    with pytest.raises(SpecError, match=r"_ema\.0\.mlp\.fc2\.weight"):
        import_fairseq(edited_copy(tmp_path, lambda c, w, e: e.pop("0.mlp.fc2.weight")))


def test_without_ema_the_teacher_starts_as_the_student(tmp_path):
    model, result = import_fairseq(edited_copy(tmp_path, ema=False))
    assert any("no _ema" in n for n in result.notes)
    ids = fairseq_outputs()["tokens"]
    with torch.no_grad():
        fe = model.feature_extractor(ids, ids.eq(PAD))
        close("teacher_copy", model.teacher(fe.features, fe.padding_mask).last_hidden_state, student(model, ids))


def test_the_dictionary_is_checked(tmp_path):
    _, result = import_fairseq(FIXTURE / "checkpoint.pt", {"dict": str(FIXTURE / "dict.txt")})
    assert any("45 ids, matching" in n for n in result.notes)
    bad = tmp_path / "dict_big.txt"
    bad.write_text("".join(f"{i} 1\n" for i in range(60)))
    with pytest.raises(SpecError, match="does not belong to the checkpoint"):
        import_fairseq(FIXTURE / "checkpoint.pt", {"dict": str(bad)})


def test_report_max_abs_errors():
    """Prints the largest difference seen per comparison (run with -s); all are within ATOL."""
    MAX_DIFF.report("fairseq text2 import")
    assert MAX_DIFF.worst <= ATOL
