"""The command line as a user meets it: clear one-line errors with exit code 2, listings."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from d2v.cli.main import main
from d2v.train import loop as train_module

ROOT = Path(__file__).resolve().parents[2]


def d2v(*args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, "-m", "d2v.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env)


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
    result = subprocess.run([sys.executable, "-c", "import sys; from d2v.cli.main import run_main; sys.exit(run_main(['nope.yaml']))"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "d2v-run: error: spec file 'nope.yaml' does not exist" in result.stderr


def test_check_demands_the_data_unless_told_not_to(capsys):
    assert main(["check", "experiments/sst2_demo.yaml", "data.train.root=/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "command-line override 'data.train.root=/nonexistent': data.train.root: '/nonexistent' does not exist" in err
    assert main(["check", "experiments/sst2_demo.yaml", "data.train.root=/nonexistent", "--no-data"]) == 0


def test_d2v_run_speaks_of_its_own_usage(capsys):
    """`d2v-run --help` shows d2v-run's usage (not `d2v-run run`), and a spec key written as an
    option gets the override the user meant instead of d2v's subcommand list."""
    from d2v.cli.main import run_main

    with pytest.raises(SystemExit) as info:
        run_main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and out.startswith("usage: d2v-run SPEC [key.path=value ...] [--resume]")
    for option, meant in (["--max_steps=10"], "'trainer.max_steps=10'"), (["--lr", "1e-4"], "'optim.lr=...'"):
        with pytest.raises(SystemExit) as info:
            run_main(["experiments/sst2_demo.yaml", *option])
        err = capsys.readouterr().err
        assert info.value.code == 2 and f"did you mean the override {meant}?" in err
        assert "{run,check" not in err and "d2v-run run" not in err
    with pytest.raises(SystemExit):
        run_main([])
    assert "say which spec to run" in capsys.readouterr().err


