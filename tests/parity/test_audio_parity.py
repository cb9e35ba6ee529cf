"""data2vec-audio parity with Hugging Face ``transformers``.

Tiny random ``Data2VecAudioModel`` / ``Data2VecAudioForCTC`` checkpoints are saved with
``save_pretrained``, loaded with ``d2v.from_pretrained`` and compared output by output (eval
mode, fp32, padded batches with attention masks); the d2v model is then exported with
``save_pretrained`` and loaded back in ``transformers``. Also: the per-layer data2vec target
(the FFN output), SpecAugment in training mode, LayerDrop off in eval, presets, and the
errors of ``from_pretrained``.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

import numpy as np
import pytest
import torch
from audio_batches import LENGTHS, padded_batch
from max_diff import MaxDiff

import d2v
from d2v.api.errors import SpecError
from d2v.interop.hf import PretrainedModel, save_pretrained
from d2v.spec.model import TaskModel, build_model
from d2v.api.plugins import registry

transformers = pytest.importorskip("transformers")
from transformers import Data2VecAudioConfig, Data2VecAudioForCTC, Data2VecAudioModel  # noqa: E402

from d2v_audio.encoder import AudioTransformerEncoder  # noqa: E402
from d2v_audio.feature_extractor import ConvFeatureExtractor  # noqa: E402
from d2v_audio.hf import AudioCTCConverter, AudioModelConverter  # noqa: E402
from d2v_audio import presets  # noqa: E402

ATOL = 1e-5
MAX_DIFF = MaxDiff(ATOL)  # the largest difference seen per field (printed at the end)

CONFIGS = {
    # even positional-conv kernel (exercises the pad trim), 3 pos-conv layers
    "even_pos_kernel": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        conv_dim=(16, 16, 24), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2),
        num_conv_pos_embeddings=3, conv_pos_kernel_size=6, num_conv_pos_embedding_groups=4,
        vocab_size=12,
    ),
    # conv bias, odd kernel, a single pos-conv layer, 3 layers, another eps, CTC mean + zero_infinity
    "conv_bias_mean": dict(
        hidden_size=48, num_hidden_layers=3, num_attention_heads=6, intermediate_size=96,
        conv_dim=(8, 16, 16, 32), conv_kernel=(8, 4, 3, 2), conv_stride=(4, 2, 2, 2), conv_bias=True,
        num_conv_pos_embeddings=1, conv_pos_kernel_size=5, num_conv_pos_embedding_groups=8,
        layer_norm_eps=1e-6, vocab_size=20, ctc_loss_reduction="mean", ctc_zero_infinity=True,
    ),
    # the data2vec conv stack (first layers), 5 pos-conv layers of kernel 19, sum reduction,
    # SpecAugment off in the config (no masked_spec_embed in the checkpoint)
    "base_shape": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        conv_dim=(32, 32, 32, 32, 32), conv_kernel=(10, 3, 3, 3, 3), conv_stride=(5, 2, 2, 2, 2),
        num_conv_pos_embeddings=5, conv_pos_kernel_size=19, num_conv_pos_embedding_groups=16,
        mask_time_prob=0.0, vocab_size=32, ctc_loss_reduction="sum",
    ),
}


assert_close = MAX_DIFF.check


def hf_model(cls, name: str, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    model = cls(Data2VecAudioConfig(**CONFIGS[name], **kwargs)).eval()
    # HF initialises biases and LayerNorms to constants and attention to near-uniform; make
    # every weight random (and attention sharp) so each rename and each head is exercised
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("bias"):
                param.uniform_(-0.2, 0.2)
            elif "layer_norm.weight" in param_name:
                param.uniform_(0.5, 1.5)
            elif param_name.endswith(("q_proj.weight", "k_proj.weight")):
                param.normal_(0.0, 0.3)
    return model


def ctc_labels(vocab_size: int, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(1, vocab_size, (len(LENGTHS), 9), generator=g)
    labels[1, 6:] = -100
    labels[2, 3:] = -100
    return labels


def compare_outputs(ours, theirs, fields) -> None:
    for field in fields:
        a, b = getattr(ours, field), getattr(theirs, field)
        assert (a is None) == (b is None), f"{field}: present in only one output"
        if isinstance(b, tuple):
            assert len(a) == len(b), f"{field}: {len(a)} vs {len(b)} tensors"
            for i, (x, y) in enumerate(zip(a, b)):
                assert_close(f"{field}[{i}]", x, y)
        elif b is not None:
            assert_close(field, a, b)


def run(model, inputs, attention_mask, labels=None, *, hf: bool):
    kwargs = {"attention_mask": attention_mask, "output_hidden_states": True}
    if labels is not None:
        kwargs["labels"] = labels
    with torch.no_grad():
        if hf:
            return model(inputs, **kwargs)
        return model(input_values=inputs, **kwargs)


# --------------------------------------------------------------------------- import / export parity


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_model_parity_roundtrip(name, tmp_path):
    theirs = hf_model(Data2VecAudioModel, name)
    theirs.save_pretrained(tmp_path / "hf")
    ours = d2v.from_pretrained(tmp_path / "hf")
    assert isinstance(ours, PretrainedModel) and isinstance(ours.model, TaskModel)
    assert ours.model.head is None and not ours.training

    inputs, attention_mask = padded_batch()
    fields = ("last_hidden_state", "extract_features", "hidden_states")
    expected = run(theirs, inputs, attention_mask, hf=True)
    compare_outputs(run(ours, inputs, attention_mask, hf=False), expected, fields)

    # no attention mask at all (nothing padded)
    with torch.no_grad():
        compare_outputs(ours(input_values=inputs), theirs(inputs), ("last_hidden_state", "extract_features"))

    # export, and load back in transformers: no missing / unexpected weights, same outputs
    ours.save_pretrained(tmp_path / "d2v")
    back, info = Data2VecAudioModel.from_pretrained(tmp_path / "d2v", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    compare_outputs(run(back.eval(), inputs, attention_mask, hf=True), expected, fields)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_ctc_parity_roundtrip(name, tmp_path):
    theirs = hf_model(Data2VecAudioForCTC, name)
    theirs.save_pretrained(tmp_path / "hf")
    ours = d2v.from_pretrained(tmp_path / "hf")
    assert type(ours.model.head).__name__ == "CTCHead"
    assert ours.model.head.ctc_loss_reduction == theirs.config.ctc_loss_reduction

    inputs, attention_mask = padded_batch()
    labels = ctc_labels(theirs.config.vocab_size)
    fields = ("loss", "logits", "hidden_states")
    expected = run(theirs, inputs, attention_mask, labels, hf=True)
    got = run(ours, inputs, attention_mask, labels, hf=False)
    compare_outputs(got, expected, fields)
    assert set(got.keys()) == {"loss", "logits", "hidden_states"}

    # without labels there is no loss, like HF
    with torch.no_grad():
        assert ours(input_values=inputs, attention_mask=attention_mask).loss is None

    ours.save_pretrained(tmp_path / "d2v")
    config = json.loads((tmp_path / "d2v" / "config.json").read_text())
    assert config["model_type"] == "data2vec-audio" and config["architectures"] == ["Data2VecAudioForCTC"]
    assert (tmp_path / "d2v" / "vocab.json").is_file()
    back, info = Data2VecAudioForCTC.from_pretrained(tmp_path / "d2v", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    compare_outputs(run(back.eval(), inputs, attention_mask, labels, hf=True), expected, fields)

    # and d2v reads its own export again (the vocab.json it wrote comes back too)
    again = d2v.from_pretrained(tmp_path / "d2v")
    assert again.model.head.vocab.tokens == ours.model.head.vocab.tokens
    compare_outputs(run(again, inputs, attention_mask, labels, hf=False), expected, fields)


def test_parity_with_eager_attention(tmp_path):
    """HF's eager attention (explicit softmax, additive mask) agrees too, within fp32 noise."""
    theirs = hf_model(Data2VecAudioForCTC, "conv_bias_mean", attn_implementation="eager")
    assert theirs.config._attn_implementation == "eager"
    theirs.save_pretrained(tmp_path)
    ours = d2v.from_pretrained(tmp_path)
    inputs, attention_mask = padded_batch()
    labels = ctc_labels(theirs.config.vocab_size)
    compare_outputs(run(ours, inputs, attention_mask, labels, hf=False),
                    run(theirs, inputs, attention_mask, labels, hf=True), ("loss", "logits", "hidden_states"))


