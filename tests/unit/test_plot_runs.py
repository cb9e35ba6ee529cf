"""``d2v plot`` and ``d2v runs`` on run directories written here record by record: resumed
runs, runs without evaluation, missing keys, grids of runs, and folders that are not runs."""

import argparse
import json
from pathlib import Path

import pytest
import yaml

from d2v.cli import reports as run_reports_cli
from d2v.cli.main import main
from d2v.api.errors import SpecError
from d2v.use.plot import build_figure, choose_panels, plot_runs, run_labels
from d2v.use.runs import find_runs, format_duration, load_run, render, run_table


def _write_run(path: Path, lines: list, spec: dict | None = None, *, final: bool = False) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(l if isinstance(l, str) else json.dumps(l) + "\n" for l in lines))
    if spec is not None:
        (path / "spec.yaml").write_text(yaml.safe_dump(spec))
    if final:
        (path / "final").mkdir()
    return path


def _pretrain_lines(losses, *, start=0.0, std=0.5):
    lines = [{"event": "start", "step": 0, "spec": "experiments/pretrain_demo.yaml", "time": start}]
    for step, loss in enumerate(losses, 1):
        lines.append({"split": "train", "step": step, "epoch": 0, "loss": loss, "lr": 1e-3 * step, "grad_norm": 2.0,
                      "target_std": std, "pred_std": std / step, "ema_decay": 0.999, "time": start + 10 * step})
    return lines


def _finetune_lines(wers, *, lr=1e-3, start=0.0):
    lines = [{"event": "start", "step": 0, "spec": "experiments/asr_demo.yaml", "time": start}]
    for i, wer in enumerate(wers):
        step = 10 * (i + 1)
        lines.append({"split": "train", "step": step, "epoch": 0, "loss": 5.0 / (i + 1), "lr": lr, "grad_norm": 1.0,
                      "time": start + step})
        lines.append({"split": "valid", "step": step, "loss": 6.0 / (i + 1), "wer": wer, "time": start + step + 1})
    return lines


def _spec(lr, task="finetune"):
    return {"task": task, "optim": {"name": "adam", "lr": lr}, "trainer": {"output_dir": f"runs/grid/{lr}"}}


# --------------------------------------------------------------------------- reading a run


def test_resumed_run_keeps_the_redone_steps_and_sums_its_sessions(tmp_path):
    lines = _pretrain_lines([5.0, 4.0, 3.5, 3.4])  # killed after step 4 (10 s per step, from t=0)
    lines.insert(1, {"event": "data_warning", "split": "valid", "message": "3 labels unseen in training", "time": 1.0})
    lines += [{"event": "resume", "step": 2, "checkpoint": "step-00000002", "time": 1000.0},
              {"split": "train", "step": 3, "loss": 3.0, "time": 1010.0},
              {"split": "train", "step": 4, "loss": 2.5, "time": 1020.0},
              '{"split": "train", "step": 5, "lo']  # killed again, in the middle of a line
    history = load_run(_write_run(tmp_path / "r", lines, _spec(1e-3, "pretrain"), final=True))
    assert history.series("train", "loss") == ([1, 2, 3, 4], [5.0, 4.0, 3.0, 2.5])  # the resumed session's values
    assert history.resume_steps == [2] and history.unreadable_lines == 1
    assert history.splits() == ["train"] and [e["event"] for e in history.events] == ["start", "data_warning", "resume"]
    assert history.wall_seconds == pytest.approx(40.0 + 20.0)
    assert history.steps == 4 and history.status == "done" and history.spec_name == "pretrain_demo"


def test_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path):
    _write_run(tmp_path / "grid" / "a", _finetune_lines([50.0]))
    _write_run(tmp_path / "grid" / "b", _finetune_lines([40.0]))
    with pytest.raises(SpecError, match=r"'.*grid' is not a run directory: it has no metrics.jsonl\. It holds 2 run"):
        load_run(tmp_path / "grid")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match="trainer.output_dir of a d2v-run run"):
        plot_runs([tmp_path / "empty"])
    with pytest.raises(SpecError, match="does not exist"):
        load_run(tmp_path / "nowhere")
    assert load_run(tmp_path / "grid" / "a" / "metrics.jsonl").path == tmp_path / "grid" / "a"


def test_find_runs_walks_a_grid_and_skips_hidden_folders(tmp_path):
    for name in ("grid/lr=1e-3", "grid/lr=3e-4/seed=2", ".trash/old", "grid/lr=1e-3/final/nested"):
        _write_run(tmp_path / name, _finetune_lines([50.0]))
    (tmp_path / "grid" / "notes").mkdir()
    assert [p.relative_to(tmp_path).as_posix() for p in find_runs(tmp_path)] == [
        "grid/lr=1e-3", "grid/lr=1e-3/final/nested", "grid/lr=3e-4/seed=2"]


