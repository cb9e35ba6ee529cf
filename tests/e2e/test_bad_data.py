"""Bad files under both policies (data.on_bad_example): skipped and named, or a clear error naming them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from d2v.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "experiments" / "keywords_demo.yaml"
KEYWORDS = ROOT / "experiments" / "data" / "audio_tasks_demo" / "keywords"


@pytest.fixture
def damaged_corpus(tmp_path):
    """Two classes x 4 files; in train one file is random bytes (unreadable header), one empty;
    in valid one is cut in half (the header reads, the samples do not)."""
    root = tmp_path / "keywords"
    for split in ("train", "valid"):
        for label in ("down", "left"):
            target = root / split / label
            target.mkdir(parents=True)
            for source in sorted((KEYWORDS / split / label).glob("*.flac"))[:4]:
                shutil.copy(source, target / source.name)
    (root / "train" / "down" / "down_000.flac").write_bytes(os.urandom(3000))
    (root / "train" / "left" / "left_001.flac").write_bytes(b"")
    cut = sorted((root / "valid" / "down").glob("*.flac"))[0]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    return root, cut.stem


def _overrides(root: Path, out: Path, *extra: str) -> list[str]:
    labels = "[down,left]"
    return [f"data.train.root={root}", f"data.valid.root={root}", f"data.train.labels={labels}",
            f"data.valid.labels={labels}", f"model.head.label_names={labels}", "data.loader.batch_size=3",
            "trainer.max_steps=3", "trainer.eval_every=0", "trainer.eval_before_training=false",
            "trainer.progress_bar=false", "trainer.log_every=1", f"trainer.output_dir={out}", *extra]


def test_skip_policy_names_every_bad_file_and_trains_on(damaged_corpus, tmp_path, single_thread, capsys):
    root, cut = damaged_corpus
    assert main(["run", str(SPEC), *_overrides(root, tmp_path / "run", "data.on_bad_example=skip",
                                               "data.max_skipped_fraction=0.5")]) == 0
    assert "skipped_examples=3" in capsys.readouterr().out  # in the final summary line
    assert main(["runs", str(tmp_path)]) == 0
    header, *rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert "skipped" in header and rows[0][header.index("skipped")] == "3"  # and in d2v runs
    rows = [line.split("\t") for line in (tmp_path / "run" / "skipped.tsv").read_text().splitlines()]
    by_id = {(split, name): reason for split, name, reason in rows}
    assert set(by_id) == {("train", "down/down_000"), ("train", "left/left_001"), ("valid", f"down/{cut}")}
    assert "cannot read the header" in by_id[("train", "down/down_000")]
    assert "cannot read audio file" in by_id[("valid", f"down/{cut}")]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in records if r.get("split") == "valid"][-1]["skipped_examples"] == 1


@pytest.mark.parametrize("workers", [0, 1])
def test_error_policy_names_the_file_and_the_reason(damaged_corpus, tmp_path, capsys, single_thread, workers):
    root, cut = damaged_corpus
    assert main(["run", str(SPEC), *_overrides(root, tmp_path / "a", "data.on_bad_example=error")]) == 2
    err = capsys.readouterr().err
    assert "down_000.flac" in err and "data.on_bad_example: skip" in err
    # a file whose header reads but whose samples do not fails when loaded, in a worker or not
    for name in ("down_000.flac", "left_001.flac"):
        shutil.copy(KEYWORDS / "train" / name.split("_")[0] / name, root / "train" / name.split("_")[0] / name)
    (root / "train" / "left" / "left_002.flac").write_bytes((root / "valid" / "down" / f"{cut}.flac").read_bytes())
    overrides = _overrides(root, tmp_path / "b", "data.on_bad_example=error", f"data.loader.num_workers={workers}")
    assert main(["run", str(SPEC), *overrides]) == 2
    err = capsys.readouterr().err
    assert "data.train: example 'left/left_002' cannot be loaded: cannot read audio file" in err
    assert "Traceback" not in err and "Caught" not in err


def test_oov_transcripts_are_reported_and_clips_too_short_for_a_frame_are_left_out(tmp_path, single_thread, capsys):
    import numpy as np
    import soundfile as sf

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i, (seconds, text) in enumerate([(1.0, "CAFÉ 42"), (0.01, "UP"), (1.0, "LEFT"), (1.2, "DOWN")]):
        samples = int(16000 * seconds)
        sf.write(corpus / f"u{i}.flac", (0.1 * rng.standard_normal(samples)).astype("float32"), 16000)
        rows.append(f"u{i}.flac\t{samples}\t{text}")
    (corpus / "train.tsv").write_text(f"{corpus}\n" + "\n".join(rows) + "\n")
    overrides = [f"data.train={{name: audio_manifest, path: {corpus / 'train.tsv'}}}", "data.valid=null",
                 "data.test=null", "data.loader.max_batch_seconds=null", "data.loader.batch_size=2",
                 "trainer.max_steps=2", "trainer.eval_every=0", "trainer.eval_before_training=false",
                 "trainer.progress_bar=false", f"trainer.output_dir={tmp_path / 'run'}", "data.max_skipped_fraction=0.25"]
    assert main(["run", str(ROOT / "experiments" / "asr_demo.yaml"), *overrides]) == 0
    out = capsys.readouterr().out
    assert "3 transcript characters in 1 utterances are not in the CTC vocabulary and become <unk>" in out
    assert "'É' x1" in out and "'4' x1" in out and "'2' x1" in out
    skipped = (tmp_path / "run" / "skipped.tsv").read_text()
    assert "train\tu1\ttoo short: length 160 gives no feature frame" in skipped
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "data_warning" for e in events)


def test_images_in_other_modes_load_and_broken_images_follow_the_policy(tmp_path, single_thread, capsys):
    import numpy as np
    from PIL import Image

    shapes = ROOT / "experiments" / "data" / "vision_demo" / "shapes"
    root = tmp_path / "shapes"
    for split in ("train", "valid"):
        for label in ("circle", "cross", "square", "triangle"):
            (root / split / label).mkdir(parents=True)
            for source in sorted((shapes / split / label).glob("*.png"))[:3]:
                shutil.copy(source, root / split / label / source.name)
    circle = root / "train" / "circle"
    rgb = Image.open(next(circle.glob("*.png"))).convert("RGB")
    rgb.convert("CMYK").save(circle / "cmyk.jpg")
    Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)).save(circle / "gray16.png")
    rgb.convert("RGBA").save(circle / "rgba.png")
    rgb.convert("P").save(circle / "palette.png")
    (circle / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    common = [f"data.train.root={root}", f"data.valid.root={root}", "trainer.max_steps=2", "trainer.eval_every=0",
              "trainer.eval_before_training=false", "trainer.progress_bar=false", "data.loader.batch_size=16",
              "data.max_skipped_fraction=0.1"]
    spec = str(ROOT / "experiments" / "vision_cls_demo.yaml")
    assert main(["run", spec, *common, f"trainer.output_dir={tmp_path / 'skip'}"]) == 0
    skipped = (tmp_path / "skip" / "skipped.tsv").read_text().splitlines()
    assert len(skipped) == 1 and "broken" in skipped[0] and "cannot be decoded" in skipped[0]
    assert main(["run", spec, *common, "data.on_bad_example=error", f"trainer.output_dir={tmp_path / 'err'}"]) == 2
    assert "broken" in capsys.readouterr().err


@pytest.mark.parametrize("policy", ["skip", "error"])
def test_text_lines_that_are_not_utf8_follow_the_policy(tmp_path, policy):
    from d2v.api.errors import SpecError
    from d2v_text.datasets import TextLines

    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes("the first line\n".encode() + b"caf\xe9 in latin-1\n" + "the third line\n".encode())
    if policy == "error":
        with pytest.raises(SpecError, match=r"line 2 is not valid UTF-8 .*data.on_bad_example: skip"):
            TextLines(str(corpus), on_bad_example=policy)
        return
    data = TextLines(str(corpus), on_bad_example=policy)
    assert [ex["text"] for ex in data.examples] == ["the first line", "the third line"]
    assert [ex["id"] for ex in data.examples] == ["corpus:1", "corpus:3"]
    assert data.skipped == [("corpus:2", "line 2 is not valid UTF-8 (byte 3: b'\\xe9 in')")]


def test_more_unreadable_files_than_the_budget_stop_the_run_naming_them(damaged_corpus, tmp_path, capsys,
                                                                        single_thread):
    """The default data.max_skipped_fraction (0.001) allows none of 8 examples: the run stops
    (exit 2) before training, naming files, the count, the list and the setting. A file that
    fails only when loaded (cut in half) stops an evaluation after its numbers were logged."""
    root, cut = damaged_corpus
    out = tmp_path / "run"
    assert main(["run", str(SPEC), *_overrides(root, out)]) == 2
    err = capsys.readouterr().err
    assert "data.train: 2 of 8 examples could not be used (25%)" in err and "down/down_000" in err
    assert "data.max_skipped_fraction: 0.001 allows (0)" in err and str(out / "skipped.tsv") in err
    assert not (out / "checkpoints").exists()
    trained = tmp_path / "trained"
    assert main(["run", str(SPEC), *_overrides(root, trained, "data.max_skipped_fraction=0.5")]) == 0
    assert main(["run", str(SPEC), *_overrides(root, tmp_path / "b", "task=evaluate", "evaluate.split=valid",
                                               f"evaluate.checkpoint={trained / 'final'}")]) == 2
    assert f"data.valid: 1 of 8 examples could not be used (12%), more than" in capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in records if r.get("split") == "valid"][-1]["skipped_examples"] == 1


def test_a_bug_in_a_processor_is_never_skipped_as_bad_data(damaged_corpus, tmp_path, monkeypatch, capsys,
                                                          single_thread):
    """Only a file's own problems are left out: a processor raising a ValueError (a bug) stops
    the run with its traceback and the example's id, and one raising a SpecError about the
    example (not about its file) is a clear error, under data.on_bad_example: skip."""
    from d2v_audio.processor import AudioProcessor

    root, _ = damaged_corpus
    real_read = AudioProcessor.read

    def read(self, example, kind=ValueError):
        if example.get("id") == "left/left_000":
            raise kind("index 3 is out of bounds")
        return real_read(self, example)

    monkeypatch.setattr(AudioProcessor, "read", read)
    overrides = _overrides(root, tmp_path / "a", "data.max_skipped_fraction=0.5")
    with pytest.raises(ValueError, match="index 3 is out of bounds") as caught:
        main(["run", str(SPEC), *overrides])
    assert any("left/left_000" in note for note in caught.value.__notes__)

    from d2v.api.errors import SpecError

    monkeypatch.setattr(AudioProcessor, "read", lambda self, example: read(self, example, SpecError))
    assert main(["run", str(SPEC), *_overrides(root, tmp_path / "b", "data.max_skipped_fraction=0.5")]) == 2
    err = capsys.readouterr().err
    assert "example 'left/left_000': index 3 is out of bounds (not an unreadable file" in err
