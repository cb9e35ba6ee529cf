"""fairseq data2vec speech checkpoints -> d2v (and on to Hugging Face), checked against ``transformers``.

A tiny random ``transformers`` data2vec-audio model is written out under fairseq's parameter
names (the mapping below is read off fairseq's module attributes: ``ConvFeatureExtractionModel``'s
``Sequential(conv, dropout, Sequential(transpose, Fp32LayerNorm, transpose), GELU)``, the
``TransformerEncoder``'s ``pos_conv`` Sequentials, ``TransformerSentenceEncoderLayer``) into a
checkpoint with fairseq's on-disk layout, imported by ``import_fairseq`` and ``d2v convert``, and
compared output by output with the ``transformers`` model on a padded batch (fp32, eval mode).
Also: the EMA teacher and regression head land in d2v's objective, the CTC letters, config
drift, missing weights, and ``model.init.checkpoint: x.pt`` in a run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from audio_batches import padded_batch
from fairseq_fixtures import save_fairseq_checkpoint
from max_diff import MaxDiff

import d2v.cli.main
from d2v.interop.convert import load_d2v_checkpoint
from d2v.api.errors import SpecError
from d2v.interop.fairseq import import_fairseq
from d2v.spec.model import TaskModel

transformers = pytest.importorskip("transformers")
from transformers import Data2VecAudioConfig, Data2VecAudioForCTC, Data2VecAudioModel  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-5
MAX_DIFF = MaxDiff(ATOL)

#: (conv stack, pos conv depth, pos conv kernel, conv bias): an even positional kernel (SamePad
#: trims a frame) and the conv bias are exercised
SHAPES = {
    "even_kernel": dict(conv=[(16, 10, 5), (16, 3, 2), (24, 3, 2)], pos_depth=2, pos_kernel=4, conv_bias=False),
    "odd_kernel_bias": dict(conv=[(16, 10, 5), (24, 4, 4)], pos_depth=3, pos_kernel=5, conv_bias=True),
}
DIM, LAYERS, HEADS, FFN, GROUPS = 32, 2, 4, 64, 4
LIBRI_LETTERS = "| E T A O N I H S R D L U M W C F G Y P B V K ' X J Q Z".split()


assert_close = MAX_DIFF.check


def teardown_module(module):
    MAX_DIFF.report("fairseq audio import")


# --------------------------------------------------------------------------- fixtures


def hf_config(shape: str, **extra) -> Data2VecAudioConfig:
    s = SHAPES[shape]
    return Data2VecAudioConfig(
        hidden_size=DIM, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
        conv_dim=[c for c, _, _ in s["conv"]], conv_kernel=[k for _, k, _ in s["conv"]],
        conv_stride=[st for _, _, st in s["conv"]], conv_bias=s["conv_bias"],
        num_conv_pos_embeddings=s["pos_depth"], conv_pos_kernel_size=s["pos_kernel"],
        num_conv_pos_embedding_groups=GROUPS, mask_time_prob=0.05, **extra,
    )


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight random (HF initialises biases and norms to constants)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.4 - 0.2)
            elif "layer_norm.weight" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def fairseq_audio_cfg(shape: str) -> dict:
    """A ``Data2VecAudioConfig`` section as fairseq saves it (the data2vec base recipe's values)."""
    s = SHAPES[shape]
    return {
        "_name": "data2vec_audio", "extractor_mode": "layer_norm", "encoder_layers": LAYERS,
        "encoder_embed_dim": DIM, "encoder_ffn_embed_dim": FFN, "encoder_attention_heads": HEADS,
        "activation_fn": "gelu", "layer_type": "transformer", "dropout": 0.1, "attention_dropout": 0.1,
        "activation_dropout": 0.0, "encoder_layerdrop": 0.05, "dropout_input": 0.0, "dropout_features": 0.0,
        "final_dim": 0, "layer_norm_first": False, "conv_feature_layers": " + ".join(f"[{t}]" for t in s["conv"]),
        "conv_bias": s["conv_bias"], "feature_grad_mult": 1.0, "mask_length": 10, "mask_prob": 0.65,
        "mask_selection": "static", "mask_other": 0.0, "no_mask_overlap": False, "mask_min_space": 1,
        "require_same_masks": True, "mask_dropout": 0.0, "mask_channel_length": 10, "mask_channel_prob": 0.0,
        "mask_channel_before": False, "conv_pos": s["pos_kernel"] * s["pos_depth"], "conv_pos_groups": GROUPS,
        "pos_conv_depth": s["pos_depth"], "required_seq_len_multiple": 2, "crop_seq_to_multiple": 1,
        "loss_beta": 0.0, "loss_scale": None, "average_top_k_layers": 2, "layer_norm_target_layer": False,
        "instance_norm_target_layer": True, "instance_norm_targets": False, "layer_norm_targets": False,
        "batch_norm_target_layer": False, "group_norm_target_layer": False, "ema_decay": 0.999,
        "ema_end_decay": 0.9999, "ema_anneal_end_step": "${optimization.max_update}", "ema_transformer_only": True,
        "ema_layers_only": True, "max_update": "${optimization.max_update}", "min_target_var": 0.1,
        "min_pred_var": 0.01,
    }


def pretraining_cfg(model_cfg: dict) -> dict:
    return {"common": {"seed": 1, "fp16": True}, "optimization": {"max_update": 400000, "lr": [0.0005]},
            "task": {"_name": "audio_pretraining", "normalize": True, "sample_rate": 16000},
            "criterion": {"_name": "model"}, "model": model_cfg}


def fairseq_names_from_hf(hf: dict[str, torch.Tensor], shape: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """HF ``Data2VecAudioModel`` weights under fairseq ``Data2VecAudioModel`` names."""
    s = SHAPES[shape]
    out = {}

    def put(fairseq_name: str, hf_name: str) -> None:
        out[prefix + fairseq_name] = hf[hf_name].clone()

    for i in range(len(s["conv"])):
        put(f"feature_extractor.conv_layers.{i}.0.weight", f"feature_extractor.conv_layers.{i}.conv.weight")
        if s["conv_bias"]:
            put(f"feature_extractor.conv_layers.{i}.0.bias", f"feature_extractor.conv_layers.{i}.conv.bias")
        for p in ("weight", "bias"):
            put(f"feature_extractor.conv_layers.{i}.2.1.{p}", f"feature_extractor.conv_layers.{i}.layer_norm.{p}")
    for p in ("weight", "bias"):
        put(f"layer_norm.{p}", f"feature_projection.layer_norm.{p}")
        put(f"post_extract_proj.{p}", f"feature_projection.projection.{p}")
        put(f"encoder.layer_norm.{p}", f"encoder.layer_norm.{p}")
        for j in range(s["pos_depth"]):
            put(f"encoder.pos_conv.{j}.0.{p}", f"encoder.pos_conv_embed.layers.{j}.conv.{p}")
        for layer in range(LAYERS):
            fs, theirs = f"encoder.layers.{layer}", f"encoder.layers.{layer}"
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                put(f"{fs}.self_attn.{proj}.{p}", f"{theirs}.attention.{proj}.{p}")
            put(f"{fs}.self_attn_layer_norm.{p}", f"{theirs}.layer_norm.{p}")
            put(f"{fs}.fc1.{p}", f"{theirs}.feed_forward.intermediate_dense.{p}")
            put(f"{fs}.fc2.{p}", f"{theirs}.feed_forward.output_dense.{p}")
            put(f"{fs}.final_layer_norm.{p}", f"{theirs}.final_layer_norm.{p}")
    put("mask_emb", "masked_spec_embed")
    return out


def encoder_ema(weights: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """fairseq's ``_ema`` of ``ema_transformer_only``: the encoder's weights under its own names
    (a perturbed copy, so teacher and student differ)."""
    g = torch.Generator().manual_seed(seed)
    return {k[len("encoder."):]: v + 0.01 * torch.randn(v.shape, generator=g)
            for k, v in weights.items() if k.startswith("encoder.")}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def pretrained(request, tmp_path_factory):
    """(hf model, fairseq checkpoint path, fairseq weights, ema) of a data2vec_audio pretraining run."""
    shape = request.param
    hf = randomize(Data2VecAudioModel(hf_config(shape)), seed=3)
    weights = fairseq_names_from_hf(hf.state_dict(), shape)
    g = torch.Generator().manual_seed(4)
    weights["final_proj.0.weight"] = torch.randn(DIM, DIM, generator=g)  # released files: final_proj.0
    weights["final_proj.0.bias"] = torch.randn(DIM, generator=g)
    ema = encoder_ema(weights, seed=5)
    path = save_fairseq_checkpoint(tmp_path_factory.mktemp(shape) / "audio_base_ls.pt",
                                   pretraining_cfg(fairseq_audio_cfg(shape)), weights, ema)
    return hf, path, weights, ema


def hidden(model: torch.nn.Module, inputs: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    if not isinstance(model, TaskModel):
        model = TaskModel(model.feature_extractor, model.encoder).eval()
    with torch.no_grad():
        return model({"inputs": inputs, "padding_mask": attention_mask == 0}).last_hidden_state


# --------------------------------------------------------------------------- data2vec 1.0 pretraining


def test_pretrained_backbone_matches_transformers(pretrained, tmp_path):
    hf, path, weights, ema = pretrained
    inputs, attention_mask = padded_batch()
    with torch.no_grad():
        expected = hf(inputs, attention_mask=attention_mask).last_hidden_state

    model, result = import_fairseq(path)
    assert result.task == "pretrain" and result.spec["objective"]["name"] == "data2vec"
    assert_close("1.0 import_fairseq", hidden(model, inputs, attention_mask), expected)

    assert d2v.cli.main.main(["convert", str(path), str(tmp_path / "d2v")]) == 0
    converted = load_d2v_checkpoint(tmp_path / "d2v")
    assert_close("1.0 d2v convert", hidden(converted, inputs, attention_mask), expected)

    assert d2v.cli.main.main(["convert", str(path), str(tmp_path / "hf"), "--to", "hf"]) == 0
    back = Data2VecAudioModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert_close("1.0 --to hf", back(inputs, attention_mask=attention_mask).last_hidden_state, expected)


def test_pretrained_objective_takes_fairseqs_teacher_and_head(pretrained):
    hf, path, weights, ema = pretrained
    model, result = import_fairseq(path)
    objective = result.spec["objective"]
    assert objective["target"] == {"name": "data2vec", "top_k": 2, "layer_norm": "instance", "final_norm": None,
                                   "loss": "l2", "loss_scale": None, "reduction": "sum"}
    assert objective["ema_anneal_end_step"] == 400000 and objective["copy_keys"] == ["pos_conv"]
    assert objective["masking"]["mask_prob"] == 0.65 and objective["masking"]["mask_length"] == 10
    assert torch.equal(model.regression_head.weight, weights["final_proj.0.weight"])
    teacher = model.teacher.model.state_dict()
    assert torch.equal(teacher["layers.1.attention.q_proj.weight"], ema["layers.1.self_attn.q_proj.weight"])
    assert torch.equal(teacher["layers.0.ffn_norm.bias"], ema["layers.0.final_layer_norm.bias"])
    assert torch.equal(teacher["pos_conv.layers.0.conv.weight"], ema["pos_conv.0.0.weight"])
    assert not torch.equal(teacher["layers.1.attention.q_proj.weight"],
                           model.encoder.layers[1].attention.q_proj.weight)
    # every tensor of the file was used, every config key known: no "not imported" or "missing" note
    assert not any("not imported" in n or "missing" in n for n in result.notes), result.notes
    # continued pretraining: the imported objective computes a finite loss and updates the teacher
    inputs, attention_mask = padded_batch()
    torch.manual_seed(0)
    model.train()
    out = model({"inputs": inputs, "padding_mask": attention_mask == 0})
    assert torch.isfinite(out.loss) and out.sample_size > 0
    out.loss.backward()
    assert model.regression_head.weight.grad is not None


def test_pretrained_without_ema_or_head_imports_what_it_can(pretrained, tmp_path):
    hf, path, weights, ema = pretrained
    cfg = pretraining_cfg(fairseq_audio_cfg(_shape(weights)))
    model, result = import_fairseq(save_fairseq_checkpoint(tmp_path / "no_ema.pt", cfg, weights))
    assert any("teacher starts as a copy of the student" in n for n in result.notes)
    assert torch.equal(model.teacher.model.layers[0].ffn.fc1.weight, model.encoder.layers[0].ffn.fc1.weight)

    no_head = {k: v for k, v in weights.items() if not k.startswith("final_proj")}
    model, result = import_fairseq(save_fairseq_checkpoint(tmp_path / "no_head.pt", cfg, no_head, ema))
    assert "objective" not in result.spec and isinstance(model, TaskModel)
    assert any("backbone only" in n and "final_proj" in n for n in result.notes)
    assert any("not imported" in n and "_ema.layers.0.fc1.weight" in n for n in result.notes)


def test_a_whole_model_ema_becomes_a_whole_model_teacher(pretrained, tmp_path):
    """``ema_transformer_only: false``: fairseq's EMA covers the conv stack too (d2v ``ema_scope: all``)."""
    hf, path, weights, ema = pretrained
    model_cfg = {**fairseq_audio_cfg(_shape(weights)), "ema_transformer_only": False, "ema_layers_only": False}
    g = torch.Generator().manual_seed(8)
    whole = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in weights.items()}
    model, result = import_fairseq(save_fairseq_checkpoint(tmp_path / "all.pt", pretraining_cfg(model_cfg), weights, whole))
    objective = result.spec["objective"]
    assert objective["ema_scope"] == "all" and objective["copy_keys"] == []
    teacher = model.teacher.model.state_dict()
    assert torch.equal(teacher["feature_extractor.conv_layers.0.conv.weight"],
                       whole["feature_extractor.conv_layers.0.0.weight"])
    assert torch.equal(teacher["encoder.mask_embedding"], whole["mask_emb"])
    assert torch.equal(teacher["encoder.layers.1.ffn.fc2.bias"], whole["encoder.layers.1.fc2.bias"])
    assert any("not imported: _ema.final_proj.0.bias, _ema.final_proj.0.weight" in n for n in result.notes)


def _shape(weights: dict[str, torch.Tensor]) -> str:
    return "even_kernel" if "feature_extractor.conv_layers.2.0.weight" in weights else "odd_kernel_bias"


# --------------------------------------------------------------------------- fine-tuned CTC over data2vec 1.0


def ctc_cfg(pretrained_model_cfg: dict, **outer) -> dict:
    """A ``wav2vec_ctc`` run's config: the fine-tuning fields and the pretrained run's config
    (``w2v_args``), as fairseq stores them (data2vec's base_960h recipe values)."""
    model = {
        "_name": "wav2vec_ctc", "w2v_path": "/checkpoint/audio_base_ls.pt", "no_pretrained_weights": False,
        "dropout_input": 0.0, "final_dropout": 0.0, "dropout": 0.0, "attention_dropout": 0.0,
        "activation_dropout": 0.1, "apply_mask": True, "mask_length": 10, "mask_prob": 0.5, "mask_selection": "static",
        "mask_other": 0.0, "no_mask_overlap": False, "mask_channel_length": 64, "mask_channel_prob": 0.1,
        "mask_channel_selection": "static", "freeze_finetune_updates": 0, "feature_grad_mult": 0.0, "layerdrop": 0.1,
        "normalize": True, "data": "/data/ls960", "blank_weight": 0.0, "blank_mode": "add",
        "w2v_args": pretraining_cfg(pretrained_model_cfg), **outer,
    }
    return {"common": {"seed": 1}, "task": {"_name": "audio_finetuning", "normalize": True, "labels": "ltr"},
            "criterion": {"_name": "ctc", "zero_infinity": True}, "model": model}


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """(hf CTC model, fairseq wav2vec_ctc checkpoint, its weights) with fairseq's 32 LibriSpeech outputs."""
    shape = "even_kernel"
    hf = randomize(Data2VecAudioForCTC(hf_config(shape, vocab_size=32)), seed=6)
    state = hf.state_dict()
    bare = {k[len("data2vec_audio."):]: v for k, v in state.items() if k.startswith("data2vec_audio.")}
    weights = fairseq_names_from_hf(bare, shape, prefix="w2v_encoder.w2v_model.")
    weights["w2v_encoder.proj.weight"] = state["lm_head.weight"].clone()
    weights["w2v_encoder.proj.bias"] = state["lm_head.bias"].clone()
    path = save_fairseq_checkpoint(tmp_path_factory.mktemp("ctc") / "audio_base_ls_960h.pt",
                                   ctc_cfg(fairseq_audio_cfg(shape)), weights)
    return hf, path, weights


def logits(model: torch.nn.Module, inputs: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model({"inputs": inputs, "padding_mask": attention_mask == 0}).logits


def test_ctc_logits_match_transformers(finetuned, tmp_path):
    hf, path, weights = finetuned
    inputs, attention_mask = padded_batch()
    with torch.no_grad():
        expected = hf(inputs, attention_mask=attention_mask).logits

    model, result = import_fairseq(path)
    assert result.task == "finetune"
    head = result.spec["head"]
    assert head["vocab"] == "librispeech" and head["ctc_zero_infinity"] is True
    assert any("LibriSpeech letter dictionary" in n for n in result.notes)
    assert model.head.blank_id == 0 and model.head.vocab.tokens[4:] == LIBRI_LETTERS
    encoder = result.spec["encoder"]
    assert (encoder["layerdrop"], encoder["mask_time_prob"], encoder["mask_feature_prob"]) == (0.1, 0.5, 0.1)
    assert encoder["mask_feature_length"] == 64 and encoder["apply_spec_augment"] is True
    assert result.spec["freeze"] == ["feature_extractor.conv_layers"]  # feature_grad_mult: 0
    assert_close("1.0 ctc import_fairseq", logits(model, inputs, attention_mask), expected)

    assert d2v.cli.main.main(["convert", str(path), str(tmp_path / "d2v")]) == 0
    assert_close("1.0 ctc d2v convert", logits(load_d2v_checkpoint(tmp_path / "d2v"), inputs, attention_mask), expected)

    assert d2v.cli.main.main(["convert", str(path), str(tmp_path / "hf"), "--to", "hf"]) == 0
    back = Data2VecAudioForCTC.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert_close("1.0 ctc --to hf", back(inputs, attention_mask=attention_mask).logits, expected)
    vocab = json.loads((tmp_path / "hf" / "vocab.json").read_text())
    assert vocab["<pad>"] == 0 == back.config.pad_token_id and vocab["|"] == 4 and vocab["Z"] == 31


def write_dict(path, letters) -> str:
    path.write_text("".join(f"{s} {1000 - i}\n" for i, s in enumerate(letters)))
    return str(path)


def test_ctc_dictionary_names_the_outputs(finetuned, tmp_path):
    hf, path, weights = finetuned
    inputs, attention_mask = padded_batch()
    with torch.no_grad():
        expected = hf(inputs, attention_mask=attention_mask).logits

    # the LibriSpeech dict.ltr.txt gives the built-in vocabulary
    libri = write_dict(tmp_path / "dict.ltr.txt", LIBRI_LETTERS)
    model, result = import_fairseq(path, {"dict": libri})
    assert result.spec["head"]["vocab"] == "librispeech" and not any("no --dict" in n for n in result.notes)

    # another dictionary: its symbols, in fairseq's order, the blank (fairseq id 0) named <pad>
    letters = list("abcdefghijklmnopqrstuvwxyz") + ["|", "#"]
    other = write_dict(tmp_path / "dict.other.txt", letters)
    assert d2v.cli.main.main(["convert", str(path), str(tmp_path / "d2v"), "--dict", other]) == 0
    converted = load_d2v_checkpoint(tmp_path / "d2v")
    assert converted.head.vocab.tokens == ["<pad>", "<s>", "</s>", "<unk>"] + letters
    assert converted.head.blank_id == 0
    assert_close("1.0 ctc --dict", logits(converted, inputs, attention_mask), expected)
    assert converted.head.vocab.decode([4, 5, 30, 6, 0, 1]) == "ab c"  # fairseq ids 4.. are the file's lines

    with pytest.raises(SpecError, match=r"gives 31 symbols .* 32 rows"):
        import_fairseq(path, {"dict": write_dict(tmp_path / "short.txt", letters[:-1])})
    (tmp_path / "bad.txt").write_text("a 1\nb\n")
    with pytest.raises(SpecError, match="line 2: expected '<symbol> <count>'"):
        import_fairseq(path, {"dict": str(tmp_path / "bad.txt")})


def test_ctc_without_dictionary_and_unusual_size_asks_for_one(tmp_path):
    shape = "odd_kernel_bias"
    hf = randomize(Data2VecAudioForCTC(hf_config(shape, vocab_size=12)), seed=7)
    state = hf.state_dict()
    bare = {k[len("data2vec_audio."):]: v for k, v in state.items() if k.startswith("data2vec_audio.")}
    weights = fairseq_names_from_hf(bare, shape, prefix="w2v_encoder.w2v_model.")
    weights["w2v_encoder.proj.weight"], weights["w2v_encoder.proj.bias"] = state["lm_head.weight"], state["lm_head.bias"]
    path = save_fairseq_checkpoint(tmp_path / "ctc12.pt", ctc_cfg(fairseq_audio_cfg(shape), blank_weight=0.5), weights)
    with pytest.raises(SpecError, match="12 outputs.*--dict dict.ltr.txt"):
        import_fairseq(path)
    model, result = import_fairseq(path, {"dict": write_dict(tmp_path / "d.txt", list("|abcdefg"))})
    inputs, attention_mask = padded_batch()
    with torch.no_grad():
        expected = hf(inputs, attention_mask=attention_mask).logits
    expected[..., 0] += 0.5  # fairseq's blank_weight, folded into the blank's bias
    assert_close("1.0 ctc blank_weight", logits(model, inputs, attention_mask), expected)
    assert any("blank_weight=0.5" in n for n in result.notes)


# --------------------------------------------------------------------------- config drift, damage, init


def test_config_drift_is_noted_not_fatal(pretrained, tmp_path):
    hf, path, weights, ema = pretrained
    cfg = fairseq_audio_cfg(_shape(weights))
    cfg["rebuild_batches"] = True  # a key this fairseq version does not know
    del cfg["mask_channel_before"]  # and one it expects
    model, result = import_fairseq(save_fairseq_checkpoint(tmp_path / "drift.pt", pretraining_cfg(cfg), weights, ema))
    assert any("ignored: rebuild_batches" in n for n in result.notes), result.notes
    assert any("cfg.model.mask_channel_before is missing; fairseq's default False" in n for n in result.notes)
    inputs, attention_mask = padded_batch()
    with torch.no_grad():
        expected = hf(inputs, attention_mask=attention_mask).last_hidden_state
    assert_close("1.0 drifted config", hidden(model, inputs, attention_mask), expected)


def test_a_missing_weight_or_an_unsupported_architecture_is_named(pretrained, tmp_path):
    hf, path, weights, ema = pretrained
    cfg = pretraining_cfg(fairseq_audio_cfg(_shape(weights)))
    damaged = {k: v for k, v in weights.items() if k != "encoder.layers.1.fc2.weight"}
    with pytest.raises(SpecError, match=r"lacks 1 weight\(s\).*encoder\.layers\.1\.fc2\.weight"):
        import_fairseq(save_fairseq_checkpoint(tmp_path / "damaged.pt", cfg, damaged, ema))
    no_ema_layer = {k: v for k, v in ema.items() if k != "layers.0.fc1.bias"}
    with pytest.raises(SpecError, match=r"EMA teacher.*layers\.0\.fc1\.bias"):
        import_fairseq(save_fairseq_checkpoint(tmp_path / "damaged_ema.pt", cfg, weights, no_ema_layer))
    wav2vec2_like = {**cfg, "model": {**cfg["model"], "extractor_mode": "default", "pos_conv_depth": 1}}
    with pytest.raises(SpecError, match=r"extractor_mode='default'.*pos_conv_depth=1"):
        import_fairseq(save_fairseq_checkpoint(tmp_path / "w2v.pt", wav2vec2_like, weights))
    with pytest.raises(SpecError, match="not a list of"):
        bad = {**cfg, "model": {**cfg["model"], "conv_feature_layers": "__import__('os').system('true')"}}
        import_fairseq(save_fairseq_checkpoint(tmp_path / "evil_cfg.pt", bad, weights))


def test_init_checkpoint_from_a_fairseq_file_in_a_run(finetuned, tmp_path):
    """``model.init.checkpoint: x.pt`` in a fine-tuning spec: the run starts from the imported weights."""
    import yaml
    from safetensors.torch import load_file

    hf, path, weights = finetuned
    _, result = import_fairseq(path)
    spec = yaml.safe_load((ROOT / "experiments" / "asr_demo.yaml").read_text())
    spec["model"] = {**result.spec, "init": {"checkpoint": str(path)}}
    spec["data"].pop("test")
    spec["data"]["loader"] = {"max_batch_seconds": 3}
    spec["trainer"] = {"output_dir": str(tmp_path / "run"), "max_steps": 2, "log_every": 1, "eval_every": 0,
                       "progress_bar": False, "save_every": 0}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert d2v.cli.main.main(["run", str(tmp_path / "spec.yaml")]) == 0
    final = load_file(tmp_path / "run" / "final" / "model.safetensors")
    prefix = "w2v_encoder.w2v_model."
    # frozen (feature_grad_mult: 0) -> still fairseq's tensor after training
    assert torch.equal(final["feature_extractor.conv_layers.1.conv.weight"],
                       weights[prefix + "feature_extractor.conv_layers.1.0.weight"])
    # trained from fairseq's tensor: close to it, not equal
    moved = (final["encoder.layers.0.ffn.fc1.weight"] - weights[prefix + "encoder.layers.0.fc1.weight"]).abs().max()
    assert 0 < moved < 0.05
