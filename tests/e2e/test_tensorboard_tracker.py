"""``trainer.trackers: [tensorboard]``: a short real run (ASR demo, then resumed) writes event
files holding every number of ``metrics.jsonl``, training and evaluation, at the same steps."""

import json
import math
from collections import defaultdict
from pathlib import Path

import pytest

from d2v.spec.config import load_spec
from d2v.api.errors import SpecError
from d2v.train import Run, run

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "experiments" / "asr_demo.yaml"
pytestmark = pytest.mark.usefixtures("single_thread")


def _short_run(out: Path, max_steps: int, *, resume: bool = False) -> None:
    run(load_spec(DEMO, [f"trainer.output_dir={out}", f"trainer.max_steps={max_steps}", "trainer.log_every=1",
                         "trainer.eval_every=2", "trainer.save_every=2", "trainer.progress_bar=false",
                         "trainer.trackers=[tensorboard]", "data.valid.max_examples=8"]), resume=resume)


def _tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of every event file under the run directory, as TensorBoard reads them."""
    scalars: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for folder in sorted({p.parent for p in run_dir.rglob("events.out.tfevents.*")}):
        accumulator = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars[tag].extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return dict(scalars)


def _jsonl_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    scalars: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "event" in record:
            continue  # events (start, resume, data warnings, ...) are not scalars
        for key, value in record.items():
            if key not in ("split", "step", "time"):
                scalars[f"{record['split']}/{key}"].append((record["step"], float(value)))
    return dict(scalars)


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tb") / "asr"
    _short_run(out, 4)
    _short_run(out, 6, resume=True)  # a second session appends to the same log directory
    return out


def test_event_files_hold_the_numbers_of_metrics_jsonl(resumed_run):
    board, log = _tensorboard_scalars(resumed_run), _jsonl_scalars(resumed_run)
    assert set(board) == set(log)
    assert {"train/loss", "train/lr", "train/grad_norm", "valid/loss", "valid/wer", "valid/cer"} <= set(board)
    assert [s for s, _ in board["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in board["valid/wer"]] == [0, 2, 4, 6]  # before training, every 2 steps, final
    for tag, points in log.items():
        assert [s for s, _ in board[tag]] == [s for s, _ in points], tag
        for (_, seen), (_, logged) in zip(board[tag], points):
            assert math.isclose(seen, logged, rel_tol=1e-6, abs_tol=1e-9), (tag, seen, logged)


def test_run_directory_reads_back_as_one_history(resumed_run):
    from d2v.use.runs import load_run

    history = load_run(resumed_run)
    assert history.resume_steps == [4] and history.status == "done" and history.steps == 6
    assert history.spec_name == "asr_demo" and 0 < history.wall_seconds < 600
    assert history.series("valid", "wer")[0] == [0, 2, 4, 6]


def test_a_tracker_that_would_log_nothing_stops_the_run_before_it_starts(tmp_path, monkeypatch):
    def spec(trackers):
        return load_spec(DEMO, [f"trainer.output_dir={tmp_path / 'r'}", f"trainer.trackers={trackers}"])

    with pytest.raises(SpecError, match=r"unknown tracker 'tensorbord'; Accelerate offers: all, .*tensorboard"):
        Run(spec("[tensorbord]"))
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])  # as without the package
    with pytest.raises(SpecError, match="'tensorboard' is not installed, so nothing would be logged to it"):
        Run(spec("[tensorboard]"))
    assert not (tmp_path / "r").exists()
