"""Datasets: the synthetic corpus is a pure function of (seed, split, index); the folder reader
gives back what `d2v sensors synth` wrote; bad files are named (or skipped)."""

import argparse

import numpy as np
import pytest

from d2v.api.errors import SpecError
from d2v_sensors.cli import add_commands
from d2v_sensors.datasets import SensorFolder, SyntheticActivities
from d2v_sensors.recordings import read_recording
from d2v_sensors.signals import ACTIVITIES


def test_synthetic_corpus_is_deterministic_and_balanced():
    a, b = SyntheticActivities(split="train", num_examples=24), SyntheticActivities(split="train", num_examples=24)
    assert a.lengths == b.lengths and all(200 <= n <= 400 for n in a.lengths)
    for i in (0, 7, 23):
        assert np.array_equal(a[i]["signal"], b[i]["signal"]) and a[i]["signal"].shape == (a.lengths[i], 3)
    assert [a[i]["label"] for i in range(24)] == [i % 6 for i in range(24)]
    # a longer corpus starts with the same recordings; another split or seed shares none
    assert np.array_equal(SyntheticActivities(split="train", num_examples=100)[5]["signal"], a[5]["signal"])
    for other in (SyntheticActivities(split="valid", num_examples=24), SyntheticActivities(split="train", num_examples=24, seed=1)):
        assert not any(other.lengths[i] == a.lengths[i] and np.array_equal(other[i]["signal"], a[i]["signal"])
                       for i in range(24))


def test_synthetic_classes_differ_in_frequency_content():
    """The activities are told apart by their spectra, averaged over nuisance variation."""
    corpus = SyntheticActivities(split="train", num_examples=120, min_seconds=8, max_seconds=8)
    spectra = np.zeros((6, 201))
    for i in range(len(corpus)):
        ex = corpus[i]
        x = ex["signal"] - ex["signal"].mean(0)
        spectra[ex["label"]] += np.abs(np.fft.rfft(x, axis=0)).sum(1) / 20
    freqs = np.fft.rfftfreq(400, 1 / 50)
    peak = {ACTIVITIES[k]: freqs[1 + np.argmax(spectra[k, 1:])] for k in range(6)}
    assert 1.2 < peak["cycle"] < peak["walk"] < peak["run"] < 3.0
    motion = spectra[:, (freqs > 0.5) & (freqs < 4.0)].sum(1)  # idle moves least in the gait band
    assert ACTIVITIES[int(np.argmin(motion))] == "idle" and min(motion[:4]) > 1.5 * motion[5]


def test_synth_command_writes_what_sensor_folder_reads(tmp_path):
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    for fmt, split in (("npy", "train"), ("csv", "valid")):
        args = parser.parse_args(["sensors", "synth", str(tmp_path), "--split", split, "--examples", "12", "--format", fmt])
        assert args.fn(args) == 0
    corpus = SyntheticActivities(split="valid", num_examples=12)
    folder = SensorFolder(root=str(tmp_path), split="valid", labels=list(ACTIVITIES))
    assert len(folder) == 12 and sorted(folder.lengths) == sorted(corpus.lengths)
    for ex in folder:
        original = corpus[int(ex["id"].split("-")[1])]
        assert ex["label"] == original["label"]
        assert np.allclose(read_recording(ex["path"]), original["signal"], atol=1e-5)  # CSV keeps 5 decimals
    few = SensorFolder(root=str(tmp_path), split="train", max_per_class=1)
    assert few.label_names == sorted(ACTIVITIES) and sorted(ex["label"] for ex in few) == list(range(6))
    with pytest.raises(SpecError, match="exists and is not empty"):
        args.fn(args)


def test_bad_recordings_are_named_or_skipped(tmp_path):
    (tmp_path / "walk").mkdir()
    np.save(tmp_path / "walk" / "good.npy", np.zeros((50, 3), np.float32))
    (tmp_path / "walk" / "broken.npy").write_bytes(b"not a numpy file")
    with pytest.raises(SpecError, match=r"broken\.npy.*on_bad_example: skip"):
        SensorFolder(root=str(tmp_path))
    folder = SensorFolder(root=str(tmp_path), on_bad_example="skip")
    assert len(folder) == 1 and folder.skipped[0][0] == "walk/broken"
    (tmp_path / "walk" / "nan.csv").write_text("x,y,z\n1,2,3\nnan,0,0\n")
    with pytest.raises(SpecError, match=r"nan\.csv.*NaN"):
        read_recording(tmp_path / "walk" / "nan.csv")
    with pytest.raises(SpecError, match="labels \\['run'\\] have no directory"):
        SensorFolder(root=str(tmp_path), labels=["walk", "run"])
