"""benchmarks/run.py works end to end on a tiny case (it reports, it never asserts timings)."""

from __future__ import annotations

import json
import os
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
    paired = rows[0]["paired_best_ratio"]  # one repeat: its one ratio is every quartile
    assert paired["q1"] == paired["median"] == paired["q3"] > 0
    # a padded text case is also timed padding-free, and the faster d2v variant is the one compared
    assert rows[0]["d2v_padding_free_samples_per_s"] > 0 and rows[0]["padding_free_ratio"] > 0
    assert rows[0]["best_d2v"] in ("d2v", "d2v_padding_free") and "hf_compiled_samples_per_s" not in rows[0]
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


def _table_rows(stdout: str) -> dict[str, dict[str, str]]:
    """The Markdown table's rows by spec and compile setting, as {column: cell}."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]
    return {f"{row['spec']}/{row['compile']}": row for row in rows}


def test_gpu_check_runs_a_fine_tune_with_predict_and_export_and_a_pretraining_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.py end to end at 2 updates per run (the GPU session runs it for real)."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--steps", "2",
           "--compile", "none", "--only", "asr_demo,pretrain2_text_demo", "--out", str(tmp_path / "out")]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    rows = _table_rows(result.stdout)
    assert list(rows) == ["asr_demo/off", "pretrain2_text_demo/off"]
    for row in rows.values():
        assert row["status"] == "ok" and row["updates"] == "2"
        assert float(row["updates/s"]) > 0 and float(row["examples/s"]) > 0 and float(row["peak memory (MB)"]) > 0
    assert rows["asr_demo/off"]["final metric"].startswith("wer ")
    assert rows["asr_demo/off"]["predict"] == rows["asr_demo/off"]["export"] == "ok"
    assert (tmp_path / "out" / "asr_demo" / "export" / "model.onnx").is_file()
    assert rows["pretrain2_text_demo/off"]["final metric"].startswith("loss ")
    assert rows["pretrain2_text_demo/off"]["predict"] == "-"


def test_gpu_check_orders_runs_by_importance_and_keeps_to_its_budget(tmp_path, monkeypatch):
    """Eager core demos first, then compiled, then the extra tasks; a run is estimated from its
    spec's earlier variant (scaled by the compiled / eager ratio seen) or the median run; runs left
    out show in the table, and the docs block is replaced in place."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    demos = {d.spec: d for d in gpu_check.DEMOS}
    rows = gpu_check.plan([demos["keywords_demo"], demos["asr_demo"], demos["pretrain_text_demo"]], [False, True])
    assert [r.name for r in rows] == ["asr_demo", "pretrain_text_demo", "asr_demo-compiled",
                                      "pretrain_text_demo-compiled", "keywords_demo", "keywords_demo-compiled"]
    asr, text, asr_c, text_c = rows[:4]
    assert gpu_check.estimate_s(asr, []) == 0
    asr.seconds, text.seconds = 30.0, 10.0
    assert gpu_check.estimate_s(asr_c, [asr, text]) == 30.0 * gpu_check.COMPILE_FACTOR
    asr_c.seconds = 90.0
    assert gpu_check.estimate_s(text_c, [asr, text, asr_c]) == pytest.approx(30.0)  # 10 s x the 3x seen
    assert gpu_check.estimate_s(rows[4], [asr, text, asr_c]) == 30.0  # median of the runs so far

    asr.train, asr.updates, asr.updates_per_s, asr.examples_per_s, asr.peak_mb = "ok", 200, 12.5, 190.0, 812.4
    asr.metric, asr.predict, asr.export = ("wer", 41.25), "ok", "ok"
    table = gpu_check.markdown(rows[:2])
    assert "| asr_demo | speech recognition (CTC) | off | 200 | 12.50 | 190.0 | 812 | wer 41.25 | ok | ok | ok |" in table
    assert "| pretrain_text_demo | data2vec 1.0 pretraining, text | off | - | - | - | - | - | - | - | not run: budget |" \
        in table and not any(r.failed for r in rows[:2])
    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n\nother sections\n")
    for _ in range(2):
        gpu_check.write_docs("header\n\n" + table, "cuda", doc)
    text = doc.read_text()
    assert text.count("<!-- gpu-check-cuda:start -->") == 1 and text.count("| asr_demo |") == 1
    assert "other sections" in text


def test_qkv_projection_benchmark_times_the_three_layouts(monkeypatch):
    """benchmarks/qkv_projection.py: every layout is timed and the ratios are its medians'."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import qkv_projection

    (row,) = qkv_projection.main(["--dim", "16", "--tokens", "8", "--repeats", "3", "--warmup", "1"])
    assert set(row["ms"]) == {"three", "concatenated", "stored fused"} and min(row["ms"].values()) > 0
    assert row["concatenated_vs_three"] == pytest.approx(row["ms"]["three"] / row["ms"]["concatenated"], rel=0.01)
