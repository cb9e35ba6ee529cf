"""Every demo spec trained on one device (bf16 on a GPU, eager and compiled), then predict and export.

Each fine-tuning and pretraining demo trains for a few hundred updates, without and with
``trainer.compile``, and each fine-tuned model then predicts and exports.

    python benchmarks/gpu_check.py --device cuda --write-docs       # the GPU check (under 8 minutes on an H100)
    python benchmarks/gpu_check.py --device cpu --steps 2 --compile none --only asr_demo,pretrain2_text_demo

The CPU tests run every demo at CPU size; what only a GPU shows (bf16, ``trainer.compile``, pinned
non-blocking copies, CUDA memory) is checked here, on the demo specs of ``experiments/`` exactly as
shipped, apart from these overrides: ``--steps`` updates, no evaluation until the end, no
checkpoints until the end, a log line every tenth of the run, ``trainer.mixed_precision`` bf16 on
CUDA and ``no`` on the CPU (with ``trainer.cpu=true``), ``trainer.compile`` off and/or on.

Each run is its own process (``d2v run SPEC key=value ...`` through :func:`d2v.cli.main.main`, inside a
small wrapper that reads the process's peak memory, which the runner does not log), so a crash
stops one row and not the table. After a fine-tuning run, ``d2v predict RUN_DIR INPUT...`` on demo
inputs and ``d2v export RUN_DIR --onnx`` must both succeed. Measured per run, from its
``metrics.jsonl``: updates/s and examples/s after the first logging window (CUDA warm-up and
compilation happen there), the final validation metric; peak memory is ``max_memory_allocated`` on
CUDA and the training process's peak RSS on the CPU.

Runs start most informative first (each modality's fine-tuning and data2vec 2.0 pretraining, then
1.0 pretraining, then the compiled variants, then the other task demos) and none starts when its
estimated time would overrun ``--budget-s``; those are listed as "not run: budget". One Markdown
table goes to stdout (a JSON line per run before it); ``--write-docs`` puts it into this device's
marked block of docs/performance.md. Exit status 1 when a run, prediction or export failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
SPEECH = "experiments/data/speech_demo/LibriSpeech/test-demo/1001/300"
KEYWORDS = "experiments/data/audio_tasks_demo/keywords/valid"
SHAPES = "experiments/data/vision_demo/shapes/valid"
SEGMENTS = "experiments/data/vision_demo/ADEChallengeData2016/images/validation"
#: seconds a run may go past --budget-s before it is stopped (so the whole check stays under 8 minutes)
GRACE_S = 20
#: how much longer a compiled run is guessed to take than the same spec eager, until one has been timed
COMPILE_FACTOR = 2.0


@dataclasses.dataclass(frozen=True)
class Demo:
    """A demo spec and what the check does with it."""

    spec: str                         # experiments/<spec>.yaml
    task: str                         # the table's "task" column
    metric: str                       # the main metric of its final validation record
    predict: tuple[str, ...] = ()     # d2v predict arguments after RUN_DIR; none for pretraining
    extra: bool = False               # another task of an already covered modality: runs last

    @property
    def finetune(self) -> bool:
        return bool(self.predict)


DEMOS = (  # each group in the order it runs (see plan)
    Demo("asr_demo", "speech recognition (CTC)", "wer",
         (f"{SPEECH}/1001-300-0000.flac", f"{SPEECH}/1001-300-0001.flac")),
    Demo("sst2_demo", "sentence classification", "accuracy",
         ("--text", "the film seems truly wonderful .", "--text", "the director 's work was quite terrible .")),
    Demo("vision_cls_demo", "image classification", "accuracy",
         (f"{SHAPES}/circle/000.png", f"{SHAPES}/square/000.png")),
    Demo("pretrain2_audio_demo", "data2vec 2.0 pretraining, audio", "loss"),
    Demo("pretrain2_text_demo", "data2vec 2.0 pretraining, text", "loss"),
    Demo("pretrain2_vision_demo", "data2vec 2.0 pretraining, vision", "loss"),
    Demo("pretrain_audio_demo", "data2vec 1.0 pretraining, audio", "loss"),
    Demo("pretrain_text_demo", "data2vec 1.0 pretraining, text", "loss"),
    Demo("pretrain_vision_demo", "data2vec 1.0 pretraining, vision", "loss"),
    Demo("keywords_demo", "audio classification", "accuracy",
         (f"{KEYWORDS}/yes/yes_000.flac", f"{KEYWORDS}/no/no_000.flac"), extra=True),
    Demo("ner_demo", "token classification (NER)", "f1",
         ("--text", "The mayor of Nairobi met Nina on Thursday .", "--text", "Laura Weber works in Oslo ."),
         extra=True),
    Demo("squad_demo", "question answering", "f1",
         ("--question", "What is the job of Laura Weber?", "--text",
          "Laura Weber was born in Osaka in 1955. She works for Green Leaf Foods as a lawyer."), extra=True),
    Demo("vision_seg_demo", "semantic segmentation", "mIoU",
         (f"{SEGMENTS}/circle_000.jpg", f"{SEGMENTS}/circle_001.jpg"), extra=True),
)


@dataclasses.dataclass
class Row:
    """One run's line of the table."""

    demo: Demo
    compiled: bool
    train: str = "not run: budget"  # then ok, failed (exit N) or timeout, as predict and export
    updates: int | None = None
    updates_per_s: float | None = None
    examples_per_s: float | None = None
    peak_mb: float | None = None
    metric: tuple[str, float] | None = None   # (name, value) of the final validation record
    predict: str = "-"
    export: str = "-"
    seconds: float | None = None

    @property
    def name(self) -> str:
        return self.demo.spec + ("-compiled" if self.compiled else "")

    @property
    def steps(self) -> tuple[tuple[str, str], ...]:
        return ("train", self.train), ("predict", self.predict), ("export", self.export)

    @property
    def failed(self) -> bool:
        return any(result.startswith(("failed", "timeout")) for _, result in self.steps)

    @property
    def status(self) -> str:
        """``ok``, ``not run: budget``, or each step that did not pass (not predict and export skipped
        because training failed: that is said once)."""
        if self.train.startswith("not run"):
            return self.train
        problems = [f"{what} {result}" for what, result in self.steps if result not in ("ok", "-", "not run")]
        return ", ".join(problems) or "ok"


