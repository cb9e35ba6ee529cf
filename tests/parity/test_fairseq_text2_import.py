"""fairseq data2vec 2.0 text checkpoints import exactly: tiny checkpoints in fairseq's on-disk layout
(tests/fairseq_fixtures.py) with fairseq's names and shapes; the forward pass written out from
fairseq's source (tests/fairseq_reference/text_multi.py) on those weights equals the imported d2v
model's within 1e-5 (fp32, padded batches) -- student, EMA teacher and its targets, Decoder1d,
fine-tuned classification logits -- through ``import_fairseq``, ``d2v convert`` and ``--to hf``."""

from __future__ import annotations

import copy

import pytest
import torch

from d2v.cli import main
from d2v.convert import load_d2v_checkpoint
from d2v.errors import SpecError
from d2v.fairseq import import_fairseq
from fairseq_fixtures import save_fairseq_checkpoint
from fairseq_reference.text_multi import (
    M,
    PAD,
    classifier_logits,
    decoder_1d,
    extract_features,
    fairseq_ema_state,
    fairseq_multi_text_cfg,
    fairseq_multi_text_state,
    fairseq_text_classifier_cfg,
    fairseq_text_classifier_state,
    make_targets,
)
from text_pooler import assert_pooler_is_reported

pytestmark = pytest.mark.usefixtures("single_thread")
ATOL = 1e-5
MAX_DIFF: dict[str, float] = {}


def close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape, f"{name}: {tuple(got.shape)} vs {tuple(want.shape)}"
    diff = (got.float() - want.float()).abs().max().item()
    MAX_DIFF[name] = max(MAX_DIFF.get(name, 0.0), diff)
    assert diff <= ATOL, f"{name}: max abs diff {diff:.3g}"