def test_return_dict_false_is_hf_tuple(tmp_path):
    theirs = hf_model(Data2VecAudioForCTC, "even_pos_kernel")
    theirs.save_pretrained(tmp_path)
    ours = d2v.from_pretrained(tmp_path)
    inputs, attention_mask = padded_batch()
    labels = ctc_labels(theirs.config.vocab_size)
    with torch.no_grad():
        a = theirs(inputs, attention_mask=attention_mask, labels=labels, return_dict=False)
        b = ours(input_values=inputs, attention_mask=attention_mask, labels=labels, return_dict=False)
    assert len(a) == len(b) == 2
    assert_close("tuple.loss", b[0], a[0])
    assert_close("tuple.logits", b[1], a[1])


def test_pytorch_model_bin_checkpoint(tmp_path):
    theirs = hf_model(Data2VecAudioForCTC, "conv_bias_mean")
    theirs.save_pretrained(tmp_path)
    # the same weights as a legacy pytorch_model.bin
    os.remove(tmp_path / "model.safetensors")
    torch.save(theirs.state_dict(), tmp_path / "pytorch_model.bin")
    ours = d2v.from_pretrained(tmp_path)
    inputs, attention_mask = padded_batch()
    compare_outputs(run(ours, inputs, attention_mask, hf=False), run(theirs, inputs, attention_mask, hf=True), ("logits",))


