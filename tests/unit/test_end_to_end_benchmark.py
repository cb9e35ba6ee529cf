"""benchmarks/end_to_end.py: both loops run the same job and report comparable numbers (it
reports, it never asserts timings)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import end_to_end  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

FIELDS = {"side", "device", "size", "batch_size", "workers", "threads", "updates", "examples", "wall_s",
          "examples_per_s", "cpu_s", "examples_per_cpu_s", "compute_cpu_s", "audio_s_per_s", "loader_s",
          "loader_share", "idle_s", "idle_share", "padding_fraction", "loss_start", "loss_end"}


def test_d2v_and_trainer_do_the_same_work_and_report_every_field(tmp_path):
    job = end_to_end.Job(batch_size=4, warmup=1, updates=3, log_every=2, split="dev-demo")
    checkpoint = end_to_end.prepare_checkpoint(job, tmp_path / "checkpoint")
    rows = [end_to_end.run_side(side, job, checkpoint) for side in ("d2v", "hf")]

    for row in rows:
        assert set(row) == FIELDS
        assert row["updates"] == 3 and row["examples"] == 3 * 4  # the timed window only
        assert row["wall_s"] > 0
        assert row["examples_per_s"] == pytest.approx(row["examples"] / row["wall_s"], rel=1e-2)
        assert 0 <= row["loader_s"] <= row["idle_s"] <= row["wall_s"] and 0 < row["compute_cpu_s"] <= row["cpu_s"]
        assert 0 <= row["padding_fraction"] < 1  # length-grouped batches of 1-2.4 s clips
        assert math.isfinite(row["loss_start"]) and math.isfinite(row["loss_end"]) and row["loss_start"] > 0
    assert rows[0]["examples"] == rows[1]["examples"]

    repetitions = [{"kind": "repetition", "repetition": 0, **row} for row in rows]
    summaries = end_to_end.summarize(repetitions)
    (ratio,) = end_to_end.ratios(summaries, repetitions)
    assert ratio["d2v_over"] == "hf"
    speedup = rows[0]["examples_per_s"] / rows[1]["examples_per_s"]
    assert ratio["examples_per_s"] == pytest.approx(speedup, rel=1e-2) == ratio["examples_per_s_paired"]
    block = end_to_end.run_block(summaries, [ratio], job, repeats=1)
    assert block.startswith(f"{end_to_end.RUN_START} cpu-tiny-b4-w0 -->")
    assert "| d2v-run (length-sorted batches) |" in block and "| Trainer, group_by_length |" in block


def _block(key: str, text: str) -> str:
    return f"{end_to_end.RUN_START} {key} -->\n### {key}\n{text}\n{end_to_end.RUN_END}\n"


def test_the_docs_section_keeps_the_rest_of_the_file_and_other_configurations():
    document = "# Performance\n\nstep table\n"
    appended = end_to_end.replace_section(document, "cpu-tiny", _block("cpu-tiny", "old numbers"))
    assert appended.startswith(document + "\n" + end_to_end.SECTION_START) and end_to_end.SECTION_TITLE in appended
    assert appended.endswith(_block("cpu-tiny", "old numbers") + end_to_end.SECTION_END + "\n")

    edited = appended.replace("step table", "step table, edited by someone else") + "\n## Later section\n"
    replaced = end_to_end.replace_section(edited, "cpu-tiny", _block("cpu-tiny", "new numbers"))
    assert replaced == edited.replace("old numbers", "new numbers")

    both = end_to_end.replace_section(replaced, "cuda-base", _block("cuda-base", "gpu numbers"))
    assert both.index("new numbers") < both.index("gpu numbers") < both.index(end_to_end.SECTION_END)
    assert both.replace("\n" + _block("cuda-base", "gpu numbers"), "") == replaced


def test_the_window_needs_a_warmup_update():
    with pytest.raises(SystemExit):
        end_to_end.parse_args(["--warmup", "0"])
