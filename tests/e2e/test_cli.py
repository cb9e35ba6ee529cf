"""The command line as a user meets it: clear one-line errors with exit code 2, listings."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def d2v(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "d2v.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_list_shows_every_kind():
    out = d2v("list").stdout
    for kind in ("feature_extractor:", "encoder:", "head:", "target:", "objective:", "masking:", "dataset:",
                 "processor:", "model:", "optimizer:", "schedule:", "hf_converter:"):
        assert kind in out
    assert "audio.transformer" in out and "[audio]" in out and "ctc" in out


def test_list_verbose_shows_parameters():
    out = d2v("list", "masking", "-v").stdout
    assert "mask_prob = 0.65" in out


def test_registry_manifest_is_current():
    result = d2v("registry", "--check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_misspelled_spec_is_one_clear_error_exit_2(tmp_path):
    spec = (ROOT / "experiments" / "asr_demo.yaml").read_text().replace("head:", "haed:", 1)
    path = tmp_path / "bad.yaml"
    path.write_text(spec)
    result = d2v("check", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "model.haed: unknown key; did you mean 'head'?" in result.stderr


def test_misspelled_override_exit_2():
    result = d2v("check", "experiments/asr_demo.yaml", "model.encoder.layrs=2")
    assert result.returncode == 2
    assert "model.encoder.layrs: unknown parameter of encoder 'audio.transformer'; did you mean 'layers'?" in result.stderr


def test_missing_spec_file_exit_2():
    result = subprocess.run([sys.executable, "-c", "import sys; from d2v.cli import run_main; sys.exit(run_main(['nope.yaml']))"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "d2v-run: error: spec file 'nope.yaml' does not exist" in result.stderr