# --------------------------------------------------------------------------- plan and budget


def plan(demos: list[Demo], variants: list[bool]) -> list[Row]:
    """The runs, most informative first: the core demos eager, then compiled, then the extra tasks."""
    core = [d for d in demos if not d.extra]
    extra = [d for d in demos if d.extra]
    return [Row(demo, compiled) for group in (core, extra) for compiled in variants for demo in group]


def estimate_s(row: Row, done: list[Row]) -> float:
    """A guess of how long ``row`` will take, from the runs so far: the same spec's time (scaled by
    the compiled / eager ratio seen so far when only its other variant ran), else their median."""
    timed = [r for r in done if r.seconds is not None]
    same = {r.compiled: r.seconds for r in timed if r.demo == row.demo}
    if row.compiled in same:
        return same[row.compiled]
    if same:
        pairs = [(c.seconds, e.seconds) for c in timed if c.compiled for e in timed
                 if not e.compiled and e.demo == c.demo]
        ratio = max((c / e for c, e in pairs), default=COMPILE_FACTOR)
        return same[not row.compiled] * (ratio if row.compiled else 1 / ratio)
    return statistics.median(r.seconds for r in timed) if timed else 0.0


# --------------------------------------------------------------------------- one run


def run_overrides(run_dir: Path, steps: int, device: str, compiled: bool, extra: list[str]) -> list[str]:
    """What every run changes in its demo spec (see the module docstring)."""
    precision = "bf16" if device == "cuda" else "no"
    return [f"trainer.output_dir={run_dir}", f"trainer.max_steps={steps}", f"trainer.log_every={max(1, steps // 10)}",
            "trainer.progress_bar=false", "trainer.eval_every=0", "trainer.eval_before_training=false",
            "trainer.save_every=0", f'trainer.mixed_precision="{precision}"',  # quoted: YAML reads a bare no as false
            f"trainer.compile={str(compiled).lower()}", *(["trainer.cpu=true"] if device == "cpu" else []), *extra]


def call(cmd: list[str], log: Path, deadline: float) -> str:
    """Run ``cmd`` from the repository root (the demo specs name their data relative to it), output
    into ``log``; ``ok``, ``failed (exit N)``, ``timeout`` (killed at the check's deadline) or
    ``not run: budget`` (the deadline had passed)."""
    if deadline - time.monotonic() < 1:
        return "not run: budget"
    with log.open("w") as out:
        try:
            code = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=deadline - time.monotonic()).returncode
        except subprocess.TimeoutExpired:
            return "timeout"
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        print(f"--- {log} (last lines)\n" + "\n".join(tail), file=sys.stderr)
    return "ok" if code == 0 else f"failed (exit {code})"


