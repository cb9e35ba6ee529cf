"""fairseq data2vec 2.0 speech checkpoints (``data2vec_multi``, AUDIO) -> d2v, against the
architecture written out from fairseq's source (``tests/fairseq_reference/audio_multi.py``).

Fixture weights under fairseq's names -> (a) the reference forward on those names, (b)
``import_fairseq`` / ``d2v convert`` -> d2v's ``audio.conv`` + ``audio.transformer`` (ALiBi, no
zeroing of padded frames): equal within 1e-5 (fp32) on a padded batch. The ``_ema`` teacher and
the conv decoder land in d2v's ``data2vec2`` objective; ``wav2vec_ctc`` over ``data2vec_multi``
gives reference features @ proj.
"""

from __future__ import annotations

import pytest
import torch
from audio_batches import padded_batch
from fairseq_fixtures import save_fairseq_checkpoint
from fairseq_reference.audio_multi import fairseq_multi_audio_cfg, fairseq_multi_audio_features, fairseq_multi_audio_state

import d2v.cli
from d2v.convert import load_d2v_checkpoint
from d2v.errors import SpecError
from d2v.fairseq import import_fairseq
from d2v.model import TaskModel

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 1e-5
MAX_DIFF: dict[str, float] = {}
A = "modality_encoders.AUDIO."
DIM = 32

VARIANTS = {
    # base_audio_only_task's shape: one prenet block, one learned scale per head
    "per_head": {},
    # Large's prenet (here 2 blocks), a scale per layer and head, an even positional kernel
    # (SamePad drops a frame), no prenet LayerDrop while the shared blocks have some
    "per_layer": {"audio": {"prenet_depth": 2, "learned_alibi_scale_per_layer": True, "conv_pos_width": 8,
                            "prenet_layerdrop": 0.0}},
}


