"""``d2v plot RUN_DIR...`` and ``d2v runs [DIR...]``: looking at finished (or running) runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_plot(args: argparse.Namespace) -> int:
    from d2v.use.plot import left_out, plot_runs
    from d2v.use.runs import load_run

    histories = [load_run(p) for p in args.runs]  # read once: for the figure and the note
    print(f"wrote {plot_runs(histories, args.output, everything=args.all)}")
    for metric in [] if args.all else left_out(histories):
        print(f"note: left out {metric}; --all draws it", file=sys.stderr)
    return 0


def _cmd_runs(args: argparse.Namespace) -> int:
    from d2v.api.errors import SpecError
    from d2v.use.runs import find_runs, load_run, render, run_table

    histories = []
    for folder in args.dirs:
        found = find_runs(folder)
        if not found:
            raise SpecError(f"no run directory under '{folder}' (a run directory holds metrics.jsonl: the "
                            f"trainer.output_dir of a d2v-run run).")
        histories.extend(load_run(p) for p in found)
    root = Path(args.dirs[0]) if len(args.dirs) == 1 else None  # run names relative to the one folder searched
    settings = args.settings if args.settings in ("auto", "none") else [s for s in args.settings.split(",") if s]
    metrics = [m for item in args.metric or [] for m in item.split(",") if m]
    table = run_table(histories, root=root, metrics=metrics or None, settings=settings,
                      sort=args.sort, reverse=args.reverse)
    sys.stdout.write(render(table, args.format))
    for note in table.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``plot`` and ``runs`` to the ``d2v`` command line."""
    p = subparsers.add_parser("plot", help="plot runs' loss, learning rate, grad norm, collapse statistics and "
                                           "evaluation metrics into one PNG (several runs overlaid)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (each holds metrics.jsonl)")
    p.add_argument("-o", "--output", default=None,
                   help="image file (default: RUN_DIR/metrics.png for one run, ./metrics.png for several)")
    p.add_argument("--all", action="store_true",
                   help="also plot every other value the training records carry (e.g. ema_decay, masked_frac)")
    p.set_defaults(fn=_cmd_plot)

    p = subparsers.add_parser("runs", help="a table of the runs under a folder: spec, steps, last metrics, wall time")
    p.add_argument("dirs", nargs="*", default=["runs"], metavar="DIR",
                   help="folders searched recursively for run directories (default: runs)")
    p.add_argument("--metric", action="append", metavar="NAME[,NAME]",
                   help="metric columns as <split>_<name>, e.g. valid_wer or train_loss (repeatable; default: the "
                        "training loss, target/prediction std and every evaluated metric)")
    p.add_argument("--settings", default="auto", metavar="auto|none|KEY[,KEY]",
                   help="spec settings shown as columns, e.g. optim.lr (auto: those that differ between the runs)")
    p.add_argument("--sort", default=None, metavar="COLUMN", help="sort by this column (e.g. valid_wer); runs "
                                                                  "without a value go last")
    p.add_argument("--reverse", action="store_true", help="sort in descending order")
    p.add_argument("--format", choices=("text", "markdown", "csv"), default="text",
                   help="markdown: a table to paste into docs; csv: raw values")
    p.set_defaults(fn=_cmd_runs)
