#!/usr/bin/env python
"""Generate the tiny synthetic corpora of d2v's audio task demos, in the real corpora's layouts.

    python experiments/data/make_audio_tasks_demo.py [--out experiments/data/audio_tasks_demo]

Writes three corpora under ``<out>`` (16 kHz mono 16-bit FLAC, espeak-ng voices as speakers):

* ``keywords/{train,valid}/<word>/*.flac`` -- keyword spotting in the ``audio_folder`` layout
  (Speech Commands-like): six command words, one word per clip.
* ``frames/{train,valid}/*.flac`` + ``frames/{train,valid}.tsv`` -- "who speaks when": 2 s
  clips of quiet background noise with two to four words, each said by speaker ``A`` (a male
  voice) or ``B`` (a female voice), plus an unlabelled noise burst as a distractor; segment
  manifests ``path, start, end, label`` for ``audio_segments``.
* ``speakers/wav/<speaker>/<video>/<utt>.flac`` + ``speakers/trials.txt`` -- speaker
  verification in VoxCeleb's layout: 40 speakers (espeak-ng accent x voice variant, each with
  its own pitch), four utterances each of the same pass phrase (text-dependent verification:
  only the voice differs); the 8 named in the trial list form the test split.

Deterministic: every random choice comes from a seeded ``random.Random`` (and numpy generators
seeded from it), espeak-ng runs with fixed settings, and resampling runs on one thread, so
re-running with the same espeak-ng version reproduces the files bit for bit. Waveform helpers
(espeak-ng call, resampling, silence trimming) are shared with ``make_speech_demo.py``.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_speech_demo import SAMPLE_RATE, synthesize  # noqa: E402

SEED = 20240917
LEVELS = [0.05, 0.07, 0.09]  # peak amplitude: quiet files compress well
SPEEDS_WPM = [140, 160, 180]
PITCH_JITTER = [-6, 0, 6]

# keyword spotting: words x voices, clips per (split, word)
KEYWORDS = ["yes", "no", "up", "down", "left", "right"]
KEYWORD_VOICES = ["en-us", "en-gb", "en+m3", "en+f3", "en+m7", "en-us+f2", "en-gb-scotland", "en-gb-x-rp+f4"]
KEYWORD_CLIPS = {"train": 20, "valid": 8}

# frame labels: two fixed speakers
FRAME_SPEAKERS = {"A": ("en-us+m3", 40), "B": ("en-us+f2", 65)}
FRAME_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "yes", "no", "stop", "go"]
FRAME_CLIPS = {"train": 48, "valid": 16}
FRAME_SECONDS = 2.0
NOISE_LEVEL = 0.0005  # background noise (std); bursts are 4x louder

# speaker verification: accent x voice variant = speaker, each with its own base pitch
ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp"]
VARIANTS = ["m1", "m2", "m3", "m4", "m6", "f1", "f2", "f4"]
TEST_SPEAKERS = 8
# text-dependent verification: every utterance is the same pass phrase, said at another speed
# and pitch, so only the voice tells speakers apart (not what was said)
PASS_PHRASE = "seven"
VIDEOS, UTTERANCES = 2, 2


def quiet(audio: np.ndarray, rng: random.Random) -> np.ndarray:
    return audio * (LEVELS[rng.randrange(len(LEVELS))] / max(float(np.abs(audio).max()), 1e-9))


def write(path: Path, audio: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(audio, -1, 1), SAMPLE_RATE, format="FLAC", subtype="PCM_16", compression_level=1.0)


def say(text: str, voice: str, pitch: int, rng: random.Random, workdir: Path) -> np.ndarray:
    wpm = SPEEDS_WPM[rng.randrange(len(SPEEDS_WPM))]
    return synthesize(text, voice, wpm, pitch, 0, workdir)


def make_keywords(out: Path, rng: random.Random, workdir: Path) -> None:
    for split, count in KEYWORD_CLIPS.items():
        for word in KEYWORDS:
            for i in range(count):
                voice = KEYWORD_VOICES[(i + (count if split == "valid" else 0)) % len(KEYWORD_VOICES)]
                pitch = 50 + PITCH_JITTER[rng.randrange(len(PITCH_JITTER))]
                audio = quiet(say(word, voice, pitch, rng, workdir), rng)
                write(out / "keywords" / split / word / f"{word}_{i:03d}.flac", audio)


def make_frames(out: Path, rng: random.Random, workdir: Path) -> None:
    total = int(FRAME_SECONDS * SAMPLE_RATE)
    for split, count in FRAME_CLIPS.items():
        lines = []
        for i in range(count):
            noise_rng = np.random.default_rng(rng.randrange(2**32))
            audio = noise_rng.normal(0.0, NOISE_LEVEL, total)
            # one unlabelled noise burst somewhere (a distractor for a pure energy detector)
            burst = int(rng.uniform(0.15, 0.4) * SAMPLE_RATE)
            at = rng.randrange(0, total - burst)
            audio[at:at + burst] += noise_rng.normal(0.0, 4 * NOISE_LEVEL, burst)
            cursor = int(rng.uniform(0.05, 0.3) * SAMPLE_RATE)
            segments = []
            for _ in range(rng.randint(2, 4)):
                label = rng.choice(sorted(FRAME_SPEAKERS))
                voice, pitch = FRAME_SPEAKERS[label]
                word = say(rng.choice(FRAME_WORDS), voice, pitch + PITCH_JITTER[rng.randrange(3)], rng, workdir)
                word = quiet(word, rng)
                if cursor + len(word) > total:
                    break
                audio[cursor:cursor + len(word)] += word
                segments.append((cursor / SAMPLE_RATE, (cursor + len(word)) / SAMPLE_RATE, label))
                cursor += len(word) + int(rng.uniform(0.05, 0.4) * SAMPLE_RATE)
            name = f"{split}/clip_{i:03d}.flac"
            write(out / "frames" / name, audio)
            lines += [f"{name}\t{s:.4f}\t{e:.4f}\t{label}" for s, e, label in segments] or [name]
        (out / "frames" / f"{split}.tsv").write_text("\n".join(lines) + "\n")


def make_speakers(out: Path, rng: random.Random, workdir: Path) -> None:
    pairs = [(a, v) for a in ACCENTS for v in VARIANTS]
    speakers = [(f"id{10001 + k}", accent, variant, 30 + (k * 37) % 50) for k, (accent, variant) in enumerate(pairs)]
    order = list(range(len(speakers)))
    rng.shuffle(order)
    test = sorted(speakers[k][0] for k in order[:TEST_SPEAKERS])
    utterances: dict[str, list[str]] = {}
    for speaker, accent, variant, pitch in speakers:
        for v in range(VIDEOS):
            video = f"video{v}"
            for u in range(UTTERANCES):
                audio = quiet(say(PASS_PHRASE, f"{accent}+{variant}", pitch + rng.randint(-4, 4), rng, workdir), rng)
                rel = f"{speaker}/{video}/{u:05d}.flac"
                write(out / "speakers" / "wav" / rel, audio)
                utterances.setdefault(speaker, []).append(rel)
    # trials: every pair of test utterances (target when the speaker is the same)
    pool = sorted(u for s in test for u in utterances[s])
    trials = [(int(a.split("/")[0] == b.split("/")[0]), a, b) for i, a in enumerate(pool) for b in pool[i + 1:]]
    (out / "speakers" / "trials.txt").write_text("".join(f"{t} {a} {b}\n" for t, a, b in trials))


def generate(out: Path) -> None:
    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng not found: install it (e.g. apt-get install -y espeak-ng) and re-run.")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        make_keywords(out, random.Random(SEED), workdir)
        make_frames(out, random.Random(SEED + 1), workdir)
        make_speakers(out, random.Random(SEED + 2), workdir)


def main(argv: list[str] | None = None) -> None:
    default = Path(__file__).resolve().parent / "audio_tasks_demo"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=default, help=f"output directory (default: {default})")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # resampling results must not depend on the thread count
    generate(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