def tokens(lengths=(11, 7, 4), vocab: int = 50, seed: int = 5) -> torch.Tensor:
    """``<s> ... </s>`` rows right-padded with fairseq's pad id 1."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.full((len(lengths), max(lengths)), PAD, dtype=torch.long)
    for i, n in enumerate(lengths):
        rows[i, :n] = torch.randint(4, vocab, (n,), generator=g)
        rows[i, 0], rows[i, n - 1] = 0, 2
    return rows


def student(model, ids):
    pad = ids.eq(PAD)
    fe = model.feature_extractor(ids, pad)
    return model.encoder(fe.features, fe.padding_mask, output_layer_targets=True)


def pretrain_checkpoint(tmp_path, cfg=None, *, ema=True, dictconfig=True, edit=None):
    cfg = cfg or fairseq_multi_text_cfg()
    state = fairseq_multi_text_state(cfg, seed=0)
    teacher = fairseq_ema_state(cfg) if ema else None
    if edit is not None:
        edit(state, teacher)
    path = save_fairseq_checkpoint(tmp_path / "d2v2_text.pt", cfg, state, teacher, dictconfig=dictconfig)
    return path, cfg, state, teacher


VARIANTS = {
    "base_like": {},
    "residual_decoder_one_projection": {"decoder": {"decoder_residual": True, "projection_layers": 1,
                                                    "decoder_dim": 32, "decoder_kernel": 4, "decoder_groups": 4}},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_student_teacher_decoder_match_fairseq(tmp_path, variant):
    cfg = fairseq_multi_text_cfg(**copy.deepcopy(VARIANTS[variant]))
    path, cfg, state, ema = pretrain_checkpoint(tmp_path, cfg, dictconfig=variant == "base_like")
    model, result = import_fairseq(path)
    assert result.task == "pretrain" and result.spec["objective"]["name"] == "data2vec2"
    ids = tokens()
    pad = ids.eq(PAD)
    ref = extract_features(state, cfg, ids, pad)
    out = student(model, ids)
    close("student", out.last_hidden_state, ref["x"])
    for got, want in zip(out.layer_targets, ref["layer_results"]):
        close("student_ffn", got, want)

    # teacher = fairseq's _ema blocks over the student's embeddings (ema_encoder_only), and its targets
    fe = model.feature_extractor(ids, pad)
    t_out = model.teacher(fe.features, fe.padding_mask, output_layer_targets=True)
    t_ref = extract_features({**state, **{f"blocks.{k}": v for k, v in ema.items()}}, cfg, ids, pad)
    close("teacher", t_out.last_hidden_state, t_ref["x"])
    unpadded = ids[:1, :11]  # fairseq's pretraining batches are unpadded (sample_break_mode none)
    t_one = model.teacher(model.feature_extractor(unpadded).features, output_layer_targets=True)
    want = make_targets(extract_features({**state, **{f"blocks.{k}": v for k, v in ema.items()}}, cfg,
                                         unpadded)["layer_results"], cfg)
    close("targets", model.target.build(t_one), want)
    assert not torch.allclose(t_out.last_hidden_state, out.last_hidden_state)

    dec_in = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(3))
    close("decoder", model.decoder(dec_in), decoder_1d(state, cfg, dec_in))

    assert not any("not imported" in n for n in result.notes), result.notes
    model.train()
    loss = model({"inputs": ids, "padding_mask": pad}).loss
    assert torch.isfinite(loss)


def test_the_spec_carries_the_published_objective_and_backbone(tmp_path):
    path, *_ = pretrain_checkpoint(tmp_path)
    _, result = import_fairseq(path)
    obj = result.spec["objective"]
    assert obj["masking"] == {"name": "random", "mask_prob": 0.48}                   # mask_length 1
    assert obj["target"] == {"name": "data2vec", "top_k": 2, "layer_norm": "instance", "final_norm": None,
                             "loss": "l2", "loss_scale": 1.0}
    assert (obj["decoder_type"], obj["decoder_dim"], obj["decoder_kernel"], obj["decoder_layers"],
            obj["decoder_groups"], obj["decoder_residual"], obj["decoder_projection_layers"]) == \
        ("1d", 24, 9, 3, 1, False, 2)
    assert obj["clone_batch"] == 8 and obj["ema_scope"] == "encoder" and obj["copy_keys"] == []
    assert (obj["ema_decay"], obj["ema_end_decay"], obj["ema_anneal_end_step"]) == (0.9999, 0.99999, 100000)
    assert obj["decoder_input_dropout"] == 0.1 and obj["mask_noise_std"] == 0.01
    fe, enc = result.spec["feature_extractor"], result.spec["encoder"]
    assert fe["type_vocab_size"] == 0 and fe["max_position_embeddings"] == 30 and fe["padding_idx"] == 1
    assert fe["layer_norm_eps"] == 1e-5 and enc["layer_norm_eps"] == 1e-5 and enc["ffn_dim"] == 128
    assert any("RoBERTa tokenizer" in n for n in result.notes)


def test_convert_cli_and_hugging_face_export_equal_fairseq(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    path, cfg, state, _ = pretrain_checkpoint(tmp_path)
    ids = tokens()
    want = extract_features(state, cfg, ids, ids.eq(PAD))["x"]
    assert main(["convert", str(path), str(tmp_path / "out")]) == 0
    assert "task pretrain" in capsys.readouterr().out
    backbone = load_d2v_checkpoint(tmp_path / "out")
    close("convert_cli", backbone({"inputs": ids, "padding_mask": ids.eq(PAD)}).last_hidden_state, want)
    # the student is a Hugging Face Data2VecTextModel (no token types: a zero row is exported)
    assert main(["convert", str(path), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert_pooler_is_reported(tmp_path / "hf", capsys.readouterr().out)
    hf = transformers.Data2VecTextModel.from_pretrained(tmp_path / "hf", add_pooling_layer=False).eval()
    with torch.no_grad():
        got = hf(input_ids=ids, attention_mask=ids.ne(PAD).long()).last_hidden_state
    close("to_hf", got, want)


@pytest.mark.parametrize("num_classes", [3, 1])
def test_finetuned_classifier_logits_match_fairseq(tmp_path, num_classes):
    pretrain = fairseq_multi_text_cfg()
    cfg = fairseq_text_classifier_cfg(pretrain)
    state = fairseq_text_classifier_state(pretrain, num_classes)
    path = save_fairseq_checkpoint(tmp_path / "ft.pt", cfg, state)
    model, result = import_fairseq(path)
    assert result.task == "finetune"
    assert result.spec["head"] == {"name": "text_classification", "num_labels": num_classes, "classifier_dropout": 0.0}
    ids = tokens()
    want = classifier_logits(state, cfg, ids)
    close("classifier", model({"inputs": ids, "padding_mask": ids.eq(PAD)}).logits, want)
    assert not any("not imported" in n for n in result.notes), result.notes
    assert main(["convert", str(path), str(tmp_path / "out")]) == 0
    again = load_d2v_checkpoint(tmp_path / "out")
    close("classifier_cli", again({"inputs": ids, "padding_mask": ids.eq(PAD)}).logits, want)


def test_config_drift_is_noted_not_fatal(tmp_path):
    cfg = fairseq_multi_text_cfg()
    state = fairseq_multi_text_state(cfg)
    drifted = copy.deepcopy(cfg)
    drifted["model"]["a_future_option"] = 3
    del drifted["model"]["mlp_ratio"]  # an older fairseq: the default (4) applies
    del drifted["model"]["modalities"]["text"]["decoder"]["input_dropout"]
    path = save_fairseq_checkpoint(tmp_path / "drift.pt", drifted, state, fairseq_ema_state(cfg))
    model, result = import_fairseq(path)
    notes = "\n".join(result.notes)
    assert "cfg.model.mlp_ratio is missing; fairseq's default 4.0" in notes
    assert "decoder.input_dropout is missing" in notes and "ignored: a_future_option" in notes
    ids = tokens()
    close("drift", student(model, ids).last_hidden_state, extract_features(state, cfg, ids, ids.eq(PAD))["x"])


def test_a_missing_tensor_is_named(tmp_path):
    path, *_ = pretrain_checkpoint(tmp_path, edit=lambda s, t: s.pop("blocks.1.attn.qkv.bias"))
    with pytest.raises(SpecError, match=r"lacks 1 tensors.*blocks\.1\.attn\.qkv\.bias"):
        import_fairseq(path)
    path, *_ = pretrain_checkpoint(tmp_path, edit=lambda s, t: t.pop("0.mlp.fc2.weight"))
    with pytest.raises(SpecError, match=r"_ema\.0\.mlp\.fc2\.weight"):
        import_fairseq(path)
    pretrain = fairseq_multi_text_cfg()
    state = fairseq_text_classifier_state(pretrain, 3)
    del state["model." + M + "local_encoder.layernorm_embedding.bias"]
    bad = save_fairseq_checkpoint(tmp_path / "ft.pt", fairseq_text_classifier_cfg(pretrain), state)
    with pytest.raises(SpecError, match=r"model\.modality_encoders\.TEXT\.local_encoder\.layernorm_embedding\.bias"):
        import_fairseq(bad)


def test_without_ema_the_teacher_starts_as_the_student(tmp_path):
    path, cfg, state, _ = pretrain_checkpoint(tmp_path, ema=False)
    model, result = import_fairseq(path)
    assert any("no _ema" in n for n in result.notes)
    ids = tokens()
    fe = model.feature_extractor(ids, ids.eq(PAD))
    close("teacher_copy", model.teacher(fe.features, fe.padding_mask).last_hidden_state,
          extract_features(state, cfg, ids, ids.eq(PAD))["x"])


def test_unsupported_settings_and_a_foreign_dictionary_fail_clearly(tmp_path):
    path, *_ = pretrain_checkpoint(tmp_path, fairseq_multi_text_cfg(layer_norm_first=True))
    with pytest.raises(SpecError, match="layer_norm_first"):
        import_fairseq(path)
    path, *_ = pretrain_checkpoint(tmp_path)
    good = tmp_path / "dict.txt"
    good.write_text("".join(f"{i} {100 - i}\n" for i in range(45)))  # 4 specials + 45 + <mask> = 50
    _, result = import_fairseq(path, {"dict": str(good)})
    assert any("50 ids, matching" in n for n in result.notes)
    bad = tmp_path / "dict_big.txt"
    bad.write_text("".join(f"{i} 1\n" for i in range(60)))
    with pytest.raises(SpecError, match="does not belong to the checkpoint"):
        import_fairseq(path, {"dict": str(bad)})


def test_report_max_abs_errors():
    """Prints the largest difference seen per comparison (run with -s); all are within ATOL."""
    print({k: f"{v:.2e}" for k, v in sorted(MAX_DIFF.items())})
    assert all(v <= ATOL for v in MAX_DIFF.values())
