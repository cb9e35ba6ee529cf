"""data2vec-text parity with Hugging Face ``transformers``, for all seven ``Data2VecText*`` classes.

Tiny random checkpoints are saved with ``save_pretrained``, loaded with ``d2v.from_pretrained``
and compared output by output and loss by loss (eval mode, fp32, padded batches: pad id at the
padding, ``attention_mask`` zeros there); then the d2v model is exported with ``save_pretrained``
and loaded back in ``transformers``, which must give the same outputs again. The causal LM is
also run with cross-attention and decoded token by token with the key/value cache (equal to a
full forward and to HF's own cached decoding). ``d2v convert`` is round-tripped for one class,
with the tokenizer files travelling along.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

import pytest
import torch
from max_diff import MaxDiff

import d2v
from d2v.interop.convert import convert
from d2v.api.errors import SpecError
from d2v.api.plugins import registry

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    Data2VecTextConfig,
    Data2VecTextForCausalLM,
    Data2VecTextForMaskedLM,
    Data2VecTextForMultipleChoice,
    Data2VecTextForQuestionAnswering,
    Data2VecTextForSequenceClassification,
    Data2VecTextForTokenClassification,
    Data2VecTextModel,
)

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 1e-5
MAX_DIFF = MaxDiff(ATOL)
VOCAB = 97
PAD = 1
CONFIG = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
              max_position_embeddings=40, type_vocab_size=2, layer_norm_eps=1e-5, pad_token_id=PAD)


assert_close = MAX_DIFF.check


def hf_model(cls, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    config = Data2VecTextConfig(**{**CONFIG, **kwargs})
    config._attn_implementation = "sdpa"
    model = cls(config).eval()
    # HF starts biases and LayerNorms at constants: randomise them so every rename is exercised
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.uniform_(-0.2, 0.2)
            elif "LayerNorm.weight" in name or "layer_norm.weight" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith(("query.weight", "key.weight")):
                param.normal_(0.0, 0.2)
    return model


def padded_batch(rows: int = 3, length: int = 9, seed: int = 1, lengths=(9, 6, 3)):
    """Token ids with pad id at the padding and ``attention_mask`` zeros there (right padding),
    plus random token types."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, length), generator=g)
    mask = torch.zeros(rows, length, dtype=torch.long)
    for i, n in enumerate(lengths[:rows]):
        mask[i, :n] = 1
    ids[mask == 0] = PAD
    types = torch.randint(0, 2, (rows, length), generator=g)
    return ids, mask, types


def compare(ours, theirs, fields) -> None:
    """Compare output fields, padded positions included."""
    for field in fields:
        a, b = ours[field], theirs[field]
        if isinstance(b, tuple):
            assert len(a) == len(b), f"{field}: {len(a)} vs {len(b)} tensors"
            for i, (x, y) in enumerate(zip(a, b)):
                assert_close(f"{field}[{i}]", x, y)
        else:
            assert_close(field, a, b)


def run(model, **kwargs):
    with torch.no_grad():
        return model(**kwargs)


def roundtrip(cls, theirs, tmp_path, fields, **inputs):
    """HF -> d2v (same outputs) -> HF (same outputs again); returns the d2v model."""
    theirs.save_pretrained(tmp_path / "hf")
    ours = d2v.from_pretrained(tmp_path / "hf")
    expected = run(theirs, output_hidden_states=True, **inputs)
    got = run(ours, output_hidden_states=True, **inputs)
    compare(got, expected, (*fields, "hidden_states"))
    ours.save_pretrained(tmp_path / "export")
    back = cls.from_pretrained(tmp_path / "export").eval()
    compare(run(back, **inputs), expected, fields)
    return ours


# --------------------------------------------------------------------------- the backbone


