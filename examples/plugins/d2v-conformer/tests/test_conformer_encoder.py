"""The Conformer encoder honours the Encoder contract data2vec and the heads rely on."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from d2v.api import plugins
from d2v.spec.config import load_spec
from d2v.api.errors import SpecError
from d2v.ssl.masking import keep_indices
from d2v.spec.model import build_model
from d2v_conformer.encoder import ConformerEncoder

PACKAGE = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**overrides) -> ConformerEncoder:
    """Deterministic: no dropout, no SpecAugment (the contract tests compare exact values)."""
    torch.manual_seed(0)
    settings = dict(dim=32, layers=3, heads=4, ffn_dim=48, conv_kernel=7, dropout=0.0, input_dropout=0.0,
                    mask_time_prob=0.0)
    return ConformerEncoder(**{**settings, **overrides})


def padding(lengths, total) -> torch.Tensor:
    return torch.arange(total)[None, :] >= torch.tensor(lengths)[:, None]


def at(positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, T, D)`` at ``positions`` ``(B, K)``."""
    return x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))


def test_discovered_through_its_entry_point():
    component = plugins.registry().get("encoder", "conformer")
    assert component.resolve() is ConformerEncoder
    assert component.plugin == "conformer" and plugins.distributions["conformer"] == "d2v-conformer"


