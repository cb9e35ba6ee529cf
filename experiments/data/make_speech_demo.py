#!/usr/bin/env python
"""Generate d2v's tiny synthetic speech corpus in the real LibriSpeech on-disk layout.

    python experiments/data/make_speech_demo.py [--out experiments/data/speech_demo/LibriSpeech]

Writes ``<out>/{train-demo,dev-demo,test-demo}/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac``
with one ``<speaker>-<chapter>.trans.txt`` per chapter, plus ``SPEAKERS.TXT``, exactly as
LibriSpeech does, so the ``librispeech`` dataset reads it unchanged.

Utterances are 2-5 words from a closed 20-word vocabulary (the digits and ten short command
words) spoken by espeak-ng with a fixed table of voices, speeds and pitches, so that a tiny CTC
model trained from scratch on a CPU learns it within minutes. Everything is deterministic: the
sentences come from a seeded ``random.Random``, the voice of utterance i is fixed by i, and the
audio is 16 kHz mono 16-bit FLAC written with soundfile (espeak-ng's 22050 Hz output is
resampled with ``torchaudio.functional.resample``, its leading/trailing silence trimmed, and
its peak set to a quiet level drawn from LEVELS, which keeps the FLAC files small).
Re-running with the same espeak-ng version reproduces the files bit for bit.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

SEED = 20240501
SAMPLE_RATE = 16_000

DIGITS = ["ZERO", "ONE", "TWO", "THREE", "FOUR", "FIVE", "SIX", "SEVEN", "EIGHT", "NINE"]
COMMANDS = ["YES", "NO", "UP", "DOWN", "LEFT", "RIGHT", "STOP", "GO", "ON", "OFF"]
VOCABULARY = DIGITS + COMMANDS

# (LibriSpeech-style numeric speaker id, sex, espeak-ng voice). One voice = one "speaker".
SPEAKERS = [
    (1001, "M", "en-us"),
    (1002, "M", "en-gb"),
    (1003, "M", "en+m3"),
    (1004, "F", "en+f3"),
    (1005, "M", "en+m7"),
    (1006, "F", "en-us+f2"),
    (1007, "M", "en-gb-scotland"),
    (1008, "F", "en-gb-x-rp+f4"),
]
SPEEDS_WPM = [140, 150, 160, 170, 180, 190]
PITCHES = [35, 42, 50, 58, 65]  # espeak-ng -p (0-99, default 50)

# split name -> (number of utterances, chapter id used for every speaker in that split)
SPLITS = {"train-demo": (400, 100), "dev-demo": (60, 200), "test-demo": (60, 300)}

WORD_GAPS = [0, 2, 4, 6]    # espeak-ng -g: extra pause between words, in 10 ms units
LEVELS = [0.06, 0.08, 0.1, 0.12, 0.15]  # peak amplitude of the written file (quiet: smaller FLACs)

MIN_WORDS, MAX_WORDS = 2, 5
MIN_SECONDS, MAX_SECONDS = 1.0, 2.5  # renderings outside are re-drawn with one word more / less
TRIM_DB = -40.0             # silence threshold relative to the utterance peak
TRIM_FRAME = 160            # 10 ms analysis frames at 16 kHz
KEEP_MARGIN = 0.08          # seconds of silence kept before the first / after the last sound


def synthesize(text: str, voice: str, wpm: int, pitch: int, gap: int, workdir: Path) -> np.ndarray:
    """espeak-ng -> float32 waveform at SAMPLE_RATE (trimmed)."""
    wav = workdir / "utt.wav"
    # espeak-ng gets lower case so that no upper-case word is spelled out as an acronym.
    subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(wpm), "-p", str(pitch), "-g", str(gap), "-w", str(wav),
         text.lower()],
        check=True,
        capture_output=True,
    )
    audio, rate = sf.read(str(wav), dtype="float32", always_2d=True)
    audio = torch.from_numpy(audio.mean(axis=1))
    audio = torchaudio.functional.resample(audio, orig_freq=rate, new_freq=SAMPLE_RATE)
    return trim(audio.numpy())


def trim(audio: np.ndarray) -> np.ndarray:
    n_frames = len(audio) // TRIM_FRAME
    if n_frames == 0:
        return audio
    frames = audio[: n_frames * TRIM_FRAME].reshape(n_frames, TRIM_FRAME)
    rms = np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1) + 1e-12)
    loud = np.nonzero(20 * np.log10(rms / rms.max()) > TRIM_DB)[0]
    margin = int(KEEP_MARGIN * SAMPLE_RATE)
    start = max(0, loud[0] * TRIM_FRAME - margin)
    stop = min(len(audio), (loud[-1] + 1) * TRIM_FRAME + margin)
    return audio[start:stop]


def draw_sentence(rng: random.Random, used: set[str], n_words: int) -> str:
    """A new random sentence (no transcript appears twice in the whole corpus)."""
    while True:
        sentence = " ".join(rng.choice(VOCABULARY) for _ in range(n_words))
        if sentence not in used:
            return sentence


def render(rng: random.Random, used: set[str], voice: str, workdir: Path) -> tuple[str, np.ndarray]:
    """Draw a sentence and its speaking style; re-draw until it lasts MIN..MAX_SECONDS."""
    n_words = rng.randint(MIN_WORDS, MAX_WORDS)
    while True:
        sentence = draw_sentence(rng, used, n_words)
        wpm = SPEEDS_WPM[rng.randrange(len(SPEEDS_WPM))]
        pitch = PITCHES[rng.randrange(len(PITCHES))]
        gap = WORD_GAPS[rng.randrange(len(WORD_GAPS))]
        audio = synthesize(sentence, voice, wpm, pitch, gap, workdir)
        seconds = len(audio) / SAMPLE_RATE
        if seconds < MIN_SECONDS and n_words < MAX_WORDS:
            n_words += 1
        elif seconds > MAX_SECONDS and n_words > MIN_WORDS:
            n_words -= 1
        else:
            used.add(sentence)
            level = LEVELS[rng.randrange(len(LEVELS))]
            return sentence, audio * (level / max(float(np.abs(audio).max()), 1e-9))


def generate(out: Path) -> None:
    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng not found: install it (e.g. apt-get install -y espeak-ng) and re-run.")
    rng = random.Random(SEED)
    used: set[str] = set()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    minutes: dict[tuple[int, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for split, (count, chapter) in SPLITS.items():
            transcripts: dict[int, list[str]] = {spk: [] for spk, _, _ in SPEAKERS}
            for i in range(count):
                speaker, _, voice = SPEAKERS[i % len(SPEAKERS)]
                sentence, audio = render(rng, used, voice, workdir)
                utt_id = f"{speaker}-{chapter}-{len(transcripts[speaker]):04d}"
                chapter_dir = out / split / str(speaker) / str(chapter)
                chapter_dir.mkdir(parents=True, exist_ok=True)
                sf.write(str(chapter_dir / f"{utt_id}.flac"), audio, SAMPLE_RATE,
                         format="FLAC", subtype="PCM_16", compression_level=1.0)
                transcripts[speaker].append(f"{utt_id} {sentence}")
                minutes[(speaker, split)] = minutes.get((speaker, split), 0.0) + len(audio) / SAMPLE_RATE / 60
            for speaker, lines in transcripts.items():
                if lines:
                    path = out / split / str(speaker) / str(chapter) / f"{speaker}-{chapter}.trans.txt"
                    path.write_text("\n".join(lines) + "\n")
    with open(out / "SPEAKERS.TXT", "w") as f:
        f.write("; Synthetic speakers of d2v's speech demo corpus (espeak-ng voices)\n")
        f.write("; ID      |SEX| SUBSET           |MINUTES| NAME\n")
        for speaker, sex, voice in SPEAKERS:
            for split in SPLITS:
                f.write(f"{speaker:<9}| {sex} | {split:<17}| {minutes.get((speaker, split), 0.0):5.2f} "
                        f"| espeak-ng {voice}\n")


def main(argv: list[str] | None = None) -> None:
    default = Path(__file__).resolve().parent / "speech_demo" / "LibriSpeech"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=default, help=f"output directory (default: {default})")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # resampling results must not depend on the thread count
    generate(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