def test_model_with_pooler(tmp_path):
    ids, mask, types = padded_batch()
    ours = roundtrip(Data2VecTextModel, hf_model(Data2VecTextModel), tmp_path,
                     ("last_hidden_state", "pooler_output"), input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert ours.model.encoder.pooler is not None


def test_model_without_pooler_and_without_mask(tmp_path):
    theirs = Data2VecTextModel(Data2VecTextConfig(**CONFIG), add_pooling_layer=False).eval()
    theirs.save_pretrained(tmp_path / "hf")
    ours = d2v.from_pretrained(tmp_path / "hf")
    assert ours.model.encoder.pooler is None
    ids, _, _ = padded_batch()
    got, expected = run(ours, input_ids=ids), run(theirs, input_ids=ids)  # no attention_mask: pads attend (as HF)
    compare(got, expected, ("last_hidden_state",))
    assert got.pooler_output is None
    ours.save_pretrained(tmp_path / "export")
    # config.json cannot say "no pooler" to transformers; it must not say add_pooling_layer either, which
    # would swallow from_pretrained's add_pooling_layer=False (a config field, not the model's argument)
    assert "add_pooling_layer" not in json.loads((tmp_path / "export" / "config.json").read_text())
    back, info = Data2VecTextModel.from_pretrained(tmp_path / "export", add_pooling_layer=False,
                                                   output_loading_info=True)
    assert back.pooler is None and not info["missing_keys"] and not info["unexpected_keys"], info
    assert d2v.from_pretrained(tmp_path / "export").model.encoder.pooler is None


def test_left_padding_keeps_positions(tmp_path):
    """RoBERTa positions count real tokens only: a left-padded row equals its unpadded self."""
    theirs = hf_model(Data2VecTextModel)
    theirs.save_pretrained(tmp_path / "hf")
    ours = d2v.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([[PAD, PAD, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = (ids != PAD).long()
    got = run(ours, input_ids=ids, attention_mask=mask)
    compare(got, run(theirs, input_ids=ids, attention_mask=mask), ("last_hidden_state",))
    alone = run(ours, input_ids=ids[:1, 2:])
    assert_close("left padding", got.last_hidden_state[0, 2:], alone.last_hidden_state[0])


def test_ffn_layer_targets_are_hf_output_dense(tmp_path):
    """data2vec's per-layer target (the FFN output before dropout, residual and LayerNorm) is
    HF's ``encoder.layer[i].output.dense`` output."""
    theirs = hf_model(Data2VecTextModel)
    theirs.save_pretrained(tmp_path / "hf")
    model = d2v.from_pretrained(tmp_path / "hf").model
    captured = []
    hooks = [layer.output.dense.register_forward_hook(lambda m, i, o: captured.append(o))
             for layer in theirs.encoder.layer]
    ids, mask, _ = padded_batch()
    run(theirs, input_ids=ids, attention_mask=mask)
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        features = model.feature_extractor(ids, mask == 0)
        out = model.encoder(features.features, features.padding_mask, output_layer_targets=True)
    for i, (ours, hf) in enumerate(zip(out.layer_targets, captured)):
        assert_close(f"layer_targets[{i}]", ours, hf)


# --------------------------------------------------------------------------- causal LM


def lm_labels(ids, mask):
    return ids.masked_fill(mask == 0, -100)


def test_causal_lm(tmp_path):
    ids, mask, types = padded_batch()
    roundtrip(Data2VecTextForCausalLM, hf_model(Data2VecTextForCausalLM, is_decoder=True), tmp_path,
              ("loss", "logits"), input_ids=ids, attention_mask=mask, token_type_ids=types,
              labels=lm_labels(ids, mask))


def test_causal_lm_cross_attention(tmp_path):
    ids, mask, _ = padded_batch()
    g = torch.Generator().manual_seed(5)
    memory = torch.randn(3, 7, CONFIG["hidden_size"], generator=g)
    memory_mask = torch.ones(3, 7, dtype=torch.long)
    memory_mask[1, 4:] = 0
    memory_mask[2, 2:] = 0
    theirs = hf_model(Data2VecTextForCausalLM, is_decoder=True, add_cross_attention=True)
    roundtrip(Data2VecTextForCausalLM, theirs, tmp_path, ("loss", "logits"), input_ids=ids, attention_mask=mask,
              labels=lm_labels(ids, mask), encoder_hidden_states=memory, encoder_attention_mask=memory_mask)


@pytest.mark.parametrize("cross", [False, True], ids=["decoder", "cross_attention"])
def test_incremental_decoding_with_cache(tmp_path, cross):
    """Feeding a prompt, then one token at a time with the cache, gives the full forward's logits
    and HF's own cached logits at every step."""
    theirs = hf_model(Data2VecTextForCausalLM, is_decoder=True, add_cross_attention=cross)
    theirs.save_pretrained(tmp_path / "hf")
    ours = d2v.from_pretrained(tmp_path / "hf")
    ids, mask, _ = padded_batch(rows=2, length=8, lengths=(8, 8))
    extra = {}
    if cross:
        g = torch.Generator().manual_seed(6)
        memory_mask = torch.tensor([[1] * 5, [1, 1, 1, 0, 0]])
        extra = {"encoder_hidden_states": torch.randn(2, 5, CONFIG["hidden_size"], generator=g),
                 "encoder_attention_mask": memory_mask}
    full = run(ours, input_ids=ids, attention_mask=mask, **extra).logits
    compare({"logits": full}, run(theirs, input_ids=ids, attention_mask=mask, use_cache=False, **extra), ("logits",))

    prompt = 4
    ours_out = run(ours, input_ids=ids[:, :prompt], attention_mask=mask[:, :prompt], use_cache=True, **extra)
    hf_out = run(theirs, input_ids=ids[:, :prompt], attention_mask=mask[:, :prompt], use_cache=True, **extra)
    assert_close("cached prompt", ours_out.logits, full[:, :prompt])
    cache, hf_cache = ours_out.past_key_values, hf_out.cache
    for step in range(prompt, ids.shape[1]):
        kwargs = {"input_ids": ids[:, step:step + 1], "attention_mask": mask[:, :step + 1], "use_cache": True, **extra}
        ours_out = run(ours, past_key_values=cache, **kwargs)  # transformers 4's name, still taken
        hf_out = run(theirs, cache=hf_cache, **kwargs)
        assert cache.get_seq_length() == step + 1
        assert_close("cached step vs full", ours_out.logits[:, 0], full[:, step])
        assert_close("cached step vs HF cached step", ours_out.logits, hf_out.logits)
        cache, hf_cache = ours_out.past_key_values, hf_out.cache


def test_greedy_generation_matches_hf_forward(tmp_path):
    """``causal_lm.generate`` on the imported model (cached and uncached) continues prompts as a
    greedy loop over ``transformers``' own forward. (HF's ``generate()`` itself differs: its
    ``prepare_inputs_for_generation`` passes 0-based ``position_ids`` from the attention mask,
    not the RoBERTa positions its forward uses; observed with transformers 5.)"""
    from d2v_heads.text.causal_lm import generate

    theirs = hf_model(Data2VecTextForCausalLM, is_decoder=True)
    with torch.no_grad():
        theirs.lm_head.bias[PAD] = -10.0  # a generated <pad> would count as padding in HF's positions
    theirs.save_pretrained(tmp_path / "hf")
    ours = d2v.from_pretrained(tmp_path / "hf")
    ids, mask, _ = padded_batch(rows=2, length=5, lengths=(5, 5))
    expected = ids
    for _ in range(6):
        token = run(theirs, input_ids=expected, use_cache=False).logits[:, -1].argmax(-1)
        expected = torch.cat([expected, token[:, None]], dim=1)
    cached = generate(ours.model, ids, mask, max_new_tokens=6)
    uncached = generate(ours.model, ids, mask, max_new_tokens=6, use_cache=False)
    assert cached.tolist() == uncached.tolist() == expected.tolist()


def test_causal_lm_labels_switch_the_cache_off(tmp_path):
    theirs = hf_model(Data2VecTextForCausalLM, is_decoder=True)
    theirs.save_pretrained(tmp_path / "hf")
    ours = d2v.from_pretrained(tmp_path / "hf")
    ids, mask, _ = padded_batch()
    assert run(ours, input_ids=ids, attention_mask=mask).past_key_values is not None
    assert run(ours, input_ids=ids, attention_mask=mask, labels=lm_labels(ids, mask)).past_key_values is None


# --------------------------------------------------------------------------- task heads


def test_masked_lm(tmp_path):
    ids, mask, types = padded_batch()
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[1, 4], labels[2, 1] = 7, 11, 13
    ours = roundtrip(Data2VecTextForMaskedLM, hf_model(Data2VecTextForMaskedLM), tmp_path, ("loss", "logits"),
                     input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    model = ours.model
    assert model.head.decoder.weight is model.feature_extractor.word_embeddings.weight  # tied as HF


@pytest.mark.parametrize("problem", ["single_label_classification", "multi_label_classification", "regression"])
def test_sequence_classification(tmp_path, problem):
    ids, mask, types = padded_batch()
    g = torch.Generator().manual_seed(3)
    if problem == "regression":
        kwargs, labels = {"num_labels": 1}, torch.randn(3, generator=g)
    elif problem == "multi_label_classification":
        kwargs, labels = {"num_labels": 4}, (torch.rand(3, 4, generator=g) > 0.5).float()
    else:
        kwargs = {"num_labels": 3, "id2label": {0: "neg", 1: "neu", 2: "pos"}, "label2id": {"neg": 0, "neu": 1, "pos": 2}}
        labels = torch.tensor([2, 0, 1])
    theirs = hf_model(Data2VecTextForSequenceClassification, problem_type=problem, **kwargs)
    ours = roundtrip(Data2VecTextForSequenceClassification, theirs, tmp_path, ("loss", "logits"),
                     input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    assert ours.model.head.problem_type == problem


def test_sequence_classification_infers_problem_type(tmp_path):
    ids, mask, _ = padded_batch()
    roundtrip(Data2VecTextForSequenceClassification, hf_model(Data2VecTextForSequenceClassification, num_labels=3),
              tmp_path, ("loss", "logits"), input_ids=ids, attention_mask=mask, labels=torch.tensor([1, 2, 0]))


def test_multiple_choice(tmp_path):
    ids, mask, types = padded_batch(rows=6, lengths=(9, 6, 3, 8, 9, 5))
    fold = lambda t: t.view(2, 3, -1)  # noqa: E731
    ours = roundtrip(Data2VecTextForMultipleChoice, hf_model(Data2VecTextForMultipleChoice), tmp_path,
                     ("loss", "logits"), input_ids=fold(ids), attention_mask=fold(mask), token_type_ids=fold(types),
                     labels=torch.tensor([2, 0]))
    assert ours.model.encoder.pooler is not None


def test_token_classification(tmp_path):
    ids, mask, types = padded_batch()
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    labels = torch.randint(0, len(tags), ids.shape, generator=torch.Generator().manual_seed(4))
    labels[mask == 0] = -100
    theirs = hf_model(Data2VecTextForTokenClassification, num_labels=len(tags),
                      id2label=dict(enumerate(tags)), label2id={t: i for i, t in enumerate(tags)})
    ours = roundtrip(Data2VecTextForTokenClassification, theirs, tmp_path, ("loss", "logits"),
                     input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    assert ours.model.head.names == tags


def test_question_answering(tmp_path):
    ids, mask, types = padded_batch()
    # the last start is beyond the sequence: HF clamps it to the ignored index
    roundtrip(Data2VecTextForQuestionAnswering, hf_model(Data2VecTextForQuestionAnswering), tmp_path,
              ("loss", "start_logits", "end_logits"), input_ids=ids, attention_mask=mask, token_type_ids=types,
              start_positions=torch.tensor([1, 0, 30]), end_positions=torch.tensor([3, 4, 2]))


# --------------------------------------------------------------------------- convert and errors


def test_convert_round_trip_with_tokenizer_files(tmp_path):
    theirs = hf_model(Data2VecTextForSequenceClassification, num_labels=2)
    theirs.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "vocab.json").write_text(json.dumps({"<s>": 0, "<pad>": 1}), encoding="utf-8")
    (tmp_path / "hf" / "merges.txt").write_text("#version: 0.2\nĠ t\n", encoding="utf-8")
    (tmp_path / "hf" / "spm.model").write_bytes(b"\x00\xffbinary")
    convert(tmp_path / "hf", tmp_path / "d2v", to="d2v")
    assert (tmp_path / "d2v" / "spec.yaml").is_file() and (tmp_path / "d2v" / "spm.model").is_file()
    convert(tmp_path / "d2v", tmp_path / "back", to="hf")
    for name in ("vocab.json", "merges.txt", "spm.model"):
        assert (tmp_path / "back" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes()
    back = Data2VecTextForSequenceClassification.from_pretrained(tmp_path / "back").eval()
    ids, mask, _ = padded_batch()
    compare(run(back, input_ids=ids, attention_mask=mask), run(theirs, input_ids=ids, attention_mask=mask), ("logits",))


def test_convert_round_trip_of_the_bare_model(tmp_path):
    """A converted bare model (no head, no objective) converts back, as Data2VecTextModel."""
    theirs = hf_model(Data2VecTextModel)
    theirs.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "d2v", to="d2v")
    assert "Data2VecTextModel" in convert(tmp_path / "d2v", tmp_path / "back", to="hf")
    back = Data2VecTextModel.from_pretrained(tmp_path / "back").eval()
    ids, mask, _ = padded_batch()
    compare(run(back, input_ids=ids, attention_mask=mask), run(theirs, input_ids=ids, attention_mask=mask),
            ("last_hidden_state", "pooler_output"))


def test_strict_load_names_the_problem(tmp_path):
    theirs = hf_model(Data2VecTextForMaskedLM)
    theirs.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpecError, match="missing from the checkpoint.*encoder.layers.2"):
        d2v.from_pretrained(tmp_path / "hf")


def test_all_seven_converters_are_registered():
    names = set(registry().names("hf_converter"))
    assert {"Data2VecTextModel", "Data2VecTextForCausalLM", "Data2VecTextForMaskedLM",
            "Data2VecTextForSequenceClassification", "Data2VecTextForMultipleChoice",
            "Data2VecTextForTokenClassification", "Data2VecTextForQuestionAnswering"} <= names


def test_report_max_diff():
    """Prints the largest difference per field (run with -s to see it)."""
    MAX_DIFF.report("text parity")
