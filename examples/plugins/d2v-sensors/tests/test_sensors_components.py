"""The feature extractor and processor: shapes, padding masks at both rates, normalisation, crops."""

import numpy as np
import pytest
import torch

from d2v.api.errors import SpecError
from d2v_sensors.feature_extractor import SensorPatchEmbedding
from d2v_sensors.processor import SensorProcessor, normalize


def _example(n, channels=3, label=0, seed=0):
    signal = np.random.default_rng(seed).normal(2.0, 3.0, (n, channels)).astype(np.float32)
    return {"id": f"r{n}", "signal": signal, "label": label}


def test_collate_pads_and_masks():
    proc = SensorProcessor(channels=3)
    batch = proc.collate([proc.load(_example(n, label=i), train=False) for i, n in enumerate((37, 50, 20))])
    assert batch["inputs"].shape == (3, 50, 3)
    assert batch["lengths"].tolist() == [37, 50, 20]
    assert batch["padding_mask"].sum(1).tolist() == [13, 0, 30]
    assert batch["padding_mask"][0, 36].item() is False and batch["padding_mask"][0, 37].item() is True
    assert torch.all(batch["inputs"][batch["padding_mask"]] == 0)
    assert batch["labels"].tolist() == [0, 1, 2]


def test_normalisation_modes():
    x = np.stack([np.linspace(0, 1, 100), 10 + 4 * np.sin(np.arange(100.0))], axis=1)
    rec = normalize(x, "recording")
    assert np.allclose(rec.mean(0), 0, atol=1e-5) and rec.std() == pytest.approx(1.0, abs=1e-4)
    assert rec[:, 1].std() / rec[:, 0].std() == pytest.approx(x[:, 1].std() / x[:, 0].std(), rel=1e-4)
    chan = normalize(x, "channel")
    assert np.allclose(chan.std(0), 1.0, atol=1e-4)
    assert np.array_equal(normalize(x, "none"), x.astype(np.float32))


def test_training_crop_is_seeded_and_evaluation_is_whole():
    proc = SensorProcessor(max_samples=40, normalize="none")
    ex = _example(100)
    a = proc.load(ex, train=True, rng=np.random.default_rng(5))["signal"]
    b = proc.load(ex, train=True, rng=np.random.default_rng(5))["signal"]
    assert a.shape == (40, 3) and torch.equal(a, b)
    start = int(np.flatnonzero(np.all(ex["signal"] == a[0].numpy(), axis=1))[0])
    assert torch.equal(a, torch.from_numpy(ex["signal"][start:start + 40]))
    assert proc.load(ex, train=False)["signal"].shape == (100, 3)
    assert proc.clip_length(100, train=True) == 40 and proc.clip_length(100, train=False) == 100


def test_processor_rejects_wrong_channels_and_bad_settings():
    with pytest.raises(SpecError, match=r"expects \(time, 3\).*channels"):
        SensorProcessor(channels=3).load(_example(30, channels=6), train=False)
    with pytest.raises(SpecError, match="normalize must be one of"):
        SensorProcessor(normalize="zscore")
    with pytest.raises(SpecError, match="min_samples"):
        SensorProcessor(min_samples=50, max_samples=10)


def test_patch_embedding_shapes_and_patch_rate_mask():
    torch.manual_seed(0)
    fe = SensorPatchEmbedding(channels=3, patch_size=10, conv_dim=16, dim=24)
    proc = SensorProcessor()
    batch = proc.collate([proc.load(_example(n), train=False) for n in (95, 60, 7)])
    out = fe(batch["inputs"], batch["padding_mask"])
    assert out.features.shape == (3, 9, 24) and out.extract_features.shape == (3, 9, 16)
    # 95 samples -> 9 whole patches, 60 -> 6, 7 (shorter than a patch) keeps its first
    assert (~out.padding_mask).sum(1).tolist() == [9, 6, 1]
    assert fe.frame_lengths_fn()(torch.tensor([95, 60, 10, 9])).tolist() == [9, 6, 1, 0]
    # a recording's valid patches do not depend on what it is batched with
    alone = fe(batch["inputs"][1:2, :60], batch["padding_mask"][1:2, :60]).features
    assert torch.allclose(alone[0], out.features[1, :6], atol=1e-6)


def test_patch_embedding_rejects_wrong_layout():
    fe = SensorPatchEmbedding(channels=3, patch_size=10, conv_dim=8, dim=8)
    with pytest.raises(SpecError, match=r"\(batch, time, 3 channels\)"):
        fe(torch.zeros(2, 3, 100))
    with pytest.raises(SpecError, match="shorter than one patch"):
        fe(torch.zeros(2, 5, 3))
