"""``d2v sensors synth OUT`` (added through the ``d2v_cli_commands`` hook): write the synthetic
activity corpus as files, ``OUT/<split>/<activity>/<id>.npy|csv``, the layout the
``sensor_folder`` dataset reads -- a template for arranging your own recordings."""

from __future__ import annotations

import argparse
from pathlib import Path

from d2v.api.errors import SpecError


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sensors", help="sensor time series: write the synthetic activity corpus")
    sub = p.add_subparsers(dest="sensors_command", required=True)
    s = sub.add_parser("synth", help="write synthetic 3-axis accelerometer recordings in class folders")
    s.add_argument("out", help="output directory (recordings go to OUT/<split>/<activity>/)")
    s.add_argument("--split", default="train", help="corpus split to write (default: train)")
    s.add_argument("--examples", type=int, default=60, help="number of recordings, classes interleaved (default: 60)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--format", choices=("npy", "csv"), default="npy")
    s.set_defaults(fn=synth)


def synth(args: argparse.Namespace) -> int:
    from d2v_sensors.datasets import SyntheticActivities
    from d2v_sensors.recordings import write_recording

    if args.examples < 1:
        raise SpecError(f"sensors synth: --examples must be a positive integer, got {args.examples}.")
    corpus = SyntheticActivities(split=args.split, num_examples=args.examples, seed=args.seed)
    base = Path(args.out) / args.split
    if base.exists() and any(base.iterdir()):
        raise SpecError(f"sensors synth: '{base}' exists and is not empty; choose another OUT or --split.")
    for i in range(len(corpus)):
        example = corpus[i]
        folder = base / corpus.label_names[example["label"]]
        folder.mkdir(parents=True, exist_ok=True)
        write_recording(folder / f"{example['id']}.{args.format}", example["signal"], header=["x", "y", "z"])
    labels = ", ".join(corpus.label_names)
    print(f"wrote {len(corpus)} recordings to {base}; read them with {{name: sensor_folder, root: {args.out}, "
          f"split: {args.split}, labels: [{labels}]}} (labels in the order of the head's label_names)")
    return 0
