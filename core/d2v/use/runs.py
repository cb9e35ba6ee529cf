"""Run directories as data: find them under a folder, read what a run logged
(``metrics.jsonl``, ``spec.yaml``), and compare runs side by side in one table (``d2v runs``).

A run directory is any folder holding a ``metrics.jsonl`` (a ``trainer.output_dir`` of
``d2v-run``). Its records are ``{"split": ..., "step": ..., <numbers>}``; events
(``start``, ``resume``, ``skipped_update``, ``preempted``, ...) carry ``"event"`` instead.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from d2v.api.errors import SpecError
from d2v.api.registry import did_you_mean

METRICS_FILE = "metrics.jsonl"
SKIPPED_FILE = "skipped.tsv"
#: record fields that say where a value belongs rather than what was measured
BOOKKEEPING = ("split", "step", "epoch", "time")
#: spec settings every run sets differently on purpose: never a "varying setting" worth a column
UNINTERESTING_SETTINGS = ("trainer.output_dir", "description", "trainer.progress_bar", "trainer.trackers",
                          "trainer.resume")
#: the collapse statistics of self-supervised targets (see docs/pretraining.md)
COLLAPSE_STATS = ("target_std", "pred_std")


# --------------------------------------------------------------------------- one run


@dataclass
class RunHistory:
    """What one run directory logged: its records (one per split and step: when a step was
    logged twice, e.g. around a resume, the later record wins), its events and its spec."""

    path: Path
    records: list[dict[str, Any]]
    events: list[dict[str, Any]]
    spec: dict[str, Any]
    #: lines that are not JSON objects (e.g. one cut short when the process was killed)
    unreadable_lines: int = 0
    #: (time of the session's first line, time of its last line) per session (start or resume)
    sessions: list[tuple[float, float]] = field(default_factory=list)

    def splits(self) -> list[str]:
        return list(dict.fromkeys(r["split"] for r in self.records))

    def metric_names(self, split: str) -> list[str]:
        """Numeric fields logged for ``split``, in the order they first appear."""
        names: dict[str, None] = {}
        for record in self.records:
            if record["split"] == split:
                names.update((k, None) for k, v in record.items() if k not in BOOKKEEPING and _is_number(v))
        return list(names)

    def series(self, split: str, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of ``key`` in ``split``'s records that have a step, by step."""
        points = sorted((r["step"], float(r[key])) for r in self.records
                        if r["split"] == split and isinstance(r.get("step"), int) and _is_number(r.get(key)))
        return [s for s, _ in points], [v for _, v in points]

    def last(self, split: str) -> dict[str, Any] | None:
        """The split's record of the highest step (for a split logged without steps, such as
        an ``evaluate`` task's, the last one written)."""
        mine = [r for r in self.records if r["split"] == split]
        if not mine:
            return None
        with_step = [r for r in mine if isinstance(r.get("step"), int)]
        return max(with_step, key=lambda r: r["step"]) if with_step else mine[-1]

    @property
    def steps(self) -> int | None:
        """The last optimizer step logged (training records first, any record otherwise)."""
        for candidates in ([r for r in self.records if r["split"] == "train"], self.records):
            steps = [r["step"] for r in candidates if isinstance(r.get("step"), int)]
            if steps:
                return max(steps)
        return None

    @property
    def task(self) -> str | None:
        if self.spec and self.spec.get("task"):
            return self.spec["task"]
        return "evaluate" if self.evaluations else None

    @property
    def spec_name(self) -> str | None:
        """The spec file the run was started from (its ``start`` or ``evaluate`` event), without ``.yaml``."""
        for event in self.events:
            source = event.get("spec") if event.get("event") in ("start", "evaluate") else None
            if isinstance(source, str) and source.endswith((".yaml", ".yml")):
                return Path(source).stem
        return None

    @property
    def evaluations(self) -> list[dict[str, Any]]:
        """The ``evaluate`` events: which checkpoint was evaluated on which split, and when."""
        return [e for e in self.events if e.get("event") == "evaluate"]

    @property
    def resume_steps(self) -> list[int]:
        return [e["step"] for e in self.events if e.get("event") == "resume" and isinstance(e.get("step"), int)]

    @property
    def wall_seconds(self) -> float | None:
        """Time spent running: each session (fresh start or resume) from its first line to its
        last, summed. ``None`` for runs logged before records carried a ``time``."""
        return sum(end - begin for begin, end in self.sessions) if self.sessions else None

    @property
    def skipped(self) -> int:
        """Examples the run left out as unusable (each file once per split), from its
        ``skipped.tsv`` (see ``data.max_skipped_fraction``)."""
        path = self.path / SKIPPED_FILE
        if not path.is_file():
            return 0
        rows = (line.split("\t")[:2] for line in path.read_text(errors="replace").splitlines() if line.strip())
        return len({tuple(row) for row in rows})

    @property
    def status(self) -> str:
        """``done`` (final weights written, or an evaluation's ``<split>_metrics.json``),
        ``preempted`` (stopped by a signal after saving: resume it) or ``unfinished`` (still
        running, killed, or stopped by an error)."""
        if (self.path / "final").is_dir() or any(self.path.glob("*_metrics.json")):
            return "done"
        last_event = self.events[-1].get("event") if self.events else None
        return "preempted" if last_event == "preempted" else "unfinished"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def run_directory(path: str | Path) -> Path:
    """``path`` as a run directory (a ``metrics.jsonl`` file names its directory); anything
    else is a SpecError that says what a run directory is, and points at runs below ``path``."""
    path = Path(path)
    if path.is_file() and path.name == METRICS_FILE:
        return path.parent
    if not path.exists():
        raise SpecError(f"'{path}' does not exist (looked at {path.resolve()}). Give a run directory: the "
                        f"trainer.output_dir of a d2v-run run, which holds {METRICS_FILE}.")
    if not (path / METRICS_FILE).is_file():
        below = find_runs(path) if path.is_dir() else []
        hint = (f" It holds {len(below)} run(s) below it, e.g. {', '.join(str(p) for p in below[:3])}; give those "
                f"(`d2v runs {path}` lists them all)." if below else
                " Give the trainer.output_dir of a d2v-run run.")
        raise SpecError(f"'{path}' is not a run directory: it has no {METRICS_FILE}.{hint}")
    return path


