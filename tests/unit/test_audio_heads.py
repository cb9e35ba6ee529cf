"""Audio task heads (utterance, frame, x-vector), their metrics, label collation and datasets.

Metrics are checked against hand-computed values and properties; losses against their
formulas; datasets against small on-disk corpora written in the tests.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d2v.api.errors import SpecError
from d2v.api.interfaces import EncoderOutput, HeadOutput
from d2v_audio.frame_labels import num_label_frames, segments_to_frames, shift_segments
from d2v_audio.labelled_datasets import AudioFolder, AudioSegments, VoxCeleb
from d2v_audio.processor import AudioProcessor
from d2v_heads.speech.audio_classification import AudioClassificationHead, masked_mean
from d2v_heads.speech.audio_frame_classification import AudioFrameClassificationHead, align_frame_labels
from d2v_heads.shared.layer_sum import weighted_layer_sum
from d2v_heads.speech.verification_metrics import (
    best_speaker_mapping,
    diarization_counts,
    diarization_summary,
    equal_error_rate,
    min_dcf,
)
from d2v_heads.speech.xvector import XVectorHead, all_pair_trials, read_trials

pytestmark = pytest.mark.usefixtures("single_thread")


def encoder_output(batch=3, frames=20, dim=8, layers=2, lengths=(20, 13, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = tuple(torch.randn(batch, frames, dim, generator=g) for _ in range(layers + 1))
    padding = torch.arange(frames)[None, :] >= torch.tensor(lengths)[:, None]
    return EncoderOutput(last_hidden_state=hidden[-1], hidden_states=hidden, padding_mask=padding)


# --------------------------------------------------------------------------- metrics


def test_eer_hand_computed():
    # perfectly separated trials: no error at a threshold between the classes
    assert equal_error_rate([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 0.0
    # fully inverted: every threshold errs on everything
    assert equal_error_rate([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0]) == 100.0
    # targets 0.3, 0.7, 0.9; non-targets 0.1, 0.5, 0.8: at t in (0.5, 0.7] FRR = 1/3, FAR = 1/3
    assert math.isclose(equal_error_rate([0.3, 0.7, 0.9, 0.1, 0.5, 0.8], [1, 1, 1, 0, 0, 0]), 100 / 3)
    # crossing between thresholds is interpolated: 4 targets, 2 non-targets
    # points (FRR, FAR): (0,1) (0,.5) (.25,.5) (.25,0) ... -> crossing at 0.25 between (.25,.5) and (.25,0)
    assert math.isclose(equal_error_rate([0.2, 0.6, 0.7, 0.9, 0.1, 0.5], [1, 1, 1, 1, 0, 0]), 25.0)


def test_min_dcf_hand_computed():
    scores, labels = [0.3, 0.7, 0.9, 0.1, 0.5, 0.8], [1, 1, 1, 0, 0, 0]
    # p_target 0.5: cost = 0.5*FRR + 0.5*FAR, normalised by 0.5 -> min(FRR + FAR) = 2/3
    assert math.isclose(min_dcf(scores, labels, p_target=0.5), 2 / 3)
    # p_target 0.01: normalised cost FRR + 99 FAR; best: accept only the 0.9 target (FRR 2/3, FAR 0),
    # better than rejecting everything (1.0)
    assert math.isclose(min_dcf(scores, labels, p_target=0.01), 2 / 3)
    assert math.isclose(min_dcf([0.9, 0.1, 0.5], [1, 0, 0], p_target=0.01), 0.0)
    with pytest.raises(ValueError, match="target"):
        equal_error_rate([0.1, 0.2], [1, 1])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-30, 30), st.booleans()), min_size=2, max_size=40))
def test_eer_properties(trials):
    scores = [float(s) for s, _ in trials]  # integers: ties happen, transforms stay exact
    labels = [int(t) for _, t in trials]
    if len(set(labels)) < 2:
        return
    eer = equal_error_rate(scores, labels)
    assert 0.0 <= eer <= 100.0
    # swapping the roles of targets and non-targets and negating the scores keeps the EER
    assert math.isclose(eer, equal_error_rate([-s for s in scores], [1 - y for y in labels]), abs_tol=1e-9)
    # a monotone transform of the scores changes nothing
    assert math.isclose(eer, equal_error_rate([3 * s + 1 for s in scores], labels), abs_tol=1e-9)


def test_der_counts_hand_computed():
    ref = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1], [1, 1], [0, 0]]).bool()
    # the system swapped the speakers, missed one frame of overlap and added a false alarm
    sys = torch.tensor([[0, 1], [0, 1], [1, 0], [1, 0], [1, 0], [1, 0]]).bool()
    counts = diarization_counts(sys, ref, permute=True)
    assert counts == {"der_miss": 1.0, "der_false_alarm": 1.0, "der_confusion": 0.0, "der_speech": 6.0}
    fixed = diarization_counts(sys, ref, permute=False)
    assert fixed["der_confusion"] == 4.0  # without the mapping, 4 frames name the wrong speaker
    summary = diarization_summary(counts)
    assert math.isclose(summary["der"], 100 * 2 / 6)
    assert best_speaker_mapping(np.array([[0, 5], [4, 1]])) == [(0, 1), (1, 0)]


# --------------------------------------------------------------------------- heads


def test_weighted_layer_sum_and_masked_mean_formulas():
    out = encoder_output()
    weights = torch.tensor([0.5, -1.0, 2.0])
    expected = sum(w * h for w, h in zip(torch.softmax(weights, 0), out.hidden_states))
    assert torch.allclose(weighted_layer_sum(weights, out.hidden_states), expected, atol=1e-6)
    pooled = masked_mean(out.last_hidden_state, out.padding_mask)
    assert torch.allclose(pooled[1], out.last_hidden_state[1, :13].mean(0), atol=1e-6)
    with pytest.raises(SpecError, match="num_layers"):
        weighted_layer_sum(torch.zeros(5), out.hidden_states)


def test_audio_classification_head_loss_and_metrics():
    head = AudioClassificationHead(input_dim=8, label_names=["a", "b", "c"], classifier_proj_size=4,
                                   use_weighted_layer_sum=True, num_layers=2)
    assert head.needs_hidden_states and head.layer_weights.numel() == 3
    out = encoder_output()
    labels = torch.tensor([2, 0, 1])
    result = head(out, {"labels": labels})
    assert torch.allclose(result.loss, torch.nn.functional.cross_entropy(result.logits, labels))
    counts = head.eval_counts(result, {"labels": labels})
    preds = result.logits.argmax(-1)
    assert head.summarize(counts)["accuracy"] == pytest.approx(100 * float((preds == labels).float().mean()))
    assert head.predict(result, {}) == [head.label_names[i] for i in preds.tolist()]
    with pytest.raises(SpecError, match="label_names"):
        AudioClassificationHead(input_dim=8, num_labels=2, label_names=["x", "y", "z"])
    with pytest.raises(SpecError, match="num_labels"):
        AudioClassificationHead(input_dim=8)
    with pytest.raises(SpecError, match="quote"):
        AudioClassificationHead(input_dim=8, label_names=["up", False, True])


def test_frame_head_bce_ignores_padding_and_aligns_frames():
    head = AudioFrameClassificationHead(input_dim=8, label_names=["A", "B"], diarization=True)
    out = encoder_output()
    labels = torch.zeros(3, 22, 2)  # 2 more label frames than model frames: cut
    labels[:, 3:9, 0] = 1
    labels[:, 10:12, 1] = 1
    labels[1, 13:] = -100
    labels[2, 5:] = -100
    result = head(out, {"labels": labels})
    logits = result.logits
    aligned = labels[:, :20]
    keep = (aligned >= 0).all(-1)
    reference = torch.nn.functional.binary_cross_entropy_with_logits(logits[keep], aligned[keep])
    assert torch.allclose(result.loss, reference)
    counts = head.eval_counts(result, {"labels": labels})
    assert counts["der_speech"] == float(aligned[keep].sum())
    metrics = head.summarize(counts)
    assert {"frame_f1", "frame_accuracy", "der"} <= set(metrics)
    assert align_frame_labels(labels[:, :4], 6)[:, 4:].eq(-100).all()
    assert head(out, {"labels": torch.full((3, 20, 2), -100.0)}).loss.item() == 0.0
    # HF's loss: argmax rows, every given frame
    ce = AudioFrameClassificationHead(input_dim=8, num_labels=2, loss="cross_entropy")
    ce.load_state_dict(head.state_dict())
    clean = aligned.clamp(min=0)
    hf = torch.nn.functional.cross_entropy(logits.reshape(-1, 2), clean.reshape(-1, 2).argmax(-1))
    assert torch.allclose(ce(out, {"labels": clean}).loss, hf)
    # predict: each run of frames whose sigmoid passes 0.5, as "label start-end" in seconds (50 Hz frames)
    activity = torch.full((2, 10, 2), -4.0)
    activity[0, 1:4, 0] = activity[0, 6:, 0] = 4.0  # A: frames 1-3 and 6-9 (to the end)
    activity[0, 4, 1] = 0.1  # B: frame 4, just past the threshold
    activity[0, 5, 1] = -0.1  # just below it
    assert head.predict(HeadOutput(logits=activity), {}) == ["A 0.02-0.08; A 0.12-0.20; B 0.08-0.10", ""]
    with pytest.raises(SpecError, match="loss"):
        AudioFrameClassificationHead(input_dim=8, num_labels=2, loss="focal")


def test_xvector_head_pooling_and_all_pair_scoring():
    head = XVectorHead(input_dim=8, num_labels=3, tdnn_dim=[6, 6, 10], tdnn_kernel=[3, 3, 1], tdnn_dilation=[1, 2, 1],
                       xvector_output_dim=5)
    out = encoder_output(lengths=(20, 13, 9))
    assert head.pooled_frames(torch.tensor([20, 13, 9])).tolist() == [16, 9, 5]  # HF's undilated formula
    result = head(out, {"labels": torch.tensor([0, 2, 1])})
    assert result.extras["embeddings"].shape == (3, 5) and result.loss is not None
    batch = {"ids": ["u1", "u2", "u3"], "speakers": ["s1", "s1", "s2"]}
    counts = head.eval_counts(result, batch)
    metrics = head.summarize(counts)
    # every pair of utterances is a trial (same speaker: target), scored by the cosine of the x-vectors
    emb = result.extras["embeddings"].detach().double()
    cos = [float(torch.nn.functional.cosine_similarity(emb[i], emb[j], dim=0)) for i, j in ((0, 1), (0, 2), (1, 2))]
    assert metrics["trials"] == 3.0 and metrics["eer"] == pytest.approx(equal_error_rate(cos, [1, 0, 0]))
    # hand-made x-vectors: u1 and u2 point the same way, u3 is orthogonal to both
    counts = {"xv_ids": ["u1", "u2", "u3"], "xv_embeddings": [[1.0, 0, 0], [1.0, 0.1, 0], [0, 1.0, 0]]}
    assert head.summarize({**counts, "xv_speakers": ["s1", "s1", "s2"]})["eer"] == 0.0  # the target pair is closest
    assert head.summarize({**counts, "xv_speakers": ["s1", "s2", "s1"]})["eer"] == 100.0  # the target pair is farthest
    assert all_pair_trials(["a", "b", "c"], ["x", "x", "y"]) == [(1, "a", "b"), (0, "a", "c"), (0, "b", "c")]
    with pytest.raises(SpecError, match="TDNN frame"):
        head(encoder_output(lengths=(20, 13, 4)), {})


def test_xvector_trial_list(tmp_path):
    path = tmp_path / "trials.txt"
    path.write_text("1 a/x/1.wav a/y/2.wav\n0 a/x/1.wav b/z/3.wav\n")
    assert read_trials(path) == [(1, "a/x/1.wav", "a/y/2.wav"), (0, "a/x/1.wav", "b/z/3.wav")]
    head = XVectorHead(input_dim=8, num_labels=2, tdnn_dim=[4], tdnn_kernel=[1], tdnn_dilation=[1],
                       xvector_output_dim=3, trials=str(path))
    emb = {"xv_ids": ["a/x/1.wav", "a/y/2.wav", "b/z/3.wav"], "xv_embeddings": [[1, 0, 0], [1, 0.1, 0], [0, 1, 0]]}
    assert head.summarize(emb)["eer"] == 0.0
    with pytest.raises(SpecError, match="were not evaluated"):
        head.summarize({"xv_ids": ["a/x/1.wav"], "xv_embeddings": [[1, 0, 0]]})
    path.write_text("yes a b\n")
    with pytest.raises(SpecError, match="trials.txt:1"):
        read_trials(path)


# --------------------------------------------------------------------------- frame labels and collation


def test_segments_to_frames_centres():
    assert num_label_frames(16000, shift=320, length=400) == 49
    rows = segments_to_frames([(0.1, 0.3, 1)], 16000, 2, sample_rate=16000)
    centres = (torch.arange(49) * 320 + 200) / 16000
    assert torch.equal(rows[:, 1].bool(), (centres >= 0.1) & (centres < 0.3))
    assert not rows[:, 0].any()
    assert shift_segments([(0.5, 1.5, 0), (0.0, 0.2, 1)], 0.4, 0.8) == [(pytest.approx(0.1), 0.8, 0)]


def write_tone(path, seconds=0.5, rate=16000, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sf.write(str(path), (0.1 * rng.standard_normal(int(seconds * rate))).astype(np.float32), rate)


def test_processor_collates_labels_and_crops_segments(tmp_path):
    write_tone(tmp_path / "a.wav", 1.0)
    write_tone(tmp_path / "b.wav", 0.5, seed=1)
    proc = AudioProcessor(max_samples=8000, crop="random")
    ex_a = {"id": "a", "path": str(tmp_path / "a.wav"), "segments": [(0.0, 1.0, 0)], "num_labels": 2, "speaker": "x"}
    ex_b = {"id": "b", "path": str(tmp_path / "b.wav"), "segments": [(0.25, 0.5, 1)], "num_labels": 2, "speaker": "y"}
    loaded = [proc.load(ex_a, train=True, generator=torch.Generator().manual_seed(3)), proc.load(ex_b, train=False)]
    assert loaded[0]["waveform"].shape[0] == 8000
    assert loaded[0]["segments"] == [(0.0, 0.5, 0)]  # cut to the crop
    batch = proc.collate(loaded)
    assert batch["labels"].shape == (2, 24, 2) and batch["speakers"] == ["x", "y"]
    assert batch["labels"][0, :, 0].eq(1).all() and not batch["labels"][1, :, 0].any()
    plain = proc.collate([{**loaded[1], "label": 3}, {**loaded[1], "label": 1}])
    assert plain["labels"].tolist() == [3, 1]


# --------------------------------------------------------------------------- datasets


def test_audio_folder(tmp_path):
    for split, n in (("train", 2), ("valid", 1)):
        for word in ("yes", "no", "maybe"):
            for i in range(n):
                write_tone(tmp_path / split / word / f"{i}.wav", seed=i)
    (tmp_path / "train" / "_background_noise_").mkdir()
    ds = AudioFolder(str(tmp_path), "train", labels=["no", "yes"])
    assert len(ds) == 4 and ds[0]["label"] == 0 and ds[0]["id"] == "no/0" and ds.lengths[0] == 8000
    unk = AudioFolder(str(tmp_path), "train", labels=["no", "yes", "_unknown_"], unknown_label="_unknown_")
    assert sorted(f["label"] for f in unk.fields) == [0, 0, 1, 1, 2, 2]
    assert AudioFolder(str(tmp_path), "valid").label_names == ["maybe", "no", "yes"]
    (tmp_path / "val.txt").write_text("yes/0.wav\n")
    assert AudioFolder(str(tmp_path), "train", include_list=str(tmp_path / "val.txt")).ids == ["yes/0"]
    with pytest.raises(SpecError, match="quote"):
        AudioFolder(str(tmp_path), "train", labels=[False, True])  # YAML's unquoted no / yes
    with pytest.raises(SpecError, match="not a directory"):
        AudioFolder(str(tmp_path), "test")


def test_audio_segments_tsv_and_rttm(tmp_path):
    write_tone(tmp_path / "c1.wav", 1.0)
    write_tone(tmp_path / "c2.wav", 1.0, seed=1)
    (tmp_path / "m.tsv").write_text("c1.wav\t0.1\t0.4\tspeech\nc1.wav\t0.5\t0.9\tmusic\nc2.wav\n")
    ds = AudioSegments(str(tmp_path / "m.tsv"))
    assert ds.label_names == ["music", "speech"] and len(ds) == 2
    assert ds[0]["segments"] == [(0.1, 0.4, 1), (0.5, 0.9, 0)] and ds[1]["segments"] == [] and ds[0]["num_labels"] == 2
    (tmp_path / "d.rttm").write_text(
        "SPEAKER c1 1 0.50 0.30 <NA> <NA> bob <NA> <NA>\nSPEAKER c1 1 0.10 0.20 <NA> <NA> amy <NA> <NA>\n")
    rttm = AudioSegments(str(tmp_path / "d.rttm"), format="rttm", max_speakers=2)
    assert rttm[0]["segments"] == [(0.1, pytest.approx(0.3), 0), (0.5, pytest.approx(0.8), 1)]
    with pytest.raises(SpecError, match="max_speakers"):
        AudioSegments(str(tmp_path / "d.rttm"), format="rttm", max_speakers=1)
    (tmp_path / "bad.tsv").write_text("c1.wav\t0.1\tlate\tspeech\n")
    with pytest.raises(SpecError, match="bad.tsv:1"):
        AudioSegments(str(tmp_path / "bad.tsv"))


def test_voxceleb_splits_by_trial_list(tmp_path):
    for speaker in ("id1", "id2", "id3"):
        for video in ("v1", "v2"):
            write_tone(tmp_path / "wav" / speaker / video / "00001.wav")
    (tmp_path / "trials.txt").write_text("1 id3/v1/00001.wav id3/v2/00001.wav\n0 id3/v1/00001.wav id2/v1/00001.wav\n")
    root, trials = str(tmp_path / "wav"), str(tmp_path / "trials.txt")
    train = VoxCeleb(root, "train", trials)
    assert train.label_names == ["id1"] and len(train) == 2 and train[0]["label"] == 0
    test = VoxCeleb(root, "test", trials)
    assert sorted(test.ids) == ["id2/v1/00001.wav", "id3/v1/00001.wav", "id3/v2/00001.wav"]
    assert "label" not in test[0] and test[0]["speaker"] in ("id2", "id3")
    assert len(VoxCeleb(root)) == 6
    with pytest.raises(SpecError, match="trial list"):
        VoxCeleb(root, "test")


def test_shipped_demo_corpora_load():
    """The corpora under experiments/data/audio_tasks_demo load with the demo specs' datasets."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "experiments" / "data" / "audio_tasks_demo"
    words = ["down", "left", "no", "right", "up", "yes"]
    train, valid = (AudioFolder(str(root / "keywords"), split, labels=words) for split in ("train", "valid"))
    assert (len(train), len(valid)) == (120, 48)
    assert sorted({f["label"] for f in valid.fields}) == list(range(6))
    frames = AudioSegments(str(root / "frames" / "train.tsv"), labels=["A", "B"])
    assert len(frames) == 48 and all(max(e for _, e, _ in ex["segments"]) <= 2.0 for ex in frames.fields)
    trials = str(root / "speakers" / "trials.txt")
    speakers_train = VoxCeleb(str(root / "speakers" / "wav"), "train", trials)
    speakers_test = VoxCeleb(str(root / "speakers" / "wav"), "test", trials)
    assert (len(speakers_train.label_names), len(speakers_test.label_names)) == (32, 8)
    assert len(speakers_test) == 32 and not set(speakers_train.label_names) & set(speakers_test.label_names)
    assert len(read_trials(trials)) == 32 * 31 // 2
