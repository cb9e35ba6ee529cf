"""benchmarks/run.py works end to end on a tiny case (it reports, it never asserts timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