# --------------------------------------------------------------------------- the table


@pytest.fixture
def grid(tmp_path):
    root = tmp_path / "grid"
    _write_run(root / "lr=1e-3", _finetune_lines([80.0, 42.0], lr=1e-3), _spec(1e-3), final=True)
    _write_run(root / "lr=3e-4", _finetune_lines([90.0, 35.5], lr=3e-4, start=100.0), _spec(3e-4), final=True)
    _write_run(root / "lr=1e-2", [{"event": "start", "step": 0}, {"split": "train", "step": 5, "loss": 9.0}],
               _spec(1e-2))  # stopped before its first evaluation; logged by a d2v without times
    return root


def test_table_compares_the_last_metrics_of_a_grid(grid):
    table = run_table([load_run(p) for p in find_runs(grid)], root=grid, sort="valid_wer")
    assert table.columns == ["run", "spec", "task", "status", "steps", "optim.lr", "train_loss", "valid_loss",
                             "valid_wer", "wall_time"]
    assert [row[0] for row in table.rows] == ["lr=3e-4", "lr=1e-3", "lr=1e-2"]  # no WER: last
    best = dict(zip(table.columns, table.rows[0]))
    assert best == {"run": "lr=3e-4", "spec": "asr_demo", "task": "finetune", "status": "done", "steps": 20,
                    "optim.lr": 3e-4, "train_loss": 2.5, "valid_loss": 3.0, "valid_wer": 35.5, "wall_time": 21.0}
    assert table.rows[2][3] == "unfinished" and table.rows[2][-1] is None

    chosen = run_table([load_run(p) for p in find_runs(grid)], metrics=["valid_wer"], settings="none",
                       sort="valid_wer", reverse=True)
    assert chosen.columns[-2:] == ["valid_wer", "wall_time"] and [r[-2] for r in chosen.rows] == [42.0, 35.5, None]


def test_table_renders_as_text_markdown_and_csv(grid):
    table = run_table([load_run(p) for p in find_runs(grid)], root=grid, metrics=["valid_wer"], sort="run")
    markdown = render(table, "markdown").splitlines()
    assert markdown[0] == "| run | spec | task | status | steps | optim.lr | valid_wer | wall_time |"
    assert markdown[1] == "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |"
    assert markdown[2] == "| lr=1e-2 | - | finetune | unfinished | 5 | 0.01 | - | - |"
    assert markdown[4] == "| lr=3e-4 | asr_demo | finetune | done | 20 | 0.0003 | 35.5 | 21s |"
    text = render(table, "text").splitlines()
    assert text[0].split() == table.columns and text[3].split()[-2:] == ["35.5", "21s"]
    assert render(table, "csv").splitlines()[3] == "lr=3e-4,asr_demo,finetune,done,20,0.0003,35.5,21.0"
    assert [format_duration(s) for s in (0.42, 59.4, 75, 7500)] == ["0.4s", "59s", "1m15s", "2h05m"]


def test_unknown_columns_are_clear_errors(grid):
    histories = [load_run(p) for p in find_runs(grid)]
    with pytest.raises(SpecError, match="--metric valid_wr: no run has it; did you mean 'valid_wer'"):
        run_table(histories, metrics=["valid_wr"])
    with pytest.raises(SpecError, match="--sort accuracy: no run has it"):
        run_table(histories, sort="accuracy")
    with pytest.raises(SpecError, match="--settings optim.lr_: no run has it; did you mean 'optim.lr'"):
        run_table(histories, settings=["optim.lr_"])


# --------------------------------------------------------------------------- plots


def _axes_by_title(figure):
    return {ax.get_title(): ax for ax in figure.axes if ax.get_visible()}


def test_plot_overlays_runs_with_and_without_evaluation(tmp_path):
    pre = _write_run(tmp_path / "pre", _pretrain_lines([5.0, 4.0, 3.0]))
    ft = _write_run(tmp_path / "ft", _finetune_lines([70.0, 40.0, 30.0]))
    no_norm = [{k: v for k, v in r.items() if k != "grad_norm"} for r in _finetune_lines([60.0])]
    bare = _write_run(tmp_path / "bare", [r for r in no_norm if r.get("split") != "valid"])  # no eval, no grad norm
    histories = [load_run(p) for p in (pre, ft, bare)]
    figure = build_figure(histories)
    axes = _axes_by_title(figure)
    assert list(axes) == ["loss", "learning rate", "gradient norm", "target / prediction std (collapse if -> 0)",
                          "valid wer"]
    loss_lines = [(list(l.get_xdata()), list(l.get_ydata())) for l in axes["loss"].get_lines()]
    assert loss_lines == [([1, 2, 3], [5.0, 4.0, 3.0]),  # pretraining: train only
                          ([10, 20, 30], [5.0, 2.5, 5.0 / 3]), ([10, 20, 30], [6.0, 3.0, 2.0]),  # train, valid
                          ([10], [5.0])]  # the run without evaluation
    assert [list(l.get_ydata()) for l in axes["target / prediction std (collapse if -> 0)"].get_lines()] == [
        [0.5, 0.5, 0.5], [0.5, 0.25, 0.5 / 3]]
    assert len(axes["gradient norm"].get_lines()) == 2  # the run that logged none is left out
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["pre", "ft", "bare"]
    assert "train ema_decay" in [p.title for p in choose_panels(histories, everything=True)]

    written = plot_runs([pre, ft, bare], tmp_path / "out" / "compare.png")
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < written.stat().st_size < 400_000