def load_run(path: str | Path) -> RunHistory:
    """Read a run directory's ``metrics.jsonl`` (and ``spec.yaml`` when present)."""
    path = run_directory(path)
    by_key: dict[tuple, dict[str, Any]] = {}
    events: list[dict[str, Any]] = []
    sessions: list[list[float]] = []
    unreadable = 0
    for number, line in enumerate((path / METRICS_FILE).read_text(errors="replace").splitlines()):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        if not isinstance(entry, dict):
            unreadable += 1
            continue
        moment = entry.get("time")
        if _is_number(moment):
            if entry.get("event") in ("start", "resume", "evaluate") or not sessions:
                sessions.append([moment, moment])
            sessions[-1][1] = moment
        if "event" in entry:  # some events name a split too (data_warning)
            events.append(entry)
        elif isinstance(entry.get("split"), str):
            step = entry.get("step")
            key = (entry["split"], step) if isinstance(step, int) else (entry["split"], None, number)
            by_key.pop(key, None)  # a step logged again (e.g. redone after a resume): the later one counts
            by_key[key] = entry
    return RunHistory(path=path, records=list(by_key.values()), events=events, spec=_read_spec(path),
                      unreadable_lines=unreadable, sessions=[(b, e) for b, e in sessions])


def _read_spec(path: Path) -> dict[str, Any]:
    spec_file = path / "spec.yaml"
    if not spec_file.is_file():
        return {}
    try:
        spec = yaml.safe_load(spec_file.read_text())
    except yaml.YAMLError:
        return {}
    return spec if isinstance(spec, dict) else {}