def d2v_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "d2v.cli", *args]


def predicted(results: Path, status: str) -> str:
    """``d2v predict`` passed when it exited 0 and wrote a result, and no line is an error."""
    if status != "ok":
        return status
    lines = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    if not lines or any("error" in line for line in lines):
        print(f"--- {results}: {lines}", file=sys.stderr)
        return "failed (no result)" if not lines else "failed (input error)"
    return "ok"


def train_and_measure(row: Row, folder: Path, args: argparse.Namespace, deadline: float) -> None:
    """Train ``row``'s demo in a wrapper process, then (fine-tuning) predict and export; fills ``row``."""
    folder.mkdir(parents=True)
    run_dir, report = folder / "run", folder / "peak.json"
    cmd = [sys.executable, __file__, "--device", args.device, "--run-spec", str(report),
           str(EXPERIMENTS / f"{row.demo.spec}.yaml"),
           *run_overrides(run_dir, args.steps, args.device, row.compiled, args.override)]
    start = time.monotonic()
    row.train = call(cmd, folder / "train.log", deadline)
    if (run_dir / "metrics.jsonl").exists():
        try:
            read_metrics(row, run_dir)
        except (KeyError, TypeError, ValueError) as exc:  # records of another shape: the numbers stay "-"
            print(f"--- {run_dir / 'metrics.jsonl'}: cannot read its records ({exc!r})", file=sys.stderr)
    if report.exists():
        row.peak_mb = json.loads(report.read_text())["peak_mb"]
    if row.train == "ok" and row.demo.finetune:
        results = folder / "predict" / "results.jsonl"
        row.predict = predicted(results, call(
            d2v_command("predict", str(run_dir), *row.demo.predict, "--device", args.device, "--out", str(results)),
            folder / "predict.log", deadline))
        row.export = call(d2v_command("export", str(run_dir), "--onnx", str(folder / "export" / "model.onnx")),
                          folder / "export.log", deadline)
    elif row.demo.finetune:
        row.predict = row.export = "not run"
    row.seconds = round(time.monotonic() - start, 1)


def read_metrics(row: Row, run_dir: Path) -> None:
    """Throughput after the first logging window and the final validation metric, from metrics.jsonl.

    The train records' time stamps bound each window; examples/s is the windows' own rate weighted
    by their length."""
    from d2v.use.runs import load_run

    history = load_run(run_dir)
    train = sorted((r for r in history.records if r["split"] == "train"), key=lambda r: r["step"])
    row.updates = train[-1]["step"] if train else None
    windows = [(b["time"] - a["time"], b) for a, b in zip(train, train[1:])]
    seconds = sum(s for s, _ in windows)
    if seconds > 0:
        row.updates_per_s = (train[-1]["step"] - train[0]["step"]) / seconds
        row.examples_per_s = sum(s * r["examples_per_second"] for s, r in windows) / seconds
    elif train:  # a single window: its own rate, compilation included
        row.examples_per_s = train[-1]["examples_per_second"]
    final = history.last("valid") or {}
    name = row.demo.metric if row.demo.metric in final else "loss"  # a head that logs other names: its loss
    if name in final:
        row.metric = (name, float(final[name]))


def run_spec_measured(device: str, report: Path, argv: list[str]) -> int:
    """``d2v run ARGV`` in this process, then its peak memory into ``report``: the runner does not
    log memory, and only the process that trained can read its own peak (from zero: a fresh process)."""
    import torch

    from d2v.cli.main import main as d2v_main

    code = d2v_main(["run", *argv])
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:  # Linux reports kilobytes; the training process only (not its loader workers)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report.write_text(json.dumps({"peak_mb": round(peak_mb, 1)}))
    return code


# --------------------------------------------------------------------------- report


def _number(value: float | int | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[Row]) -> str:
    lines = ["| spec | task | compile | updates | updates/s | examples/s | peak memory (MB) | final metric | "
             "predict | export | status |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- | --- |"]
    for r in rows:
        metric = "-" if r.metric is None else f"{r.metric[0]} {r.metric[1]:.4g}"
        lines.append(f"| {r.demo.spec} | {r.demo.task} | {'on' if r.compiled else 'off'} | {_number(r.updates, 0)} | "
                     f"{_number(r.updates_per_s, 2)} | {_number(r.examples_per_s, 1)} | {_number(r.peak_mb, 0)} | "
                     f"{metric} | {r.predict} | {r.export} | {r.status} |")
    return "\n".join(lines) + "\n"


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.machine()} CPU, {os.cpu_count()} cores"