def test_layer_targets_are_hf_ffn_outputs(tmp_path):
    """data2vec's target: each layer's FFN output (fc2, before dropout/residual/final LN)."""
    theirs = hf_model(Data2VecAudioModel, "conv_bias_mean")
    theirs.save_pretrained(tmp_path)
    model = d2v.from_pretrained(tmp_path).model
    captured = []
    hooks = [layer.feed_forward.output_dense.register_forward_hook(lambda m, i, o: captured.append(o))
             for layer in theirs.encoder.layers]
    inputs, attention_mask = padded_batch()
    with torch.no_grad():
        expected = theirs(inputs, attention_mask=attention_mask, output_hidden_states=True)
        features = model.feature_extractor(inputs, attention_mask == 0)
        out = model.encoder(features.features, features.padding_mask,
                            output_hidden_states=True, output_layer_targets=True)
        end = model.encoder(features.features, features.padding_mask, output_layer_targets=True,
                            target_feature="end")
    for h in hooks:
        h.remove()
    assert len(out.layer_targets) == model.encoder.num_layers == len(captured)
    for i, (x, y) in enumerate(zip(out.layer_targets, captured)):
        assert_close(f"layer_targets[{i}]", x, y)
    for i, (x, y) in enumerate(zip(end.layer_targets, expected.hidden_states[1:])):
        assert_close(f"layer_targets_end[{i}]", x, y)
    with pytest.raises(SpecError, match="target_feature"):
        model.encoder(features.features, output_layer_targets=True, target_feature="attn")


# --------------------------------------------------------------------------- SpecAugment and LayerDrop


def small_encoder(**kwargs) -> AudioTransformerEncoder:
    params = dict(dim=64, layers=2, heads=4, ffn_dim=128, num_pos_conv_layers=1, pos_conv_kernel=3,
                  pos_conv_groups=4, mask_time_prob=0.0, mask_feature_prob=0.0)
    params.update(kwargs)
    return AudioTransformerEncoder(**params)


def time_masked(encoder, x, padding_mask=None):
    """SpecAugment's time mask, read off the output: frames equal to the mask embedding."""
    y = encoder.spec_augment(x, padding_mask)
    return (y == encoder.mask_embedding).all(-1) & ~(x == encoder.mask_embedding).all(-1)


def test_spec_augment_time_mask_fraction():
    p, length, frames = 0.2, 5, 2000
    encoder = small_encoder(mask_time_prob=p, mask_time_length=length, mask_time_min_masks=2).train()
    torch.manual_seed(0)
    x = torch.randn(8, frames, 64)
    masked = time_masked(encoder, x)
    fraction = masked.float().mean().item()
    # spans may overlap, so p is an upper bound (up to one rounded-up span); random starts
    # cover about 1 - exp(-p) of the frames
    assert 1 - np.exp(-p) - 0.02 <= fraction <= p + length / frames, fraction
    # whole spans only: every run of masked frames is at least mask_time_length long
    for row in masked.numpy():
        runs = np.diff(np.flatnonzero(np.diff(np.r_[0, row.astype(int), 0])))[::2]
        assert (runs >= length).all()


