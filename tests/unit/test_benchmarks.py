"""benchmarks/run.py works end to end on a tiny case (it reports, it never asserts timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_prints_one_json_line_per_case_and_a_table(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--size", "tiny", "--cases", "text_cls_8x256",
           "--modes", "infer", "--dtypes", "fp32", "--repeats", "1", "--warmup", "0", "--no-memory",
           "--markdown-out", str(tmp_path / "perf.md")]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={"OMP_NUM_THREADS": "1", "PATH": "", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 1 and rows[0]["case"] == "text_cls_8x256" and rows[0]["speed_ratio"] > 0
    assert rows[0]["hf_samples_per_s"] > 0 and 0 < rows[0]["d2v_flops_fraction"]
    assert "| text classification, 8 x 256 tokens | inference | fp32 |" in (tmp_path / "perf.md").read_text()


def test_pretraining_benchmark_times_both_objectives_and_writes_its_block(tmp_path, monkeypatch):
    """benchmarks/pretraining.py: both objectives update, the parts' shares add up, and the docs
    block is replaced in place (not appended twice)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import pretraining

    rows = pretraining.main(["step-cost", "--modalities", "vision", "--repeats", "2", "--warmup", "1"])
    assert [r["version"] for r in rows] == ["1.0", "2.0"]
    for row in rows:
        assert row["s_per_update"] > 0 and row["examples_per_update"] > 0
        assert sum(row["shares"].values()) == pytest.approx(1.0, abs=0.02)
        assert row["shares"]["student"] > 0 and row["shares"]["teacher"] > 0 and row["shares"]["backward"] > 0
    assert rows[1]["shares"]["decoder"] > 0  # data2vec 2.0's decoder is timed as its own part
    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n\nother sections\n")
    for _ in range(2):
        pretraining.write_docs(pretraining.markdown(rows, "cpu"), doc)
    text = doc.read_text()
    assert text.count("## Pretraining: data2vec 1.0 vs 2.0") == 1 and "other sections" in text
    assert "| vision | data2vec 2.0 |" in text