def test_a_broken_plugin_is_reported_once_and_every_command_still_works(tmp_path):
    """The example third-party plugin, installed with a dependency missing: `d2v list` names it
    once (with how to uninstall it) and lists the rest; a spec using its head names the plugin."""
    site = tmp_path / "site-packages"
    shutil.copytree(ROOT / "tests" / "plugins" / "d2v-word-count" / "d2v_word_count", site / "d2v_word_count")
    init = site / "d2v_word_count" / "__init__.py"
    init.write_text("import d2v_word_count_missing_dependency  # noqa: F401\n" + init.read_text())
    dist_info = site / "d2v_word_count-0.1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: d2v-word-count\nVersion: 0.1.0\n")
    (dist_info / "entry_points.txt").write_text("[d2v]\nword-count = d2v_word_count\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)}

    listed = d2v("list", "head", env=env)
    assert listed.returncode == 0 and "ctc" in listed.stdout and "Traceback" not in listed.stderr
    assert listed.stderr.count("plugin 'word-count'") == 1
    assert "No module named 'd2v_word_count_missing_dependency'" in listed.stderr
    assert "pip uninstall d2v-word-count" in listed.stderr
    spec = tmp_path / "count.yaml"
    spec.write_text((ROOT / "experiments" / "asr_demo.yaml").read_text())
    checked = d2v("check", str(spec), "model.head={name: word_count}", env=env)
    assert checked.returncode == 2 and "Traceback" not in checked.stderr
    assert "model.head.name: head 'word_count'" in checked.stderr and "plugin 'word-count'" in checked.stderr
    assert "unknown head" not in checked.stderr


def _toy_spec_file(toy, path: Path, output_dir: Path | None, **trainer) -> Path:
    spec = toy.toy_spec(output_dir, **trainer)
    if output_dir is None:
        del spec["trainer"]["output_dir"]
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_spec_without_output_dir_runs_in_runs_slash_its_name(toy_plugin, tmp_path, monkeypatch, capsys):
    """d2v check says where a run goes, d2v-run writes there, d2v runs finds it there: two specs
    without trainer.output_dir never collide."""
    monkeypatch.chdir(tmp_path)
    for name in ("toy_a", "toy_b"):
        _toy_spec_file(toy_plugin, tmp_path / f"{name}.yaml", None, max_steps=2)
    assert main(["check", "toy_a.yaml"]) == 0
    assert "trainer.output_dir: runs/toy_a" in capsys.readouterr().out
    assert main(["run", "toy_a.yaml"]) == 0 and main(["run", "toy_b.yaml"]) == 0
    for name in ("toy_a", "toy_b"):
        assert (tmp_path / "runs" / name / "final" / "model.safetensors").is_file()
        saved = yaml.safe_load((tmp_path / "runs" / name / "spec.yaml").read_text())
        assert saved["trainer"]["output_dir"] == f"runs/{name}"
    capsys.readouterr()
    assert main(["runs"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert any(row.startswith("toy_a ") for row in rows) and any(row.startswith("toy_b ") for row in rows)


def test_runs_says_what_an_evaluation_evaluated_from_which_checkpoint_and_when(toy_plugin, tmp_path, monkeypatch,
                                                                               capsys):
    monkeypatch.chdir(tmp_path)
    _toy_spec_file(toy_plugin, tmp_path / "toy_a.yaml", None, max_steps=2)
    assert main(["run", "toy_a.yaml"]) == 0
    evaluation = ["task=evaluate", "evaluate.checkpoint=runs/toy_a/final", "evaluate.split=valid",
                  "trainer.output_dir=runs/toy_a_eval"]
    assert main(["run", "toy_a.yaml", *evaluation]) == 0
    assert main(["run", "toy_a.yaml", *evaluation[:3], "trainer.output_dir=runs/toy_a"]) == 0  # inside the run
    assert yaml.safe_load((tmp_path / "runs" / "toy_a" / "spec.yaml").read_text())["task"] == "finetune"  # kept
    capsys.readouterr()
    assert main(["runs", "--settings", "none"]) == 0
    out, err = capsys.readouterr()
    row = next(line.split() for line in out.splitlines() if line.startswith("toy_a_eval "))
    assert row[1:4] == ["toy_a", "evaluate", "done"] and row[-1] not in ("0s", "-")
    notes = [line for line in err.splitlines() if "evaluated runs/toy_a/final on the valid split on 20" in line]
    assert [n.split(":")[1].strip() for n in notes] == ["toy_a", "toy_a_eval"], err


def test_resume_flag_is_trainer_resume_true(toy_plugin, tmp_path, monkeypatch, capsys):
    """`--resume` is an alias of `trainer.resume=true`: the same error when there is nothing to
    resume; the same resumed run (same weights, same saved spec, no 'the spec differs' copy)."""
    errors = []
    for spelling in ("--resume", "trainer.resume=true"):
        spec = _toy_spec_file(toy_plugin, tmp_path / "empty.yaml", tmp_path / "empty", max_steps=4)
        assert main(["run", str(spec), spelling]) == 2
        errors.append(capsys.readouterr().err)
    assert errors[0] == errors[1] and "no complete checkpoint" in errors[0]

    real_write = train_module.MetricsLog.write

    def killed_after_step_3(self, record):
        real_write(self, record)
        if record.get("step") == 3 and record.get("split") == "train":
            raise KeyboardInterrupt

    runs = {"--resume": tmp_path / "a", "trainer.resume=true": tmp_path / "b"}
    specs = {spelling: _toy_spec_file(toy_plugin, tmp_path / f"{d.name}.yaml", d, max_steps=6, save_every=2)
             for spelling, d in runs.items()}
    monkeypatch.setattr(train_module.MetricsLog, "write", killed_after_step_3)
    for spelling in runs:
        assert main(["run", str(specs[spelling])]) == 130
    monkeypatch.setattr(train_module.MetricsLog, "write", real_write)
    for spelling in runs:
        assert main(["run", str(specs[spelling]), spelling]) == 0
    a, b = runs.values()
    for run_dir in (a, b):
        assert not list(run_dir.glob("spec.resumed-at-*"))
        assert "resume" in (run_dir / "metrics.jsonl").read_text()
    saved = [yaml.safe_load((d / "final" / "spec.yaml").read_text()) for d in (a, b)]
    for spec in saved:
        assert spec["trainer"].pop("resume") is True
        spec["trainer"].pop("output_dir")
    assert saved[0] == saved[1]
    weights_a, weights_b = (load_file(str(d / "final" / "model.safetensors")) for d in (a, b))
    assert all((weights_a[k] == weights_b[k]).all() for k in weights_a)