def find_runs(root: str | Path) -> list[Path]:
    """Every run directory at or below ``root`` (a grid of runs, e.g. ``runs/grid/*``), sorted
    by path. Symbolic links to directories are not followed (no loops)."""
    root = Path(root)
    if not root.is_dir():
        raise SpecError(f"'{root}' is not a directory (looked at {root.resolve()}); give the folder that holds "
                        f"your run directories, e.g. runs.")
    found = []
    for folder, subfolders, files in os.walk(root):
        if METRICS_FILE in files:
            found.append(Path(folder))
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
    return sorted(found)


# --------------------------------------------------------------------------- the table


@dataclass
class RunTable:
    """Rows of plain values (numbers stay numbers until formatted), one per run."""

    columns: list[str]
    rows: list[list[Any]]
    #: things the reader should know that are not cells (printed apart from the table)
    notes: list[str] = field(default_factory=list)


FIXED_COLUMNS = ("run", "spec", "task", "status", "steps")


def metric_columns(histories: list[RunHistory]) -> dict[str, tuple[str, str]]:
    """Every ``<split>_<name>`` a run's last records can fill, e.g. ``valid_wer``."""
    columns: dict[str, tuple[str, str]] = {}
    for history in histories:
        for split in history.splits():
            for name in history.metric_names(split):
                columns.setdefault(f"{split}_{name}", (split, name))
    return columns


def default_metrics(available: dict[str, tuple[str, str]]) -> list[str]:
    """The training loss, the collapse statistics (pretraining) and every evaluated metric."""
    chosen = [c for c in ("train_loss", *(f"train_{s}" for s in COLLAPSE_STATS)) if c in available]
    return chosen + [c for c, (split, _) in available.items() if split != "train"]