def test_spec_augment_respects_padding_and_min_masks():
    encoder = small_encoder(mask_time_prob=0.3, mask_time_length=4, mask_time_min_masks=2).train()
    torch.manual_seed(1)
    x = torch.randn(4, 300, 64)
    padding_mask = torch.zeros(4, 300, dtype=torch.bool)
    padding_mask[1, 200:] = True
    padding_mask[2, 40:] = True
    padding_mask[3, 9:] = True  # 9 frames: min_masks=2 spans of 4 still fit
    masked = time_masked(encoder, x, padding_mask)
    assert not (masked & padding_mask).any()
    assert (masked.sum(-1) >= 1).all()
    for i, valid in enumerate((300, 200, 40)):
        assert masked[i].sum() <= 0.3 * valid + 4


def test_spec_augment_feature_mask():
    p, length, dim = 0.25, 4, 64
    encoder = small_encoder(mask_feature_prob=p, mask_feature_length=length).train()
    torch.manual_seed(2)
    x = torch.randn(6, 50, dim) + 3.0  # nothing is zero by chance
    y = encoder.spec_augment(x)
    zero = (y == 0)
    channel_masked = zero.all(1)  # (B, D): a feature is masked at every frame or at none
    assert torch.equal(zero.any(1), channel_masked)
    per_example = channel_masked.sum(-1)
    assert (per_example >= length).all() and (per_example <= p * dim + length).all()
    assert not (y == encoder.mask_embedding).all(-1).any()  # no time masking asked for


def test_spec_augment_only_in_training_without_explicit_mask():
    encoder = small_encoder(mask_time_prob=0.5, mask_time_length=2, mask_feature_prob=0.3, mask_feature_length=2,
                            dropout=0.0)
    x = torch.randn(2, 40, 64)
    encoder.eval()
    reference = encoder.embed(x)
    encoder.train()
    torch.manual_seed(3)
    assert not torch.allclose(encoder.embed(x), reference)
    # an explicit (here: empty) mask switches SpecAugment off
    assert torch.allclose(encoder.embed(x, mask=torch.zeros(2, 40, dtype=torch.bool)), reference)
    # explicit masks replace frames by the mask embedding, in eval too
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[:, 5:9] = True
    encoder.eval()
    replaced = torch.where(mask[..., None], encoder.mask_embedding, x)
    assert torch.allclose(encoder.embed(x, mask=mask), encoder.embed(replaced))


