"""Speech data: the LibriSpeech and manifest datasets, the shipped demo corpus, the audio processor."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from d2v.api.errors import SpecError
from d2v_audio import datasets as audio_datasets
from d2v_audio.datasets import AudioManifest, LibriSpeech
from d2v_audio.processor import AudioProcessor

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "experiments" / "data" / "speech_demo" / "LibriSpeech"
DEMO_SPLITS = {"train-demo": 400, "dev-demo": 60, "test-demo": 60}
VOCAB = set("ZERO ONE TWO THREE FOUR FIVE SIX SEVEN EIGHT NINE YES NO UP DOWN LEFT RIGHT STOP GO ON OFF".split())


# --------------------------------------------------------------------------- helpers
def write_audio(path: Path, data: np.ndarray, rate: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, rate, subtype="PCM_16")
    return path


def tone(n: int, seed: int = 0, amplitude: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    return (amplitude * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(n) + 0.02).astype(np.float32)


def make_librispeech(root: Path, split: str = "train-x", utts: dict[str, int] | None = None) -> Path:
    """A tiny LibriSpeech-layout split: {utt_id: num_samples}."""
    utts = utts or {"1-10-0000": 800, "1-10-0001": 1200, "2-20-0000": 1000, "1-10-0010": 900}
    chapters: dict[tuple[str, str], list[str]] = {}
    for utt_id, n in utts.items():
        spk, chap, _ = utt_id.split("-")
        write_audio(root / split / spk / chap / f"{utt_id}.flac", tone(n))
        chapters.setdefault((spk, chap), []).append(f"{utt_id} WORDS OF {utt_id}")
    for (spk, chap), lines in chapters.items():
        (root / split / spk / chap / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n")
    return root


def read_transcripts(split_dir: Path) -> dict[str, str]:
    out = {}
    for path in split_dir.glob("*/*/*.trans.txt"):
        for line in path.read_text().splitlines():
            utt_id, text = line.split(" ", 1)
            out[utt_id] = text
    return out


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("D2V_CACHE_DIR", str(tmp_path / "cache"))


# --------------------------------------------------------------------------- demo corpus
@pytest.fixture(scope="module")
def demo_splits():
    return {split: LibriSpeech(str(DEMO), split) for split in DEMO_SPLITS}


def test_demo_corpus_counts_ids_and_lengths(demo_splits):
    for split, count in DEMO_SPLITS.items():
        ds = demo_splits[split]
        assert len(ds) == count == len(ds.lengths)
        transcripts = read_transcripts(DEMO / split)
        assert set(ds.ids) == set(transcripts)
        for i in range(len(ds)):
            ex = ds[i]
            assert set(ex) >= {"id", "path", "num_samples", "text"}
            assert ex["text"] == transcripts[ex["id"]]
            assert Path(ex["path"]).name == f"{ex['id']}.flac"
            spk, chap, _ = ex["id"].split("-")
            assert Path(ex["path"]).parent == DEMO / split / spk / chap
            assert ex["num_samples"] == ds.lengths[i] == sf.info(ex["path"]).frames
            assert split in ex["dataset"]


def test_demo_corpus_content(demo_splits):
    seen: dict[str, str] = {}
    for split, ds in demo_splits.items():
        speakers = {i.split("-")[0] for i in ds.ids}
        assert len(speakers) >= 6, split
        for ex in (ds[i] for i in range(len(ds))):
            words = ex["text"].split()
            assert 2 <= len(words) <= 5 and set(words) <= VOCAB, ex
            assert ex["text"] not in seen, f"{ex['text']!r} in {split} and {seen.get(ex['text'])}"
            seen[ex["text"]] = split
            info = sf.info(ex["path"])
            assert (info.samplerate, info.channels, info.subtype, info.format) == (16000, 1, "PCM_16", "FLAC")
            assert 1.0 <= info.duration <= 2.5, ex
    total = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert total < 12_000_000


def test_librispeech_order_multiple_splits_and_max_examples(demo_splits):
    both = LibriSpeech(str(DEMO), ["dev-demo", "test-demo"])
    assert both.ids == demo_splits["dev-demo"].ids + demo_splits["test-demo"].ids
    assert both[0]["dataset"] != both[len(both) - 1]["dataset"]
    ids = demo_splits["dev-demo"].ids
    keys = [tuple(int(x) for x in i.split("-")) for i in ids]
    assert keys == sorted(keys)
    few = LibriSpeech(str(DEMO), ["dev-demo"], max_examples=7)
    assert few.ids == ids[:7] and len(few.lengths) == 7 and len(few) == 7


def test_librispeech_natural_order(tmp_path):
    ds = LibriSpeech(str(make_librispeech(tmp_path)), "train-x")
    assert ds.ids == ["1-10-0000", "1-10-0001", "1-10-0010", "2-20-0000"]
    assert ds.lengths == [800, 1200, 900, 1000]
    assert ds[2]["text"] == "WORDS OF 1-10-0010"


def test_librispeech_missing_root(tmp_path):
    root = tmp_path / "nowhere" / "LibriSpeech"
    with pytest.raises(SpecError) as err:
        LibriSpeech(str(root), ["train-clean-100"])
    msg = str(err.value)
    assert str(root) in msg and "https://www.openslr.org/12" in msg and "train-clean-100.tar.gz" in msg


def test_librispeech_missing_split(tmp_path):
    root = make_librispeech(tmp_path / "LibriSpeech")
    with pytest.raises(SpecError) as err:
        LibriSpeech(str(root), ["train-x", "dev-clean"])
    msg = str(err.value)
    assert str(root / "dev-clean") in msg
    assert "train-x" in msg  # the splits that do exist
    assert "https://www.openslr.org/12" in msg
    # root pointing one level too high gets a pointer to the right directory
    with pytest.raises(SpecError, match="set root to that directory"):
        LibriSpeech(str(tmp_path), "train-x")


@pytest.mark.parametrize("bad", [[], "", [1], ["a/b"], None])
def test_librispeech_bad_splits(tmp_path, bad):
    with pytest.raises(SpecError, match="splits"):
        LibriSpeech(str(make_librispeech(tmp_path)), bad)


def test_librispeech_audio_without_transcript(tmp_path):
    root = make_librispeech(tmp_path)
    write_audio(root / "train-x" / "1" / "10" / "1-10-0099.flac", tone(500))
    with pytest.raises(SpecError, match=r"1 audio file\(s\) have no transcript.*1-10-0099"):
        LibriSpeech(str(root), "train-x")


def test_librispeech_transcript_without_audio(tmp_path):
    root = make_librispeech(tmp_path)
    (root / "train-x" / "2" / "20" / "2-20-0000.flac").unlink()
    with pytest.raises(SpecError, match=r"no \.flac file.*2-20-0000"):
        LibriSpeech(str(root), "train-x")


def test_librispeech_empty_split(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match="no .flac files"):
        LibriSpeech(str(tmp_path), "empty")


def test_librispeech_index_cache(tmp_path, monkeypatch):
    root = make_librispeech(tmp_path / "ls")
    first = LibriSpeech(str(root), "train-x", cache_index=True)
    cache_files = list((tmp_path / "cache" / "librispeech-index").glob("train-x-*.tsv"))
    assert len(cache_files) == 1

    # a second build takes the lengths from the cache, without reading any header
    def no_info(*args, **kwargs):
        raise AssertionError("soundfile.info called despite a valid cache")

    monkeypatch.setattr(audio_datasets.sf, "info", no_info)
    again = LibriSpeech(str(root), "train-x", cache_index=True)
    assert again.ids == first.ids and again.lengths == first.lengths
    monkeypatch.undo()
    monkeypatch.setenv("D2V_CACHE_DIR", str(tmp_path / "cache"))

    # a changed file is re-read, not taken from the stale cache
    path = root / "train-x" / "1" / "10" / "1-10-0001.flac"
    write_audio(path, tone(3000))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    changed = LibriSpeech(str(root), "train-x", cache_index=True)
    assert changed.lengths[changed.ids.index("1-10-0001")] == 3000

    # no caching for small splits by default, and cache_index=False never writes
    for f in cache_files:
        f.unlink()
    LibriSpeech(str(root), "train-x")
    LibriSpeech(str(root), "train-x", cache_index=False)
    assert not list((tmp_path / "cache" / "librispeech-index").glob("*.tsv"))


def test_librispeech_unreadable_audio(tmp_path):
    root = make_librispeech(tmp_path)
    bad = root / "train-x" / "1" / "10" / "1-10-0000.flac"
    bad.write_bytes(b"not a flac file at all")
    with pytest.raises(SpecError) as err:
        LibriSpeech(str(root), "train-x")
    assert str(bad) in str(err.value) and "train-x" in str(err.value)


def test_librispeech_via_registry():
    from d2v.api.plugins import registry

    ds = registry().get("dataset", "librispeech").build(root=str(DEMO), splits=["dev-demo"], max_examples=3)
    assert len(ds) == 3
    proc = registry().get("processor", "audio").build(sample_rate=16000)
    assert isinstance(proc, AudioProcessor)


# --------------------------------------------------------------------------- manifest
def test_manifest_plain_relative_to_manifest_dir(tmp_path):
    write_audio(tmp_path / "a" / "x.wav", tone(700))
    write_audio(tmp_path / "a" / "y.flac", tone(900))
    absolute = write_audio(tmp_path / "elsewhere" / "z.wav", tone(500))
    (tmp_path / "train.tsv").write_text(f"a/x.wav\t700\tHELLO WORLD\na/y.flac\t900\n\n{absolute}\t500\tBYE\n")
    ds = AudioManifest(str(tmp_path / "train.tsv"))
    assert len(ds) == 3 and ds.lengths == [700, 900, 500]
    assert ds.ids == ["a/x", "a/y", str(absolute.with_suffix(""))]
    assert [ds[i]["text"] for i in range(3)] == ["HELLO WORLD", "", "BYE"]
    assert ds[0]["path"] == str(tmp_path / "a" / "x.wav") and ds[2]["path"] == str(absolute)
    assert AudioManifest(str(tmp_path / "train.tsv"), max_examples=2).ids == ["a/x", "a/y"]


def test_manifest_fairseq_root_line(tmp_path):
    audio_root = tmp_path / "corpus"
    write_audio(audio_root / "s1" / "u1.flac", tone(600))
    write_audio(audio_root / "s1" / "u2.flac", tone(650))
    (tmp_path / "manifests").mkdir()
    manifest = tmp_path / "manifests" / "train.tsv"
    manifest.write_text(f"{audio_root}\ns1/u1.flac\t600\ns1/u2.flac\t650\n")
    ds = AudioManifest(str(manifest))
    assert ds.ids == ["s1/u1", "s1/u2"] and ds.lengths == [600, 650]
    assert ds[1]["path"] == str(audio_root / "s1" / "u2.flac") and ds[1]["text"] == ""
    # a relative root line is relative to the manifest's directory
    manifest.write_text("../corpus\ns1/u1.flac\t600\n")
    assert AudioManifest(str(manifest))[0]["path"] == str(audio_root / "s1" / "u1.flac")
    # the root argument wins over the root line (relocated corpus)
    moved = tmp_path / "moved"
    audio_root.rename(moved)
    manifest.write_text(f"{audio_root}\ns1/u1.flac\t600\n")
    assert AudioManifest(str(manifest), root=str(moved))[0]["path"] == str(moved / "s1" / "u1.flac")
    with pytest.raises(SpecError, match="root directory"):
        AudioManifest(str(manifest))


@pytest.mark.parametrize(
    "content, match",
    [
        ("x.wav\tmany\n", r"line 1: n_samples 'many'"),
        ("x.wav\t100\nx.wav 100\n", r"line 2: .*no TAB"),
        ("x.wav\t100\nmissing.wav\t100\n", r"1 listed audio file\(s\) do not exist: .*missing.wav"),
        ("\n\n", "no utterances"),
    ],
)
def test_manifest_errors(tmp_path, content, match):
    write_audio(tmp_path / "x.wav", tone(100))
    (tmp_path / "m.tsv").write_text(content)
    with pytest.raises(SpecError, match=match):
        AudioManifest(str(tmp_path / "m.tsv"))


def test_manifest_missing_file(tmp_path):
    with pytest.raises(SpecError, match=re.escape(str(tmp_path / "nope.tsv"))):
        AudioManifest(str(tmp_path / "nope.tsv"))


# --------------------------------------------------------------------------- processor
def example_for(path: Path, text: str = "") -> dict:
    return {"id": path.stem, "path": str(path), "num_samples": sf.info(str(path)).frames, "text": text,
            "dataset": "test corpus"}


def test_normalisation_statistics(tmp_path):
    path = write_audio(tmp_path / "a.wav", tone(4000, amplitude=0.2))
    wav = AudioProcessor().load(example_for(path), train=False)["waveform"]
    assert wav.dtype == torch.float32 and wav.shape == (4000,)
    assert abs(float(wav.double().mean())) < 1e-5
    assert abs(float(wav.double().std(unbiased=False)) - 1) < 1e-4
    raw = AudioProcessor(normalize=False).load(example_for(path), train=False)["waveform"]
    assert torch.equal(raw, torch.from_numpy(sf.read(str(path), dtype="float32")[0]))


def test_matches_hf_wav2vec2_feature_extractor(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=True
    )
    paths = [write_audio(tmp_path / f"{i}.flac", tone(n, seed=i, amplitude=0.1 * (i + 1)))
             for i, n in enumerate([1600, 3200, 2401, 17])]
    raw = [sf.read(str(p), dtype="float32")[0] for p in paths]
    ref = hf(raw, sampling_rate=16000, padding=True, return_attention_mask=True, return_tensors="np")

    proc = AudioProcessor()
    batch = proc.collate([proc.load(example_for(p, text=f"T{i}"), train=False) for i, p in enumerate(paths)])
    assert batch["inputs"].shape == ref["input_values"].shape == (4, 3200)
    np.testing.assert_allclose(batch["inputs"].numpy(), ref["input_values"], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(~batch["padding_mask"].numpy(), ref["attention_mask"].astype(bool))
    assert batch["lengths"].tolist() == [1600, 3200, 2401, 17]
    assert batch["text"] == ["T0", "T1", "T2", "T3"] and batch["ids"] == ["0", "1", "2", "3"]


def test_resamples_8khz(tmp_path):
    path = write_audio(tmp_path / "low.wav", tone(4000), rate=8000)
    wav = AudioProcessor(sample_rate=16000).load(example_for(path), train=False)["waveform"]
    assert wav.shape == (8000,)
    wav22 = AudioProcessor(sample_rate=22050).load(example_for(path), train=False)["waveform"]
    assert wav22.shape == (int(np.ceil(4000 * 22050 / 8000)),)
    assert AudioProcessor().length_per_second == 16000


def test_stereo_to_mono(tmp_path):
    left, right = tone(1000, seed=1), tone(1000, seed=2, amplitude=0.1)
    path = write_audio(tmp_path / "stereo.wav", np.stack([left, right], axis=1))
    stored = sf.read(str(path), dtype="float32")[0]
    wav = AudioProcessor(normalize=False).load(example_for(path), train=False)["waveform"]
    assert wav.shape == (1000,)
    np.testing.assert_allclose(wav.numpy(), stored.mean(axis=1), atol=1e-7)


def test_random_crop_bounds_and_determinism(tmp_path):
    path = write_audio(tmp_path / "long.wav", tone(5000))
    full = AudioProcessor(normalize=False).load(example_for(path), train=False)["waveform"]
    proc = AudioProcessor(normalize=False, max_samples=1000, crop="random")
    starts = set()
    for seed in range(20):
        crop = proc.load(example_for(path), train=True, generator=torch.Generator().manual_seed(seed))["waveform"]
        assert crop.shape == (1000,)
        matches = [s for s in range(0, 4001) if torch.equal(full[s : s + 1000], crop)]
        assert matches, "a crop must be a contiguous window of the waveform"
        starts.add(matches[0])
        again = proc.load(example_for(path), train=True, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(again["waveform"], crop)
    assert len(starts) > 10  # really random
    torch.manual_seed(123)
    a = proc.load(example_for(path), train=True)["waveform"]
    torch.manual_seed(123)
    b = proc.load(example_for(path), train=True)["waveform"]
    assert torch.equal(a, b)
    # evaluation never crops; short files are untouched; "start" crops the beginning
    assert proc.load(example_for(path), train=False)["waveform"].shape == (5000,)
    short = write_audio(tmp_path / "short.wav", tone(600))
    assert proc.load(example_for(short), train=True)["waveform"].shape == (600,)
    start = AudioProcessor(normalize=False, max_samples=1000, crop="start")
    assert torch.equal(start.load(example_for(path), train=True)["waveform"], full[:1000])
    # the crop is normalised, not the whole file
    normed = AudioProcessor(max_samples=1000).load(example_for(path), train=True)["waveform"]
    assert abs(float(normed.double().mean())) < 1e-5 and abs(float(normed.double().std(unbiased=False)) - 1) < 1e-4


def test_filter_length():
    assert AudioProcessor(min_samples=100).filter_length(100)
    assert not AudioProcessor(min_samples=100).filter_length(99)
    assert AudioProcessor(max_samples=1000, crop="random").filter_length(10**6)
    assert AudioProcessor(max_samples=1000, crop="start").filter_length(10**6)
    assert not AudioProcessor(max_samples=1000, crop="none").filter_length(1001)
    assert AudioProcessor(max_samples=1000, crop="none").filter_length(1000)
    assert AudioProcessor(crop="none").filter_length(10**7)


def test_unreadable_audio_names_file_and_dataset(tmp_path):
    bad = tmp_path / "bad.flac"
    bad.write_bytes(b"garbage")
    for path in (bad, tmp_path / "missing.flac"):
        ex = {"id": "u1", "path": str(path), "num_samples": 10, "text": "", "dataset": "librispeech split 'dev-x'"}
        with pytest.raises(SpecError) as err:
            AudioProcessor().load(ex, train=False)
        assert str(path) in str(err.value) and "dev-x" in str(err.value)


@pytest.mark.parametrize(
    "kwargs",
    [dict(sample_rate=0), dict(max_samples=-5), dict(min_samples=-1), dict(crop="middle"),
     dict(normalize="yes"), dict(max_samples=10, min_samples=20)],
)
def test_processor_rejects_bad_parameters(kwargs):
    with pytest.raises(SpecError, match="audio processor"):
        AudioProcessor(**kwargs)


def test_loaded_demo_batch(demo_splits):
    ds = demo_splits["dev-demo"]
    proc = AudioProcessor(max_samples=20000)
    batch = proc.collate([proc.load(ds[i], train=False) for i in range(8)])
    assert batch["lengths"].tolist() == ds.lengths[:8]
    assert batch["ids"] == ds.ids[:8] and batch["text"] == ds.texts[:8]
    assert not torch.isnan(batch["inputs"]).any()


def test_min_samples_drops_short_training_examples_and_says_how_many(tmp_path):
    """fairseq's min_sample_size: utterances shorter than min_samples never reach training."""
    from d2v.data.loading import filter_training_examples

    root = make_librispeech(tmp_path, utts={"1-10-0000": 8000, "1-10-0001": 20000, "1-10-0002": 40000, "2-20-0000": 12000})
    dataset = LibriSpeech(root=str(root), splits=["train-x"])
    kept, dropped = filter_training_examples(dataset, AudioProcessor(min_samples=16000), "data.train")
    assert dropped == 2 and len(kept) == 2
    assert sorted(kept.lengths) == [20000, 40000]
    assert {kept[i]["num_samples"] for i in range(len(kept))} == {20000, 40000}
    # crop="none" also drops what is longer than max_samples; nothing left is an error
    _, dropped = filter_training_examples(dataset, AudioProcessor(max_samples=30000, crop="none"), "data.train")
    assert dropped == 1
    with pytest.raises(SpecError, match="drop all 4"):
        filter_training_examples(dataset, AudioProcessor(min_samples=50000), "data.train")


def test_batches_are_sized_by_the_cropped_length(tmp_path):
    """Long utterances cropped to max_samples count as max_samples against the batch budget."""
    from d2v.spec.config import LoaderConfig
    from d2v.data.loading import batch_sampler_for

    root = make_librispeech(tmp_path, utts={f"1-10-{i:04d}": 64000 for i in range(8)})
    dataset = LibriSpeech(root=str(root), splits=["train-x"])
    processor = AudioProcessor(max_samples=16000, crop="random")
    loader = LoaderConfig(max_batch_seconds=3)
    train = batch_sampler_for(dataset, processor, loader, train=True, seed=0, where="data.train")
    assert sorted(len(b) for b in train.batches) == [2, 3, 3]  # 3 x 1 s fit the 3 s budget
    with pytest.raises(SpecError, match="longest example"):  # evaluation is never cropped
        batch_sampler_for(dataset, processor, loader, train=False, seed=0, where="data.valid")