@pytest.mark.parametrize("use_group_norm", [False, True], ids=["batchnorm", "groupnorm"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_unpadded_output_equals_torchaudios_conformer(use_group_norm, training):
    encoder = tiny(use_group_norm=use_group_norm).train(training)
    reference = copy.deepcopy(encoder.conformer).train(training)
    x = torch.randn(3, 20, 32)
    ours = encoder(x).last_hidden_state
    theirs, _ = reference(x, torch.full((3,), 20))
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_embed_and_contextualize_shapes_mask_embedding_and_per_layer_outputs():
    encoder = tiny().eval()
    x = torch.randn(2, 11, 32)
    mask = torch.zeros(2, 11, dtype=torch.bool)
    mask[0, 2:5] = True
    embedded = encoder.embed(x, None, mask)
    assert embedded.shape == (2, 11, 32)
    assert torch.equal(embedded[0, 2:5], encoder.mask_embedding.expand(3, -1))
    assert torch.equal(embedded[~mask], x[~mask])

    out = encoder.contextualize(embedded, output_hidden_states=True, output_layer_targets=True)
    assert out.last_hidden_state.shape == (2, 11, 32)
    assert len(out.hidden_states) == encoder.num_layers + 1 == 4
    assert torch.equal(out.hidden_states[0], embedded) and torch.equal(out.hidden_states[-1], out.last_hidden_state)
    assert len(out.layer_targets) == 3 and all(t.shape == (2, 11, 32) for t in out.layer_targets)
    # "ffn": the second half-step FFN before its residual -- not the layer output
    assert not torch.allclose(out.layer_targets[-1], out.last_hidden_state)
    ends = encoder.contextualize(embedded, output_layer_targets=True, target_feature="end").layer_targets
    for end, hidden in zip(ends, out.hidden_states[1:]):
        torch.testing.assert_close(end, hidden)
    with pytest.raises(SpecError, match="target_feature 'middle'"):
        encoder.contextualize(embedded, target_feature="middle")


@pytest.mark.parametrize("use_group_norm", [False, True], ids=["batchnorm", "groupnorm"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_more_padding_leaves_valid_outputs_unchanged(use_group_norm, training):
    encoder = tiny(use_group_norm=use_group_norm).train(training)
    lengths = [20, 14, 9]
    x = torch.randn(3, 20, 32)
    longer = torch.cat([x, 5 * torch.randn(3, 9, 32)], dim=1)  # loud junk in the extra padding
    short = encoder(x, padding(lengths, 20)).last_hidden_state
    long = encoder(longer, padding(lengths, 29)).last_hidden_state
    valid = ~padding(lengths, 20)
    torch.testing.assert_close(long[:, :20][valid], short[valid], atol=2e-5, rtol=0)


def test_an_utterance_is_encoded_the_same_alone_or_in_a_padded_batch():
    encoder = tiny(use_group_norm=True).train()  # per-example statistics: holds in training too
    x = torch.randn(2, 16, 32)
    x[1, 10:] = 3.0
    batched = encoder(x, padding([16, 10], 16)).last_hidden_state
    alone = encoder(x[1:, :10]).last_hidden_state
    torch.testing.assert_close(batched[1, :10], alone[0], atol=2e-5, rtol=0)


@pytest.mark.parametrize("use_group_norm", [False, True], ids=["batchnorm", "groupnorm"])
def test_kept_tokens_at_their_positions_equal_the_full_sequence_with_the_rest_as_padding(use_group_norm):
    """data2vec 2.0's student path: dropping tokens == padding them, because the convolutions run
    on the time grid ``position_ids`` give. Without the positions they would see kept tokens as
    neighbours that were not, and the outputs differ."""
    encoder = tiny(use_group_norm=use_group_norm).train()
    x = torch.randn(2, 24, 32)
    dropped = torch.zeros(2, 24, dtype=torch.bool)
    dropped[0, 3:9], dropped[0, 15:18], dropped[1, 0:4], dropped[1, 10:15] = True, True, True, True
    ids_keep, _ = keep_indices(dropped)
    embedded = encoder.embed(x, None, torch.zeros_like(dropped))
    kept = at(ids_keep, embedded)
    kept_out = encoder.contextualize(kept, position_ids=ids_keep, output_layer_targets=True)
    full_out = encoder.contextualize(embedded, dropped, output_layer_targets=True)
    torch.testing.assert_close(kept_out.last_hidden_state, at(ids_keep, full_out.last_hidden_state), atol=2e-5, rtol=0)
    for ours, full in zip(kept_out.layer_targets, full_out.layer_targets):
        torch.testing.assert_close(ours, at(ids_keep, full), atol=2e-5, rtol=0)
    compacted = encoder.contextualize(kept).last_hidden_state
    assert (compacted - kept_out.last_hidden_state).abs().max() > 1e-2


def test_data2vec2_student_through_the_objective_equals_the_padded_full_sequence():
    """The objective's own kept-token path (``Data2Vec2.encode_kept``) with the demo spec's model."""
    spec = load_spec(PACKAGE / "experiments" / "pretrain2_conformer_demo.yaml")
    torch.manual_seed(0)
    model = build_model(spec["model"], plugins.registry(), "pretrain").eval()
    waves = torch.randn(2, 24000)
    pad = padding([24000, 17000], 24000)
    with torch.no_grad():
        fe = model.feature_extractor(waves, pad)
        B, T, _ = fe.features.shape
        mask = model._masks({}, B, T, fe.padding_mask, fe.features.device)
        M = model.clone_batch
        feats, rows_pad = fe.features.repeat_interleave(M, 0), fe.padding_mask.repeat_interleave(M, 0)
        hidden, ids_keep, _ = model.encode_kept(feats, rows_pad, mask)
        embedded = model.encoder.embed(feats.masked_fill(mask[..., None], 0.0), rows_pad, torch.zeros_like(mask))
        full = model.encoder.contextualize(embedded, rows_pad | mask).last_hidden_state
    expected = at(ids_keep, full)
    valid = ~rows_pad.gather(1, ids_keep)
    torch.testing.assert_close(hidden[valid], expected[valid], atol=2e-5, rtol=0)


def test_bad_shapes_are_spec_errors():
    with pytest.raises(SpecError, match="conv_kernel must be odd"):
        ConformerEncoder(dim=32, heads=4, conv_kernel=8)
    with pytest.raises(SpecError, match="not divisible by heads"):
        ConformerEncoder(dim=30, heads=4)
    with pytest.raises(SpecError, match="position_ids cover 2 tokens but the encoder got 3"):
        tiny().contextualize(torch.randn(1, 3, 32), position_ids=torch.tensor([[0, 2]]))
