"""d2v-native behaviour of the text backbone (``text.embeddings`` + ``text.transformer``): the mask
contract, data2vec layer targets, running on a subset of tokens (data2vec 2.0), the key/value
cache, presets and RoBERTa positions. Parity with Hugging Face is in tests/parity/test_text_parity.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d2v.api.errors import SpecError
from d2v.spec.model import build_model
from d2v.api.plugins import registry
from d2v_text.cache import KeyValueCache
from d2v_text.encoder import TextTransformerEncoder
from d2v_text.feature_extractor import TextEmbeddings, position_ids_from_input_ids

pytestmark = pytest.mark.usefixtures("single_thread")

PAD = 1


def backbone(seed: int = 0, **encoder):
    torch.manual_seed(seed)
    embeddings = TextEmbeddings(dim=32, vocab_size=50, max_position_embeddings=40, type_vocab_size=2)
    settings_ = dict(dim=32, layers=3, heads=4, ffn_dim=48, **encoder)
    return embeddings.eval(), TextTransformerEncoder(**settings_).eval()


def batch(rows: int = 2, length: int = 8, lengths=(8, 5), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 50, (rows, length), generator=g)
    padding = torch.arange(length)[None, :] >= torch.tensor(lengths)[:, None]
    return ids.masked_fill(padding, PAD), padding


# --------------------------------------------------------------------------- mask contract


def test_embed_rejects_a_token_mask_and_accepts_none_or_all_false():
    embeddings, encoder = backbone()
    ids, padding = batch()
    x = embeddings(ids, padding).features
    assert torch.equal(encoder.embed(x, padding, None), x)
    assert torch.equal(encoder.embed(x, padding, torch.zeros_like(padding)), x)
    mask = torch.zeros_like(padding)
    mask[0, 2] = True
    with pytest.raises(SpecError, match="no mask embedding.*masking: \\{name: bert"):
        encoder.embed(x, padding, mask)


# --------------------------------------------------------------------------- layer targets


def test_layer_targets_ffn_and_end():
    embeddings, encoder = backbone()
    ids, padding = batch()
    x = embeddings(ids, padding).features
    with torch.no_grad():
        ffn = encoder(x, padding, output_layer_targets=True, output_hidden_states=True)
        end = encoder(x, padding, output_layer_targets=True, target_feature="end")
    assert len(ffn.layer_targets) == encoder.num_layers == 3
    for i, target in enumerate(end.layer_targets):
        assert torch.equal(target, ffn.hidden_states[i + 1])
    # the FFN output is what the block adds to its attention output before the final LayerNorm
    for i, layer in enumerate(encoder.layers):
        h = ffn.hidden_states[i]
        with torch.no_grad():
            attended = layer.attention_norm(h + layer.self_attention(h, ~padding[:, None, None, :]))
            expected = layer.ffn(attended)
            rebuilt = layer.ffn_norm(attended + ffn.layer_targets[i])
        torch.testing.assert_close(ffn.layer_targets[i], expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(rebuilt, ffn.hidden_states[i + 1], atol=1e-6, rtol=0)
    with pytest.raises(SpecError, match="unknown target_feature"):
        encoder(x, padding, output_layer_targets=True, target_feature="attn")


# --------------------------------------------------------------------------- subsets (data2vec 2.0)


def test_contextualize_on_all_tokens_equals_the_full_run():
    embeddings, encoder = backbone()
    ids, padding = batch()
    x = embeddings(ids, padding).features
    with torch.no_grad():
        full = encoder(x, padding, mask=torch.zeros_like(padding))
        kept = encoder.contextualize(encoder.embed(x, padding, torch.zeros_like(padding)), padding,
                                     position_ids=torch.arange(8).expand(2, -1))
    assert torch.equal(full.last_hidden_state, kept.last_hidden_state)


def test_contextualize_on_a_subset_equals_dropping_the_rest_as_padding():
    """Positions are in the embeddings, so running the layers on the kept tokens only equals the
    full sequence with the dropped tokens treated as padding (data2vec 2.0's student)."""
    embeddings, encoder = backbone()
    ids, padding = batch(lengths=(8, 8))
    x = embeddings(ids, padding).features
    keep = torch.tensor([[0, 2, 3, 6], [1, 4, 5, 7]])
    subset = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))
    dropped = torch.ones_like(padding)
    dropped.scatter_(1, keep, False)
    with torch.no_grad():
        small = encoder.contextualize(subset, torch.zeros(2, 4, dtype=torch.bool), position_ids=keep)
        large = encoder.contextualize(x, dropped)
    expected = torch.gather(large.last_hidden_state, 1, keep[..., None].expand(-1, -1, x.shape[-1]))
    torch.testing.assert_close(small.last_hidden_state, expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- decoder and cache


def test_cache_decoding_equals_a_full_causal_run():
    embeddings, encoder = backbone(is_decoder=True)
    ids, _ = batch(lengths=(8, 8))
    with torch.no_grad():
        full = encoder(embeddings(ids).features).last_hidden_state
        out = encoder(embeddings(ids[:, :3]).features, use_cache=True)
        cache = out.past_key_values
        assert isinstance(cache, KeyValueCache) and cache.get_seq_length() == 3
        steps = [out.last_hidden_state]
        for t in range(3, 8):
            features = embeddings(ids[:, t:t + 1], past_key_values=cache).features
            out = encoder(features, past_key_values=cache, use_cache=True)
            steps.append(out.last_hidden_state)
    assert cache.get_seq_length() == 8
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


def test_causal_mask_hides_the_future():
    embeddings, encoder = backbone(is_decoder=True)
    ids, _ = batch(lengths=(8, 8))
    changed = ids.clone()
    changed[:, 5:] = 7
    with torch.no_grad():
        a = encoder(embeddings(ids).features, use_cache=False).last_hidden_state
        b = encoder(embeddings(changed).features, use_cache=False).last_hidden_state
    assert torch.equal(a[:, :5], b[:, :5]) and not torch.allclose(a[:, 5:], b[:, 5:])


def test_cache_only_for_decoders_and_reorder():
    embeddings, encoder = backbone()
    ids, padding = batch()
    assert encoder(embeddings(ids, padding).features, padding, use_cache=True).past_key_values is None
    embeddings, decoder = backbone(is_decoder=True)
    cache = decoder(embeddings(ids, padding).features, padding).past_key_values  # use_cache defaults on (HF)
    keys = cache.self_attention[0][0]
    cache.reorder(torch.tensor([1]))
    assert torch.equal(cache.self_attention[0][0], keys[1:]) and "seq_length=8" in repr(cache)


def test_decoder_errors_are_actionable():
    embeddings, decoder = backbone(is_decoder=True)
    ids, padding = batch()
    x = embeddings(ids, padding).features
    cache = decoder(x, padding).past_key_values
    step = embeddings(ids[:, :1], past_key_values=cache).features
    with pytest.raises(SpecError, match="padding_mask covers 2 tokens but attention sees 9"):
        decoder(step, padding[:, :2], past_key_values=cache)
    with pytest.raises(SpecError, match="KeyValueCache"):
        decoder(x, padding, past_key_values=((x, x),))
    with pytest.raises(SpecError, match="no cross-attention"):
        decoder(x, padding, encoder_hidden_states=x)
    with pytest.raises(SpecError, match="add_cross_attention needs is_decoder"):
        TextTransformerEncoder(dim=32, layers=1, heads=4, ffn_dim=48, add_cross_attention=True)


# --------------------------------------------------------------------------- embeddings and presets


rectangles = st.integers(1, 12).flatmap(
    lambda length: st.lists(st.lists(st.booleans(), min_size=length, max_size=length), min_size=1, max_size=4))


@settings(max_examples=50, deadline=None)
@given(rows=rectangles, past=st.integers(0, 5), padding_idx=st.integers(0, 3))
def test_position_ids_count_real_tokens_only(rows, past, padding_idx):
    real = torch.tensor(rows)
    ids = torch.where(real, torch.tensor(padding_idx + 7), torch.tensor(padding_idx))
    positions = position_ids_from_input_ids(ids, padding_idx, past)
    for b, row in enumerate(rows):
        seen = 0
        for t, is_real in enumerate(row):
            seen += is_real
            assert positions[b, t] == (padding_idx + past + seen if is_real else padding_idx)


def test_embeddings_init_and_limits():
    embeddings = TextEmbeddings(dim=16, vocab_size=30, max_position_embeddings=8)
    assert embeddings.word_embeddings.weight[PAD].abs().sum() == 0
    assert embeddings.position_embeddings.weight[PAD].abs().sum() == 0
    assert embeddings.input_embeddings() is embeddings.word_embeddings
    with pytest.raises(SpecError, match="beyond max_position_embeddings 8 \\(at most 6 tokens\\)"):
        embeddings(torch.full((1, 7), 5))
    with pytest.raises(SpecError, match="token ids"):
        embeddings(torch.randn(1, 7))


def test_tiny_preset_with_a_head_and_vocab_override():
    model = build_model({"preset": "data2vec-text-tiny", "head": {"name": "masked_lm"}}, registry(), "finetune")
    assert model.feature_extractor.vocab_size == 1500 == model.head.vocab_size
    assert model.head.decoder.weight is model.feature_extractor.word_embeddings.weight
    model = build_model({"preset": "data2vec-text-tiny", "feature_extractor": {"vocab_size": 321},
                         "head": {"name": "causal_lm"}}, registry(), "finetune")
    assert model.head.vocab_size == 321


@pytest.mark.parametrize("preset, layers, dim, heads, ffn", [("data2vec-text-base", 12, 768, 12, 3072),
                                                             ("data2vec-text-large", 24, 1024, 16, 4096)])
def test_base_and_large_presets_have_roberta_shapes(preset, layers, dim, heads, ffn):
    transformers = pytest.importorskip("transformers")
    spec = registry().get("model", preset).build()
    assert spec["feature_extractor"]["vocab_size"] == 50265 and spec["feature_extractor"]["max_position_embeddings"] == 514
    with torch.device("meta"):  # shapes only, no memory or init time
        encoder = registry().get("encoder", "text.transformer").build(**{k: v for k, v in spec["encoder"].items()
                                                                        if k != "name"}, add_pooling_layer=True)
        embeddings = registry().get("feature_extractor", "text.embeddings").build(
            **{k: v for k, v in spec["feature_extractor"].items() if k != "name"}, dim=encoder.dim)
        config = transformers.Data2VecTextConfig(vocab_size=50265, hidden_size=dim, num_hidden_layers=layers,
                                                 num_attention_heads=heads, intermediate_size=ffn,
                                                 max_position_embeddings=514, type_vocab_size=1)
        reference = transformers.Data2VecTextModel(config)
    ours = sum(p.numel() for p in encoder.parameters()) + sum(p.numel() for p in embeddings.parameters())
    assert ours == sum(p.numel() for p in reference.parameters())


def test_a_tiny_classifier_learns():
    """The backbone trains end to end: label = does token 7 occur; 60 Adam steps on 32 padded rows."""
    torch.manual_seed(0)
    spec = {"preset": "data2vec-text-tiny", "feature_extractor": {"vocab_size": 20},
            "encoder": {"layers": 1, "dropout": 0.0, "attention_dropout": 0.0},
            "head": {"name": "text_classification", "num_labels": 2, "classifier_dropout": 0.0}}
    model = build_model(spec, registry(), "finetune").train()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(8, 20, (32, 10), generator=g)
    labels = torch.arange(32) % 2
    ids[labels == 1, torch.randint(1, 6, (16,), generator=g)] = 7
    padding = torch.arange(10)[None, :] >= torch.randint(6, 11, (32, 1), generator=g)
    ids[:, 0] = 0
    batch = {"inputs": ids.masked_fill(padding, PAD), "padding_mask": padding, "labels": labels}
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = model(batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        accuracy = (model(batch).logits.argmax(-1) == labels).float().mean().item()
    print(f"tiny classifier: loss {losses[0]:.3f} -> {losses[-1]:.4f}, accuracy {accuracy:.2f}")
    assert losses[-1] < 0.2 * losses[0] and accuracy == 1.0, (losses[0], losses[-1], accuracy)