def docs_block(rows: list[Row], args: argparse.Namespace, wall_s: float) -> str:
    """The table with what produced it: machine, date, settings and the total wall time."""
    import torch

    precision = "bf16" if args.device == "cuda" else "fp32"
    flags = (f" --only {args.only}" if args.only else "") + "".join(f" --override {o}" for o in args.override)
    header = (f"{device_name(args.device)}, {datetime.date.today().isoformat()}, torch {torch.__version__}: "
              f"`python benchmarks/gpu_check.py --device {args.device} --steps {args.steps} --compile {args.compile} "
              f"--budget-s {args.budget_s:g}{flags} --write-docs`, {precision}, {wall_s:.0f} s in all. Peak memory: "
              + ("`torch.cuda.max_memory_allocated`." if args.device == "cuda" else "the training process's peak RSS."))
    return f"{header}\n\n{markdown(rows)}"


def write_docs(block: str, device: str, path: Path | None = None) -> None:
    """Replace this device's block of docs/performance.md (appended the first time)."""
    from docs_blocks import DOC, replace_block

    replace_block(f"gpu-check-{device}", block, heading=f"## Every demo on one device ({device})", path=path or DOC)


# --------------------------------------------------------------------------- command line


def select(only: str | None) -> list[Demo]:
    """The demos whose spec exists, or those named by ``--only``."""
    present = [d for d in DEMOS if (EXPERIMENTS / f"{d.spec}.yaml").exists()]
    if not only:
        return present
    names = [n.strip().removesuffix(".yaml") for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in {d.spec for d in present}]
    if unknown:
        sys.exit(f"--only: unknown demo(s) {', '.join(unknown)}; choose from {', '.join(d.spec for d in present)}")
    return [d for d in present if d.spec in names]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=200, help="optimizer updates per run")
    parser.add_argument("--compile", choices=("none", "on", "both"), default="both",
                        help="trainer.compile: off, on, or each run both ways")
    parser.add_argument("--only", default=None, metavar="SPEC[,SPEC]", help="only these demos (default: all)")
    parser.add_argument("--out", default=None, help="where runs, logs and exports go (default: a new temporary folder)")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="start no run that would end after this many seconds from the start")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="one more spec override for every run (repeatable), e.g. data.loader.num_workers=4")
    parser.add_argument("--write-docs", action="store_true", help="put the table into its block of docs/performance.md")
    parser.add_argument("--run-spec", nargs="+", metavar=("REPORT", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no GPU is available here")
    if args.steps < 1:
        parser.error("--steps: at least 1")
    return args


def output_folder(out: str | None) -> Path:
    if out is None:
        return Path(tempfile.mkdtemp(prefix="d2v-gpu-check-"))
    folder = Path(out).resolve()
    if folder.exists() and any(folder.iterdir()):
        sys.exit(f"--out {out}: not empty; give a new folder (each run needs a fresh output directory)")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run_spec:
        report, *run_argv = args.run_spec
        return run_spec_measured(args.device, Path(report), run_argv)
    demos = select(args.only)
    variants = {"none": [False], "on": [True], "both": [False, True]}[args.compile]
    out = output_folder(args.out)
    print(f"gpu_check: {args.device}, runs and logs in {out}", file=sys.stderr)
    rows, done = plan(demos, variants), []
    start = time.monotonic()
    deadline = start + args.budget_s + GRACE_S
    for row in rows:
        if time.monotonic() - start + estimate_s(row, done) > args.budget_s:
            continue
        train_and_measure(row, out / row.name, args, deadline)
        done.append(row)
        print(json.dumps({"run": row.name, "status": row.status, "seconds": row.seconds, "updates": row.updates,
                          "updates_per_s": row.updates_per_s, "examples_per_s": row.examples_per_s,
                          "peak_mb": row.peak_mb, "final_metric": row.metric, "predict": row.predict,
                          "export": row.export}), flush=True)
    print(markdown(rows))
    if args.write_docs:
        write_docs(docs_block(rows, args, time.monotonic() - start), args.device)
    return 1 if any(r.failed for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
