"""AudioProcessor.collate: padding, masks and ordering for any list of waveform lengths."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d2v_audio.processor import AudioProcessor, normalize_waveform

PROC = AudioProcessor()


def loaded(lengths: list[int], seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"id": f"utt{i}", "path": f"/x/{i}.flac", "num_samples": n, "text": f"TEXT {i}",
         "waveform": torch.randn(n, generator=g) + 0.5}
        for i, n in enumerate(lengths)
    ]


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=9),
       seed=st.integers(min_value=0, max_value=2**31 - 1))
def test_collate_pads_to_longest(lengths, seed):
    examples = loaded(lengths, seed)
    batch = PROC.collate(examples)
    longest = max(lengths)
    assert batch["inputs"].shape == (len(lengths), longest) and batch["inputs"].dtype == torch.float32
    assert batch["padding_mask"].shape == (len(lengths), longest) and batch["padding_mask"].dtype == torch.bool
    assert batch["lengths"].dtype == torch.long and batch["lengths"].tolist() == lengths
    assert batch["padding_mask"].sum(dim=1).tolist() == [longest - n for n in lengths]
    assert torch.all(batch["inputs"][batch["padding_mask"]] == 0)
    for row, (n, ex) in enumerate(zip(lengths, examples)):
        assert not batch["padding_mask"][row, :n].any()
        assert torch.equal(batch["inputs"][row, :n], ex["waveform"])
    assert batch["ids"] == [f"utt{i}" for i in range(len(lengths))]
    assert batch["text"] == [f"TEXT {i}" for i in range(len(lengths))]


@settings(max_examples=50, deadline=None)
@given(n=st.integers(min_value=2, max_value=2000), scale=st.floats(min_value=1e-3, max_value=10.0),
       seed=st.integers(min_value=0, max_value=2**31 - 1))
def test_normalisation_is_zero_mean_unit_variance(n, scale, seed):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale + 3 * scale
    y = normalize_waveform(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert abs(float(y.double().mean())) < 1e-5
    var = float(x.double().var(unbiased=False))
    expected_std = (var / (var + 1e-7)) ** 0.5
    assert abs(float(y.double().std(unbiased=False)) - expected_std) < 1e-4