def test_a_metric_that_never_moves_gets_no_panel_unless_asked(tmp_path, capsys):
    """Top-5 accuracy on a 4-class problem is 100 at every evaluation: a flat line, left out and
    said so; a metric evaluated once, or one that moved in any run, keeps its panel."""
    lines = _finetune_lines([70.0, 40.0, 30.0])
    for line in lines:
        if line.get("split") == "valid":
            line.update(top5=100.0, accuracy=50.0 if line["step"] == 10 else 60.0)
    run = _write_run(tmp_path / "cls", lines)
    titles = [p.title for p in choose_panels([load_run(run)])]
    assert "valid top5" not in titles and {"valid accuracy", "valid wer"} <= set(titles)
    assert "valid top5" in [p.title for p in choose_panels([load_run(run)], everything=True)]
    other = [dict(line, top5=90.0) if line.get("step") == 20 and line.get("split") == "valid" else line for line in lines]
    moved = _write_run(tmp_path / "moved", other)  # compared with a run where it moved: drawn
    assert "valid top5" in [p.title for p in choose_panels([load_run(run), load_run(moved)])]
    once = _write_run(tmp_path / "once", _finetune_lines([70.0]))
    assert "valid wer" in [p.title for p in choose_panels([load_run(once)])]

    assert main(["plot", str(run), "--output", str(tmp_path / "p.png")]) == 0
    assert "note: left out valid top5 (100 at every evaluation); --all draws it" in capsys.readouterr().err


def test_plot_marks_where_a_run_resumed(tmp_path):
    lines = _pretrain_lines([5.0, 4.0, 3.0]) + [{"event": "resume", "step": 2, "time": 500.0},
                                               {"split": "train", "step": 3, "loss": 2.0, "time": 510.0}]
    figure = build_figure([load_run(_write_run(tmp_path / "r", lines))])
    loss = _axes_by_title(figure)["loss"]
    assert list(loss.get_lines()[0].get_ydata()) == [5.0, 4.0, 2.0]
    assert list(loss.get_lines()[1].get_xdata()) == [2, 2]  # the vertical resume marker
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["r", "resumed"]


def test_plot_refuses_what_it_cannot_draw(tmp_path):
    started = _write_run(tmp_path / "started", [{"event": "start", "step": 0}])
    with pytest.raises(SpecError, match="nothing to plot"):
        plot_runs([started])
    run = _write_run(tmp_path / "run", _finetune_lines([50.0]))
    with pytest.raises(SpecError, match=r"--output .*plot.txt: cannot write '.txt' images"):
        plot_runs([run], tmp_path / "plot.txt")
    assert plot_runs([run]) == run / "metrics.png"


def test_labels_keep_as_much_of_the_path_as_tells_runs_apart(tmp_path):
    paths = [tmp_path / "a" / "seed=1", tmp_path / "b" / "seed=1", tmp_path / "b" / "seed=2"]
    assert run_labels(paths) == ["a/seed=1", "b/seed=1", "b/seed=2"]


# --------------------------------------------------------------------------- command line


def _cli(argv):
    parser = argparse.ArgumentParser()
    run_reports_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.fn(args)


def test_commands_print_the_table_and_write_the_plot(grid, tmp_path, capsys):
    assert _cli(["runs", str(grid), "--metric", "valid_wer,train_loss", "--sort", "valid_wer",
                 "--format", "markdown"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| run | spec | task | status | steps | optim.lr | valid_wer | train_loss | wall_time |"
    assert out[2].startswith("| lr=3e-4 |") and len(out) == 5
    assert _cli(["plot", str(grid / "lr=1e-3"), str(grid / "lr=3e-4"), "-o", str(tmp_path / "p.png")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'p.png'}" and (tmp_path / "p.png").exists()
    with pytest.raises(SpecError, match="no run directory under"):
        _cli(["runs", str(tmp_path / "grid" / "lr=1e-3" / "final")])