def test_spec_augment_is_reproducible_with_torch_seed():
    encoder = small_encoder(mask_time_prob=0.3, mask_time_length=3, mask_feature_prob=0.2, mask_feature_length=3).train()
    x = torch.randn(3, 100, 64)
    torch.manual_seed(7)
    a = encoder.spec_augment(x)
    torch.manual_seed(7)
    b = encoder.spec_augment(x)
    torch.manual_seed(8)
    c = encoder.spec_augment(x)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_layerdrop_only_in_training():
    encoder = small_encoder(layerdrop=1.0, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    twin = small_encoder(layerdrop=0.0)
    twin.load_state_dict(encoder.state_dict())
    x = torch.randn(2, 30, 64)
    encoder.eval()
    twin.eval()
    with torch.no_grad():
        out = encoder(x, output_hidden_states=True)
        assert torch.allclose(out.last_hidden_state, twin(x).last_hidden_state)
        assert not torch.allclose(out.hidden_states[1], out.hidden_states[0])
        encoder.train()
        dropped = encoder(x, output_hidden_states=True)
        # layerdrop=1: every layer skipped, the output is the embedded input
        assert torch.allclose(dropped.last_hidden_state, encoder.embed(x))
        assert len(dropped.hidden_states) == encoder.num_layers + 1
        # targets need every layer: no layer is dropped then
        targets = encoder(x, output_layer_targets=True)
        assert len(targets.layer_targets) == encoder.num_layers
        assert torch.allclose(targets.last_hidden_state, out.last_hidden_state, atol=1e-6)


# --------------------------------------------------------------------------- presets and spec


def test_hf_default_config_is_the_base_preset():
    spec = AudioModelConverter().hf_config_to_spec(Data2VecAudioConfig().to_dict())
    base = presets.data2vec_audio_base()
    for part in ("feature_extractor", "encoder"):
        for key, value in base[part].items():
            assert spec[part][key] == value, (part, key)
    # and the component defaults are data2vec-audio Base too
    assert ConvFeatureExtractor().hparams == {k: v for k, v in spec["feature_extractor"].items() if k != "name"}
    assert AudioTransformerEncoder().hparams == {k: v for k, v in spec["encoder"].items() if k != "name"}


def test_large_preset_shape():
    large = presets.data2vec_audio_large()
    assert large["encoder"]["dim"] == 1024
    assert "dim" not in large["feature_extractor"]  # the projection width follows the encoder
    assert (large["encoder"]["layers"], large["encoder"]["heads"], large["encoder"]["ffn_dim"]) == (24, 16, 4096)


def test_tiny_preset_ctc_exports_to_transformers(tmp_path):
    model = build_model({"preset": "data2vec-audio-tiny", "head": {"name": "ctc", "vocab": "librispeech"}},
                        registry(), "finetune").eval()
    inputs, attention_mask = padded_batch(lengths=(16000, 12000))
    fe = model.feature_extractor
    assert fe.output_lengths(torch.tensor(16000)).item() == 49  # ~50 frames per second
    save_pretrained(model, tmp_path, "Data2VecAudioForCTC")
    theirs = Data2VecAudioForCTC.from_pretrained(tmp_path).eval()
    labels = model.head.encode_texts(["HELLO WORLD", "DATA"])
    with torch.no_grad():
        ours = model({"inputs": inputs, "padding_mask": attention_mask == 0, "labels": labels})
        expected = theirs(inputs, attention_mask=attention_mask, labels=labels)
    assert_close("tiny.logits", ours.logits, expected.logits)
    assert_close("tiny.loss", ours.loss, expected.loss)


def test_converters_are_registered():
    names = registry().names("hf_converter")
    assert {"Data2VecAudioModel", "Data2VecAudioForCTC"} <= set(names)
    assert isinstance(registry().get("hf_converter", "Data2VecAudioForCTC").build(), AudioCTCConverter)


def test_feature_padding_mask_matches_hf():
    model = hf_model(Data2VecAudioModel, "conv_bias_mean")
    fe = ConvFeatureExtractor(**{k: v for k, v in AudioModelConverter().hf_config_to_spec(model.config.to_dict())
                                  ["feature_extractor"].items() if k != "name"})
    lengths = torch.tensor([4000, 3999, 2001, 1000, 61])
    attention_mask = (torch.arange(4000)[None] < lengths[:, None]).long()
    frames = fe.output_lengths(torch.tensor(4000)).item()
    expected = model._get_feature_vector_attention_mask(frames, attention_mask)
    assert torch.equal(fe.frame_padding_mask(attention_mask == 0, frames), ~expected)
    assert torch.equal(fe.output_lengths(lengths), model._get_feat_extract_output_lengths(lengths))
    # shorter than the receptive field: zero frames by the formula; d2v keeps the first frame
    # (HF's index trick would mark every frame valid), so attention never sees an empty row
    short = torch.tensor([4000, 37])
    assert fe.output_lengths(short)[1] <= 0
    mask = fe.frame_padding_mask(torch.arange(4000)[None] >= short[:, None], frames)
    assert (~mask[1]).sum() == 1 and not mask[1, 0]


# --------------------------------------------------------------------------- errors


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(SpecError, match="config.json"):
        d2v.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Wav2Vec2ForPreTraining"]}))
    with pytest.raises(SpecError, match="Known architectures: .*Data2VecAudioForCTC"):
        d2v.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Data2VecAudioModel"]}))
    with pytest.raises(SpecError, match="no weights"):
        d2v.from_pretrained(tmp_path)
    with pytest.raises(SpecError, match="not a directory"):
        d2v.from_pretrained(tmp_path / "missing")


def test_mismatched_weights_are_listed(tmp_path):
    theirs = hf_model(Data2VecAudioModel, "even_pos_kernel")
    state = theirs.state_dict()
    config = theirs.config.to_dict()
    bad = dict(state)
    bad["encoder.layers.0.surprise.weight"] = torch.zeros(1)
    with pytest.raises(SpecError, match="surprise"):
        AudioModelConverter().from_hf(config, bad)
    missing = {k: v for k, v in state.items() if "final_layer_norm" not in k}
    with pytest.raises(SpecError, match="missing from the checkpoint.*ffn_norm"):
        AudioModelConverter().from_hf(config, missing)


def test_unsupported_config_is_a_clear_error():
    config = Data2VecAudioConfig(feat_extract_activation="relu").to_dict()
    with pytest.raises(SpecError, match="feat_extract_activation"):
        AudioModelConverter().hf_config_to_spec(config)


def test_report_max_diff():
    """Prints the largest difference measured per field (run with -s to see it)."""
    MAX_DIFF.report("audio parity")
    assert MAX_DIFF.worst <= ATOL
