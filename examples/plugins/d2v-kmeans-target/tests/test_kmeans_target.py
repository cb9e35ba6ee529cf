"""The k-means target's arithmetic on crafted tensors: distances, the codebook's initialisation,
EMA update and restarts, what ``build`` feeds the codebook, and the cross-entropy loss."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from d2v.api.errors import SpecError
from d2v import EncoderOutput

if importlib.util.find_spec("d2v_kmeans_target") is None:  # not pip-installed: test the checkout's copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from d2v_kmeans_target.kmeans import OnlineKMeans, squared_distances
from d2v_kmeans_target.target import KMeansTarget

CENTRES = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0]])


def blobs(per_blob: int = 50, noise: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three well separated blobs around ``CENTRES`` and each point's blob."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(per_blob)
    return CENTRES[labels] + noise * torch.randn(len(labels), 3, generator=g), labels


def teacher(layers: list[torch.Tensor], padding_mask: torch.Tensor | None = None) -> EncoderOutput:
    return EncoderOutput(last_hidden_state=layers[-1], layer_targets=tuple(layers), padding_mask=padding_mask)


def test_squared_distances_match_cdist():
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(7, 5, generator=g), torch.randn(4, 5, generator=g)
    torch.testing.assert_close(squared_distances(x, c), torch.cdist(x, c) ** 2, atol=1e-5, rtol=1e-5)


def test_initialisation_finds_the_blobs_and_is_seeded():
    x, labels = blobs()
    codebook = OnlineKMeans(3, 3, seed=0)
    codebook.initialize(x)
    assert bool(codebook.ready)
    # every blob gets its own centroid, at the blob's mean
    ids = codebook.assign(x)
    for blob in range(3):
        assert ids[labels == blob].unique().numel() == 1
        torch.testing.assert_close(codebook.centroids[ids[labels == blob][0]], x[labels == blob].mean(0))
    assert ids.unique().numel() == 3
    torch.testing.assert_close(codebook.usage, torch.full((3,), 1 / 3))
    again = OnlineKMeans(3, 3, seed=0)
    again.initialize(x)
    assert torch.equal(again.centroids, codebook.centroids)


def test_update_moves_each_centroid_a_fraction_towards_its_batch_mean():
    codebook = OnlineKMeans(2, 2, decay=0.9, restart_below=0.0)
    codebook.centroids.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    codebook.usage.fill_(0.5)
    codebook.ready.fill_(True)
    x = torch.tensor([[1.0, 0.0], [1.0, 2.0], [9.0, 9.0]])  # means (1, 1) and (9, 9)
    ids = codebook.update(x)
    assert ids.tolist() == [0, 0, 1]
    torch.testing.assert_close(codebook.centroids, torch.tensor([[0.1, 0.1], [9.9, 9.9]]))
    # usage: EMA of the share won in the batch
    torch.testing.assert_close(codebook.usage, 0.9 * torch.tensor([0.5, 0.5]) + 0.1 * torch.tensor([2 / 3, 1 / 3]))


def test_a_dead_centroid_restarts_at_the_worst_served_vector():
    codebook = OnlineKMeans(3, 2, decay=0.5, restart_below=0.5)  # dead below usage 1/6
    codebook.centroids.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [100.0, 100.0]]))
    codebook.usage.copy_(torch.tensor([0.5, 0.5, 0.0]))
    codebook.ready.fill_(True)
    x = torch.tensor([[0.1, 0.0], [0.0, 0.1], [1.0, 1.1], [5.0, -3.0]])
    codebook.update(x)
    # centroid 2 won nothing: it restarts at (5, -3), farthest from its own centroid
    torch.testing.assert_close(codebook.centroids[2], torch.tensor([5.0, -3.0]))
    assert float(codebook.usage[2]) == pytest.approx(1 / 3)


def test_build_initialises_then_updates_only_in_training_and_ignores_padding():
    x, _ = blobs(per_blob=4)  # 12 vectors: B=2, T=6 (with the blob order, each row holds two blobs)
    layer = x.view(2, 6, 3)
    target = KMeansTarget(clusters=3, top_k=1, layer_norm=None, centroid_decay=0.5, restart_below=0.0, dim=3)
    y = target.build(teacher([layer]))
    torch.testing.assert_close(y, layer)  # the features themselves: data2vec's top-1, unnormalised
    first = target.codebook.centroids.clone()
    assert sorted(torch.cdist(first, CENTRES).argmin(1).tolist()) == [0, 1, 2]

    target.eval()
    target.build(teacher([layer + 1.0]))
    assert torch.equal(target.codebook.centroids, first)  # evaluation never moves the codebook

    target.train()
    padded = layer.clone()
    padded[1, 3:] = 1e6  # padded frames: never seen by the codebook
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 3:] = True
    target.build(teacher([padded + 1.0], pad))
    moved = target.codebook.centroids
    assert float(moved.abs().max()) < 10
    assert not torch.equal(moved, first)


def test_forward_returns_the_teacher_features_at_the_masked_positions():
    g = torch.Generator().manual_seed(3)
    layers = [torch.randn(2, 5, 4, generator=g) for _ in range(3)]
    mask = torch.tensor([[True, False, True, False, False], [False, False, False, True, True]])
    target = KMeansTarget(clusters=2, top_k=2, layer_norm="layer", dim=4)
    expected = (F.layer_norm(layers[1], (4,)) + F.layer_norm(layers[2], (4,))) / 2
    torch.testing.assert_close(target(teacher(layers), mask), expected[mask])


def test_loss_is_summed_cross_entropy_against_the_nearest_centroid():
    target = KMeansTarget(clusters=3, dim=3)
    target.codebook.centroids.copy_(CENTRES)
    target.codebook.ready.fill_(True)
    with torch.no_grad():
        target.classifier.weight.copy_(torch.eye(3))
        target.classifier.bias.zero_()
    features = torch.tensor([[3.0, 0.5, 0.0], [0.0, 0.2, 5.0], [0.1, 3.5, 0.3], [4.0, 0.0, 1.0]])
    prediction = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 3.0]])
    ids = torch.tensor([0, 2, 1, 0])
    assert torch.equal(target.cluster_ids(features), ids)
    value, stats = target.loss(prediction, features)
    expected = sum(math.log(prediction[n].exp().sum()) - float(prediction[n, ids[n]]) for n in range(4))
    assert float(value.detach()) == pytest.approx(expected, rel=1e-6)
    assert float(stats["accuracy"]) == pytest.approx(1 / 4)  # only row 0 is right (rows 2's scores tie at 0)
    assert float(stats["perplexity"]) == pytest.approx(math.exp(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))))
    assert target.reduction == "sum"  # the objective divides by the number of masked positions
    value.backward()
    assert target.classifier.weight.grad is not None


def test_the_width_comes_from_the_decoder_request_or_the_spec():
    target = KMeansTarget(clusters=4, top_k=1)
    with pytest.raises(SpecError, match="set model.objective.target.dim"):
        target.build(teacher([torch.zeros(1, 3, 8)]))
    decoder = target.make_decoder("1d", 16, dim=16, kernel=3, layers=1, groups=1)
    assert target.codebook.centroids.shape == (4, 16) and target.classifier.out_features == 4
    assert decoder(torch.zeros(2, 5, 16)).shape == (2, 5, 16)
    with pytest.raises(SpecError, match="encoder is 32 wide"):
        KMeansTarget(clusters=4, dim=16).make_decoder("1d", 32, dim=32, kernel=3, layers=1, groups=1)
    with pytest.raises(SpecError, match="clusters must be >= 2"):
        KMeansTarget(clusters=1)