def flat_settings(spec: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-3}}`` -> ``{"optim.lr": 1e-3}`` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in spec.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flat_settings(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def varying_settings(histories: list[RunHistory]) -> list[str]:
    """Spec settings whose value is not the same in every run that saved its spec."""
    specs = [flat_settings(h.spec) for h in histories if h.spec]
    if len(specs) < 2:
        return []
    names = list(dict.fromkeys(k for spec in specs for k in spec))
    return [n for n in names if n not in UNINTERESTING_SETTINGS
            and len({json.dumps(s.get(n), sort_keys=True, default=str) for s in specs}) > 1]


#: with more varying settings than this, ``--settings auto`` shows none (runs of unrelated specs)
MAX_AUTO_SETTINGS = 6


def _pick(names: list[str], available: list[str], option: str) -> list[str]:
    unknown = [n for n in names if n not in available]
    if unknown:
        shown = ", ".join(available) if available else "(none: no run logged anything yet)"
        raise SpecError(f"{option} {unknown[0]}: no run has it{did_you_mean(unknown[0], available) or '.'} "
                        f"Available: {shown}.")
    return names


def run_table(histories: list[RunHistory], *, root: Path | None = None, metrics: list[str] | None = None,
              settings: str | list[str] = "auto", sort: str | None = None, reverse: bool = False) -> RunTable:
    """One row per run: where it is, its spec and task, how far it got, chosen spec settings,
    the last value of each chosen metric, and its wall time.

    ``metrics``: ``<split>_<name>`` columns (default: :func:`default_metrics`).
    ``settings``: ``"auto"`` (the settings that differ between runs, when few do), ``"none"``,
    or dotted spec keys such as ``["optim.lr"]``. ``sort``: any column name; runs missing the
    value go last.
    """
    available = metric_columns(histories)
    metric_names = _pick(metrics, list(available), "--metric") if metrics else default_metrics(available)
    notes = []
    if settings == "auto":
        varying = varying_settings(histories)
        setting_names = varying if len(varying) <= MAX_AUTO_SETTINGS else []
        if len(varying) > MAX_AUTO_SETTINGS:
            notes.append(f"{len(varying)} spec settings differ between these runs (e.g. {', '.join(varying[:3])}); "
                         f"show chosen ones with --settings KEY,KEY")
    elif settings == "none":
        setting_names = []
    else:
        known = list(dict.fromkeys(k for h in histories for k in flat_settings(h.spec)))
        setting_names = _pick(list(settings), known, "--settings")
    skipped = any(history.skipped for history in histories)  # a column once any run left examples out
    columns = [*FIXED_COLUMNS, *(["skipped"] if skipped else []), *setting_names, *metric_names, "wall_time"]
    rows = []
    for history in histories:
        spec = flat_settings(history.spec)
        last = {split: history.last(split) or {} for split in history.splits()}
        row = [_run_name(history.path, root), history.spec_name, history.task, history.status,
               history.steps, *([history.skipped] if skipped else []), *(spec.get(s) for s in setting_names),
               *(last.get(available[m][0], {}).get(available[m][1]) for m in metric_names), history.wall_seconds]
        rows.append(row)
        if history.unreadable_lines:
            notes.append(f"{history.path / METRICS_FILE}: {history.unreadable_lines} unreadable line(s) skipped")
        notes += [_evaluation_note(row[0], event) for event in history.evaluations]
    if sort is not None:
        index = columns.index(_pick([sort], columns, "--sort")[0])
        present = [r for r in rows if r[index] is not None]
        missing = [r for r in rows if r[index] is None]
        present.sort(key=lambda r: _sort_key(r[index]), reverse=reverse)
        rows = present + missing
    return RunTable(columns=columns, rows=rows, notes=notes)


def _evaluation_note(name: str, event: dict[str, Any]) -> str:
    moment = event.get("time")
    when = time.strftime(" on %Y-%m-%d %H:%M UTC", time.gmtime(moment)) if _is_number(moment) else ""
    return f"{name}: evaluated {event.get('checkpoint') or 'the model in its spec'} on the {event.get('split')} split{when}"


def _run_name(path: Path, root: Path | None) -> str:
    """The run's path below the folder searched (its own name when it is that folder)."""
    if root is None or not path.is_relative_to(root):
        return str(path)
    return str(path.relative_to(root)) if path != root else path.resolve().name


def _sort_key(value: Any) -> tuple:
    return (0, float(value), "") if _is_number(value) else (1, 0.0, str(value))


# --------------------------------------------------------------------------- formatting


def format_value(value: Any, column: str = "") -> str:
    if value is None:
        return "-"
    if column == "wall_time" and _is_number(value):
        return format_duration(float(value))
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def format_duration(seconds: float) -> str:
    """``0.42`` -> ``0.4s``; ``75`` -> ``1m15s``; ``7500`` -> ``2h05m``."""
    if seconds < 9.95:  # a short evaluation is not "0s"
        return f"{seconds:.1f}s"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _numeric_column(table: RunTable, index: int) -> bool:
    values = [row[index] for row in table.rows if row[index] is not None]
    return bool(values) and all(_is_number(v) for v in values)


def render(table: RunTable, fmt: str = "text") -> str:
    """The table as aligned ``text``, a ``markdown`` pipe table, or ``csv`` (raw values)."""
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(table.columns)
        writer.writerows([["" if v is None else v for v in row] for row in table.rows])
        return out.getvalue()
    cells = [[format_value(v, c) for v, c in zip(row, table.columns)] for row in table.rows]
    numeric = [_numeric_column(table, i) for i in range(len(table.columns))]
    if fmt == "markdown":
        lines = ["| " + " | ".join(table.columns) + " |",
                 "| " + " | ".join("---:" if n else "---" for n in numeric) + " |"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
        return "\n".join(lines) + "\n"
    if fmt != "text":
        raise SpecError(f"--format {fmt}: unknown; use text, markdown or csv.")
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(table.columns)]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(table.columns), *(line(row) for row in cells)]) + "\n"