def assert_close(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape, f"{name}: {tuple(ours.shape)} vs {tuple(theirs.shape)}"
    diff = (ours.float() - theirs.float()).abs().max().item()
    MAX_DIFF[name] = max(MAX_DIFF.get(name, 0.0), diff)
    assert diff <= ATOL, f"{name}: max abs diff {diff:.3g} > {ATOL}"


def teardown_module(module):
    print("\nfairseq 2.0 audio import, max abs diff:", {k: f"{v:.2e}" for k, v in sorted(MAX_DIFF.items())})


def teacher_ema(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """fairseq's ``_ema`` with ``ema_encoder_only: false``: the model minus conv stack,
    ``project_features`` and decoder (``make_target_model``), perturbed so it differs from the student."""
    g = torch.Generator().manual_seed(seed)
    skip = (f"{A}local_encoder.", f"{A}project_features.", f"{A}decoder.")
    return {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in state.items() if not k.startswith(skip)}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pretrained(request, tmp_path_factory):
    overrides = {k: dict(v) for k, v in VARIANTS[request.param].items()}
    cfg = fairseq_multi_audio_cfg(**overrides)
    state = fairseq_multi_audio_state(cfg, seed=0)
    ema = teacher_ema(state, seed=1)
    path = save_fairseq_checkpoint(tmp_path_factory.mktemp(request.param) / "base_libri.pt", cfg, state, ema)
    return request.param, cfg, state, ema, path


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    inputs, attention_mask = padded_batch()
    return inputs, attention_mask == 0


def hidden(model: torch.nn.Module, inputs: torch.Tensor, padding_mask: torch.Tensor, encoder=None) -> torch.Tensor:
    task = TaskModel(model.feature_extractor, encoder if encoder is not None else model.encoder).eval()
    with torch.no_grad():
        return task({"inputs": inputs, "padding_mask": padding_mask}).last_hidden_state


# --------------------------------------------------------------------------- pretraining checkpoints


def test_student_matches_the_reference_on_a_padded_batch(pretrained, tmp_path, capsys):
    name, cfg, state, ema, path = pretrained
    inputs, padding_mask = batch()
    expected = fairseq_multi_audio_features(state, cfg, inputs, padding_mask)

    model, result = import_fairseq(path)
    encoder = result.spec["encoder"]
    assert encoder["alibi"] is True and encoder["zero_padded_frames"] is False
    assert encoder["layers"] == 2 + VARIANTS[name].get("audio", {}).get("prenet_depth", 1)
    assert_close(f"2.0 {name} import_fairseq", hidden(model, inputs, padding_mask), expected)

    assert d2v.cli.main(["convert", str(path), str(tmp_path / "d2v")]) == 0
    assert_close(f"2.0 {name} d2v convert", hidden(load_d2v_checkpoint(tmp_path / "d2v"), inputs, padding_mask), expected)

    # Hugging Face's Data2VecAudio has no ALiBi: the export refuses, saying so
    assert d2v.cli.main(["convert", str(path), str(tmp_path / "hf"), "--to", "hf"]) != 0
    assert "ALiBi" in capsys.readouterr().err


def test_teacher_and_decoder_come_from_the_checkpoint(pretrained):
    name, cfg, state, ema, path = pretrained
    model, result = import_fairseq(path)
    prenet = VARIANTS[name].get("audio", {}).get("prenet_depth", 1)
    objective = result.spec["objective"]
    assert objective["name"] == "data2vec2" and objective["ema_scope"] == "encoder" and objective["copy_keys"] == []
    assert (objective["clone_batch"], objective["decoder_dim"], objective["decoder_kernel"]) == (8, 16, 7)
    assert objective["masking"] == {"name": "inverse_block", "dims": 1, "inverse": False, "mask_prob": 0.5,
                                    "mask_length": 5, "mask_prob_adjust": 0.05}
    assert objective["ema_end_decay"] == 0.99999 and objective["ema_anneal_end_step"] == 75000
    assert not any("not imported" in n or "missing" in n for n in result.notes), result.notes
    if name == "per_layer":
        assert any("prenet blocks use LayerDrop 0.0" in n for n in result.notes)

    teacher = model.teacher.model.state_dict()
    qkv = ema["blocks.1.attn.qkv.weight"]
    assert torch.equal(teacher[f"layers.{prenet + 1}.attention.v_proj.weight"], qkv[2 * DIM:])
    assert torch.equal(teacher["layers.0.attention.q_proj.bias"], ema[f"{A}context_encoder.blocks.0.attn.qkv.bias"][:DIM])
    assert torch.equal(teacher["pos_conv.layers.1.conv.weight"], ema[f"{A}relative_positional_encoder.2.0.weight"])
    assert torch.equal(teacher["alibi_scale"].flatten(), ema[f"{A}alibi_scale"].flatten())
    assert torch.equal(model.decoder.blocks[1].conv.weight, state[f"{A}decoder.blocks.1.0.weight"])
    assert torch.equal(model.decoder.proj.bias, state[f"{A}decoder.proj.bias"])

    # the teacher computes what fairseq's EMA model computes (on the student's conv features)
    inputs, padding_mask = batch()
    expected = fairseq_multi_audio_features({**state, **ema}, cfg, inputs, padding_mask)
    assert_close(f"2.0 {name} teacher", hidden(model, inputs, padding_mask, encoder=model.teacher.model), expected)

    # continued pretraining: a finite loss and gradients into the decoder
    torch.manual_seed(0)
    out = model.train()({"inputs": inputs, "padding_mask": padding_mask})
    assert torch.isfinite(out.loss) and out.sample_size > 0
    out.loss.backward()
    assert model.decoder.proj.weight.grad is not None


def test_an_encoder_only_ema_leaves_the_rest_of_the_teacher_to_the_student(tmp_path):
    """``ema_encoder_only: true``: fairseq's EMA holds the shared blocks alone (``{i}.*``) and the
    teacher reuses the student's positional conv, prenet and ALiBi scale (d2v: ``copy_keys``)."""
    cfg = fairseq_multi_audio_cfg(ema_encoder_only=True)
    state = fairseq_multi_audio_state(cfg, seed=2)
    ema = {k[len("blocks."):]: v + 0.02 for k, v in state.items() if k.startswith("blocks.")}
    model, result = import_fairseq(save_fairseq_checkpoint(tmp_path / "enc.pt", cfg, state, ema))
    assert result.spec["objective"]["copy_keys"] == ["pos_conv", "layer_norm", "alibi_scale", "layers.0"]
    teacher = model.teacher.model.state_dict()
    assert torch.equal(teacher["layers.2.ffn.fc1.weight"], ema["1.mlp.fc1.weight"])
    assert torch.equal(teacher["layers.0.ffn.fc1.weight"], model.encoder.layers[0].ffn.fc1.weight)
    assert torch.equal(teacher["pos_conv.layers.0.conv.bias"], model.encoder.pos_conv.layers[0].conv.bias)


def test_drift_missing_weights_and_unsupported_options(tmp_path):
    cfg = fairseq_multi_audio_cfg(audio={"rebuild_batches": True})
    del cfg["model"]["norm_affine"]
    state = fairseq_multi_audio_state(cfg, seed=3)
    _, result = import_fairseq(save_fairseq_checkpoint(tmp_path / "drift.pt", cfg, state))
    assert any("cfg.model.modalities.audio: keys unknown" in n and "rebuild_batches" in n for n in result.notes)
    assert any("cfg.model.norm_affine is missing; fairseq's default True" in n for n in result.notes)
    assert any("backbone only" in n and "no EMA teacher" in n for n in result.notes)  # no _ema saved
    assert any("not imported" in n and f"{A}decoder.proj.weight" in n for n in result.notes)

    broken = {k: v for k, v in state.items() if k != "blocks.1.attn.qkv.bias"}
    with pytest.raises(SpecError, match=r"blocks\.1\.attn\.qkv\.bias"):
        import_fairseq(save_fairseq_checkpoint(tmp_path / "broken.pt", cfg, broken))
    pre_ln = fairseq_multi_audio_cfg(layer_norm_first=True, audio={"conv_pos_pre_ln": True})
    with pytest.raises(SpecError, match="layer_norm_first=true.*conv_pos_pre_ln=true"):
        import_fairseq(save_fairseq_checkpoint(tmp_path / "preln.pt", pre_ln, fairseq_multi_audio_state(pre_ln)))


# --------------------------------------------------------------------------- fine-tuned CTC


def ctc_over_multi_cfg(pretrain_cfg: dict) -> dict:
    """``wav2vec_ctc`` fine-tuned from a data2vec 2.0 checkpoint (the cfg fairseq stores)."""
    model = {
        "_name": "wav2vec_ctc", "w2v_path": "/checkpoint/base_libri.pt", "apply_mask": True, "mask_prob": 0.65,
        "mask_length": 10, "mask_channel_prob": 0.25, "mask_channel_length": 64, "layerdrop": 0.1,
        "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.1, "final_dropout": 0.0,
        "feature_grad_mult": 0.0, "freeze_finetune_updates": 0, "normalize": True, "update_alibi": False,
        "zero_mask": False, "w2v_args": pretrain_cfg,
    }
    return {"common": {"seed": 1}, "task": {"_name": "audio_finetuning", "normalize": True, "labels": "ltr"},
            "criterion": {"_name": "ctc", "zero_infinity": True}, "model": model}


def test_ctc_over_data2vec_multi_is_reference_features_times_proj(tmp_path):
    cfg = fairseq_multi_audio_cfg()
    state = fairseq_multi_audio_state(cfg, seed=4)
    backbone = {k: v for k, v in state.items() if not k.startswith(f"{A}decoder.")}  # remove_pretraining_modules
    g = torch.Generator().manual_seed(5)
    proj_w, proj_b = torch.randn(32, DIM, generator=g) * 0.3, torch.randn(32, generator=g) * 0.1
    weights = {f"w2v_encoder.w2v_model.{k}": v for k, v in backbone.items()}
    weights.update({"w2v_encoder.proj.weight": proj_w, "w2v_encoder.proj.bias": proj_b})
    path = save_fairseq_checkpoint(tmp_path / "base_libri_960h.pt", ctc_over_multi_cfg(cfg), weights)

    inputs, padding_mask = batch()
    expected = fairseq_multi_audio_features(state, cfg, inputs, padding_mask) @ proj_w.t() + proj_b
    model, result = import_fairseq(path)
    with torch.no_grad():
        logits = model({"inputs": inputs, "padding_mask": padding_mask}).logits
    assert_close("2.0 ctc logits", logits, expected)

    spec = result.spec
    assert spec["head"]["vocab"] == "librispeech" and spec["freeze"] == ["feature_extractor.conv_layers"]
    encoder = spec["encoder"]
    assert encoder["alibi_learned_scale"] is False  # update_alibi: false
    assert (encoder["dropout"], encoder["layerdrop"], encoder["mask_time_prob"]) == (0.0, 0.1, 0.65)
    assert not model.encoder.alibi_scale.requires_grad
    assert any("N(0, mask_noise_std) noise" in n for n in result.notes)
    assert not any("not imported" in n for n in result.notes), result.notes

    assert d2v.cli.main(["convert", str(path), str(tmp_path / "d2v")]) == 0
    converted = load_d2v_checkpoint(tmp_path / "d2v")
    with torch.no_grad():
        assert_close("2.0 ctc d2v convert", converted({"inputs": inputs, "padding_mask": padding_mask}).logits, expected)
