"""``d2v plot``: the curves of one or several runs in one PNG, read from their ``metrics.jsonl``.

One panel per quantity (loss, learning rate, gradient norm, the target / prediction standard
deviations that show a self-supervised run collapsing, and every evaluation metric); every run
has its own colour in every panel, so runs of a grid can be compared at a glance. A resumed run
is marked where it resumed. Matplotlib draws on its Agg canvas directly: no display, no pyplot
state shared with the caller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from d2v.api.errors import SpecError
from d2v.use.runs import COLLAPSE_STATS, RunHistory, load_run

#: line styles telling curves of one panel apart (colours tell runs apart)
STYLES = ("-", "--", ":", "-.")
#: train-record fields that get their own panel only with ``everything``
ALWAYS_SHOWN = ("loss", "lr", "grad_norm", *COLLAPSE_STATS)


@dataclass(frozen=True)
class Curve:
    split: str
    key: str
    label: str  # what the line style stands for in its panel's legend


@dataclass(frozen=True)
class Panel:
    title: str
    curves: tuple[Curve, ...]


def choose_panels(histories: list[RunHistory], *, everything: bool = False) -> list[Panel]:
    """The panels these runs can fill, in reading order: loss (training and every evaluated
    split), learning rate, gradient norm, the collapse statistics, each evaluation metric;
    with ``everything``, also every other value the training records carry."""

    def logged(split: str, key: str) -> bool:
        return any(key in h.metric_names(split) for h in histories)

    splits = list(dict.fromkeys(s for h in histories for s in h.splits()))
    evaluated = [s for s in splits if s != "train"]
    panels = []
    loss = tuple(Curve(s, "loss", s) for s in ["train", *evaluated] if logged(s, "loss"))
    if loss:
        panels.append(Panel("loss", loss))
    for key, title in (("lr", "learning rate"), ("grad_norm", "gradient norm")):
        if logged("train", key):
            panels.append(Panel(title, (Curve("train", key, "train"),)))
    collapse = tuple(Curve("train", k, k.removesuffix("_std").replace("pred", "prediction"))
                     for k in COLLAPSE_STATS if logged("train", k))
    if collapse:
        panels.append(Panel("target / prediction std (collapse if -> 0)", collapse))
    metrics = list(dict.fromkeys(k for s in evaluated for h in histories for k in h.metric_names(s) if k != "loss"))
    flat = {} if everything else flat_metrics(histories)
    for key in metrics:
        curves = tuple(Curve(s, key, s) for s in evaluated if logged(s, key))
        if everything or key not in flat:
            panels.append(Panel(key if len(curves) > 1 else f"{curves[0].split} {key}", curves))
    if everything:
        others = dict.fromkeys(k for h in histories for k in h.metric_names("train") if k not in ALWAYS_SHOWN)
        panels.extend(Panel(f"train {k}", (Curve("train", k, "train"),)) for k in others)
    return panels


def constant_value(histories: list[RunHistory], split: str, key: str) -> float | None:
    """The one value an evaluation metric took at every one of at least two evaluations of every
    run (top-5 accuracy of a 4-class problem is always 100), else None. Such a panel is a flat line
    that cannot tell runs or steps apart, so it is left out unless ``everything`` is asked for."""
    values = set()
    for history in histories:
        steps, ys = history.series(split, key)
        if len(steps) < 2:
            return None
        values.update(ys)
    return values.pop() if len(values) == 1 else None


def flat_metrics(histories: list[RunHistory]) -> dict[str, list[tuple[str, float]]]:
    """Evaluation metrics that never moved: ``{key: [(split, value), ...]}`` for each metric that
    :func:`constant_value` finds constant on every split it was evaluated on."""
    evaluated = list(dict.fromkeys(s for h in histories for s in h.splits() if s != "train"))
    flat = {}
    for key in dict.fromkeys(k for s in evaluated for h in histories for k in h.metric_names(s) if k != "loss"):
        splits = [s for s in evaluated if any(key in h.metric_names(s) for h in histories)]
        values = [constant_value(histories, s, key) for s in splits]
        if all(v is not None for v in values):
            flat[key] = list(zip(splits, values))
    return flat


def left_out(histories: list[RunHistory]) -> list[str]:
    """``"valid top5 (100 at every evaluation)"`` for each metric panel :func:`choose_panels` leaves out."""
    return [f"{split} {key} ({value:g} at every evaluation)"
            for key, points in flat_metrics(histories).items() for split, value in points]


def run_labels(paths: list[Path]) -> list[str]:
    """Short names that still tell the runs apart: as many trailing path parts as needed."""
    parts = [Path(p).resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def _colours(count: int) -> list:
    from matplotlib import colormaps

    palette = colormaps["tab10" if count <= 10 else "tab20"]
    return [palette(i % palette.N) for i in range(count)]


def build_figure(histories: list[RunHistory], labels: list[str] | None = None, *, everything: bool = False) -> Figure:
    """The figure for a set of runs (raises SpecError when none logged a step yet)."""
    panels = choose_panels(histories, everything=everything)
    panels = [p for p in panels if any(h.series(c.split, c.key)[0] for h in histories for c in p.curves)]
    if not panels:
        names = ", ".join(str(h.path) for h in histories)
        raise SpecError(f"nothing to plot in {names}: no training or evaluation record with a step yet (a run "
                        f"logs every trainer.log_every steps; an evaluate task's results are shown by `d2v runs`).")
    labels = labels or run_labels([h.path for h in histories])
    columns = 2 if len(panels) == 4 else min(3, len(panels))  # a full grid where it costs no height
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(4.0 * columns, 2.9 * rows + 0.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    colours = _colours(len(histories))
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        _draw_panel(ax, panel, histories, colours)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=c, lw=2, label=label) for c, label in zip(colours, labels)]
    if any(h.resume_steps for h in histories):
        handles.append(Line2D([], [], color="grey", ls=":", lw=1, label="resumed"))
    figure.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 4), frameon=False,
                  fontsize="small")
    return figure


def _draw_panel(ax, panel: Panel, histories: list[RunHistory], colours: list) -> None:
    values = []
    for history, colour in zip(histories, colours):
        for curve, style in zip(panel.curves, STYLES):
            steps, ys = history.series(curve.split, curve.key)
            if steps:
                marker = "o" if len(steps) <= 3 or curve.split != "train" else None
                ax.plot(steps, ys, ls=style, color=colour, marker=marker, ms=3, lw=1.4)
                values.extend(ys)
        for step in history.resume_steps:
            ax.axvline(step, color=colour, ls=":", lw=1, alpha=0.6)
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 30:
        ax.set_yscale("log")  # losses and warm-up learning rates span decades
    ax.set_title(panel.title, fontsize="medium")
    ax.set_xlabel("step", fontsize="small")
    ax.tick_params(labelsize="small")
    ax.grid(alpha=0.3)
    if len(panel.curves) > 1:
        ax.legend(handles=[Line2D([], [], color="black", ls=s, lw=1.4, label=c.label)
                           for c, s in zip(panel.curves, STYLES)], fontsize="x-small")


def plot_runs(runs: list[str | Path | RunHistory], output: str | Path | None = None, *,
              everything: bool = False) -> Path:
    """Draw the runs' curves (run directories, or runs already read) into one image (``output``;
    default ``RUN_DIR/metrics.png`` for one run, ``./metrics.png`` for several) and return its path."""
    if not runs:
        raise SpecError("d2v plot: give at least one run directory.")
    histories = [run if isinstance(run, RunHistory) else load_run(run) for run in runs]
    if output is None:
        output = histories[0].path / "metrics.png" if len(histories) == 1 else Path("metrics.png")
    output = Path(output)
    figure = build_figure(histories, everything=everything)
    fmt = output.suffix.lstrip(".").lower()
    supported = figure.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise SpecError(f"--output {output}: cannot write '{output.suffix or '(no suffix)'}' images; end the name "
                        f"with one of {', '.join('.' + s for s in sorted(supported))} (e.g. .png).")
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output)
    return output
