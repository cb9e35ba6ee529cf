"""data2vec 1.0 vs 2.0 pretraining: what an update costs, where its time goes, and time to quality.

    python benchmarks/pretraining.py step-cost                 # s/update and time shares, audio and vision demos
    python benchmarks/pretraining.py clone-batch               # data2vec 2.0: cost per sample as clone_batch grows
    python benchmarks/pretraining.py time-to-quality           # same wall-clock budget, then the same fine-tune
    python benchmarks/pretraining.py all --write-docs          # everything, tables into docs/performance.md

The objectives are the shipped demo specs (``experiments/pretrain_*_demo.yaml`` for data2vec 1.0,
``experiments/pretrain2_*_demo.yaml`` for 2.0: tiny models of equal width and depth), run through
d2v's own runner pieces: the spec's data loader, optimizer and objective. Step costs are measured
in one process on a fixed set of real batches, the versions interleaved (1.0, 2.0, 1.0, ...) so
machine noise hits both; shares come from timing the objective's parts (student feature
extractor and encoder, teacher, decoder or regression head, backward, optimizer, EMA update).

Time to quality: the data2vec 1.0 demo pretraining sets the budget (its updates times its
measured s/update); data2vec 2.0 gets the same budget and fractions of it (converted into updates
with its own measured s/update, so a busy machine cannot tilt the comparison); every checkpoint
is then scored by a linear probe (a ridge classifier on its frozen, mean-pooled features: train
split -> validation accuracy) and, with ``--finetune-steps N``, also fine-tuned with
``experiments/vision_cls_demo.yaml``'s recipe; both next to the same measurement without pretraining.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import sync  # noqa: E402
DEMOS = {
    "audio": {"1.0": "experiments/pretrain_audio_demo.yaml", "2.0": "experiments/pretrain2_audio_demo.yaml"},
    "vision": {"1.0": "experiments/pretrain_vision_demo.yaml", "2.0": "experiments/pretrain2_vision_demo.yaml"},
}
#: each pretraining's architecture for the downstream classifier (its own, at 4 px patches)
PRESETS = {"1.0": "data2vec-vision-tiny", "2.0": "data2vec2-vision-tiny"}
PARTS = ("student", "teacher", "decoder", "backward", "optimizer", "ema", "other")


@contextmanager
def _in_repository():
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        yield
    finally:
        os.chdir(cwd)


# --------------------------------------------------------------------------- one objective, in process


class Objective:
    """A demo spec's objective, optimizer and a few real batches, ready to time."""

    def __init__(self, spec_path: str, device: str, overrides: list[str], batches: int):
        from d2v.spec.config import load_spec
        from d2v.data.loading import make_loader
        from d2v.spec.model import build_component
        from d2v.train import Run

        self.tmp = tempfile.TemporaryDirectory()
        spec = load_spec(ROOT / spec_path, [f"trainer.output_dir={self.tmp.name}/run", "trainer.progress_bar=false",
                                            "data.loader.num_workers=0", *overrides])
        with _in_repository():  # the demo specs name their data relative to the repository
            run = Run(spec)
        self.device = device
        self.model = run.model.to(device).train()
        transform = self.model.make_batch_transform() if hasattr(self.model, "make_batch_transform") else None
        loader = make_loader(run.datasets["train"], run.processor, run.loader_cfg, train=True, seed=1,
                             where="data.train", transform=transform)
        self.batches = []
        for batch in loader:
            self.batches.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
            if len(self.batches) == batches:
                break
        self.examples = statistics.mean(int(b["inputs"].shape[0]) for b in self.batches)
        self.optimizer = build_component(run.registry, "optimizer", spec["optim"], "optim", model=self.model)
        self.step_count = 0
        self.timers: dict[str, float] = defaultdict(float)
        self._time_parts()
        run.release()

    def _time_parts(self) -> None:
        """Wrap each part's entry points (``forward``, and the ``embed``/``contextualize`` that
        data2vec 2.0 calls directly) so their time adds to ``self.timers``; nested calls within one
        part count once."""
        model = self.model
        teacher = model.teacher.model
        parts = {"student": [model.feature_extractor, model.encoder],
                 "teacher": list(teacher.values()) if isinstance(teacher, torch.nn.ModuleDict) else [teacher],
                 "decoder": [m for m in (getattr(model, "decoder", None), getattr(model, "regression_head", None))
                             if m is not None]}
        depth: dict[str, int] = defaultdict(int)
        for part, modules in parts.items():
            for module in modules:
                for method in ("forward", "embed", "contextualize"):
                    if callable(getattr(module, method, None)):
                        setattr(module, method, self._timed_call(getattr(module, method), part, depth))

    def _timed_call(self, function, part: str, depth: dict[str, int]):
        def call(*args, **kwargs):
            depth[part] += 1
            try:
                if depth[part] > 1:
                    return function(*args, **kwargs)
                with self._timed(part):
                    return function(*args, **kwargs)
            finally:
                depth[part] -= 1
        return call

    @contextmanager
    def _timed(self, part: str):
        sync(self.device)
        start = time.perf_counter()
        yield
        sync(self.device)
        self.timers[part] += time.perf_counter() - start

    def update(self) -> float:
        """One optimizer update on the next batch; returns its seconds."""
        batch = self.batches[self.step_count % len(self.batches)]
        sync(self.device)
        start = time.perf_counter()
        out = self.model(batch)
        with self._timed("backward"):
            out.loss.backward()
        with self._timed("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        with self._timed("ema"):
            self.model.after_optimizer_step(self.step_count)
        sync(self.device)
        return time.perf_counter() - start

    def shares(self, total: float) -> dict[str, float]:
        measured = {part: self.timers.get(part, 0.0) for part in PARTS[:-1]}
        measured["other"] = max(0.0, total - sum(measured.values()))  # masking, loss, data movement
        return {part: round(seconds / total, 3) for part, seconds in measured.items()}


def compare(specs: dict[str, str], device: str, repeats: int, warmup: int, overrides: dict[str, list[str]] | None = None,
            batches: int = 4) -> dict[str, dict[str, Any]]:
    """Interleaved updates of several objectives; s/update (median), examples/s and time shares."""
    objectives = {name: Objective(path, device, (overrides or {}).get(name, []), batches) for name, path in specs.items()}
    for _ in range(warmup):
        for objective in objectives.values():
            objective.update()
    for objective in objectives.values():
        objective.timers.clear()
    times: dict[str, list[float]] = {name: [] for name in objectives}
    for _ in range(repeats):
        for name, objective in objectives.items():
            times[name].append(objective.update())
    results = {}
    for name, objective in objectives.items():
        seconds = statistics.median(times[name])
        results[name] = {"s_per_update": round(seconds, 5), "examples_per_update": objective.examples,
                         "examples_per_s": round(objective.examples / seconds, 2),
                         "shares": objective.shares(sum(times[name]))}
    return results


# --------------------------------------------------------------------------- the three studies


def step_cost(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for modality in args.modalities:
        results = compare(DEMOS[modality], args.device, args.repeats, args.warmup)
        for version, result in results.items():
            rows.append({"study": "step_cost", "modality": modality, "version": version, "device": args.device,
                         **result})
        rows[-1]["speedup_2_over_1"] = round(results["1.0"]["s_per_update"] / results["2.0"]["s_per_update"], 3)
    return rows


def clone_batch(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for modality in args.modalities:
        specs = {f"M={m}": DEMOS[modality]["2.0"] for m in args.clones}
        overrides = {f"M={m}": [f"model.objective.clone_batch={m}"] for m in args.clones}
        results = compare(specs, args.device, args.repeats, args.warmup, overrides)
        for m in args.clones:
            result = results[f"M={m}"]
            rows.append({"study": "clone_batch", "modality": modality, "clone_batch": m, "device": args.device,
                         **result, "ms_per_masked_copy": round(1e3 * result["s_per_update"] /
                                                               (m * result["examples_per_update"]), 3)})
    return rows


def _run(spec: Path | str, overrides: list[str], log: Path) -> float:
    """A ``d2v-run`` subprocess; returns its wall time. Output goes to ``log``."""
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.call([sys.executable, "-m", "d2v.cli", "run", str(spec), *overrides], cwd=ROOT,
                               stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"{spec} failed (exit {code}); see {log}")
    return time.perf_counter() - start


def _valid_metric(run_dir: Path, metric: str) -> float:
    from d2v.use.runs import load_run

    return float(load_run(run_dir).last("valid")[metric])


def _finetune_spec(work: Path, preset: str, checkpoint: Path | None) -> Path:
    spec = yaml.safe_load((ROOT / "experiments" / "vision_cls_demo.yaml").read_text())
    spec["model"] = {"preset": preset, "head": spec["model"]["head"]}
    if checkpoint is not None:
        spec["model"]["init"] = {"checkpoint": str(checkpoint)}
    path = work / f"ft_{preset}_{checkpoint.parent.name if checkpoint else 'scratch'}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _features(model, run, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooled last-layer features of a split (the runner's evaluation batches) and its labels."""
    features, labels = [], []
    with torch.no_grad():
        for batch in run.eval_loader(split):
            encoded, _ = model.encode(batch)
            features.append(encoded.last_hidden_state.mean(dim=1).double())
            labels.append(batch["labels"])
    return torch.cat(features), torch.cat(labels)


def linear_probe(work: Path, preset: str, checkpoint: Path | None, ridge: float = 1e-2) -> float:
    """Validation accuracy of a ridge-regression classifier on the frozen backbone's features: the
    usual measure of what self-supervised pretraining learned, deterministic and cheap (a
    fine-tune of a tiny model on 600 images can land 20 points apart from one seed to the next)."""
    from d2v.spec.config import load_spec
    from d2v.train import Run

    spec = _finetune_spec(work, preset, checkpoint)
    with _in_repository():  # the demo specs name their data relative to the repository
        run = Run(load_spec(spec, [f"trainer.output_dir={work / 'probe'}", "trainer.progress_bar=false",
                                   "data.loader.num_workers=0"]))
        run.release()
        model = run.model.eval()
        x, y = _features(model, run, "train")
        vx, vy = _features(model, run, "valid")
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, vx = (x - mean) / std, (vx - mean) / std
    x, vx = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1), torch.cat([vx, torch.ones(len(vx), 1, dtype=x.dtype)], 1)
    targets = torch.nn.functional.one_hot(y, int(y.max()) + 1).double()
    weights = torch.linalg.solve(x.T @ x + ridge * len(x) * torch.eye(x.shape[1], dtype=x.dtype), x.T @ targets)
    return round(100.0 * float(((vx @ weights).argmax(1) == vy).double().mean()), 1)


def time_to_quality(args: argparse.Namespace) -> list[dict[str, Any]]:
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    cost = compare(DEMOS["vision"], args.device, args.repeats, args.warmup)
    budget = args.updates_1 * cost["1.0"]["s_per_update"]
    plans = [("1.0", 1.0, args.updates_1)]
    plans += [("2.0", f, max(1, round(f * budget / cost["2.0"]["s_per_update"]))) for f in args.fractions]
    rows = []
    ft_overrides = [f"trainer.max_steps={args.finetune_steps}", "trainer.progress_bar=false",
                    f"trainer.eval_every={args.finetune_steps}", "trainer.eval_before_training=false"]
    for version, fraction, updates in plans:
        name = f"pre{version}_{updates}"
        pre_dir = work / name
        seconds = _run(DEMOS["vision"][version], [f"trainer.output_dir={pre_dir}", f"trainer.max_steps={updates}",
                                                  "trainer.progress_bar=false"], work / f"{name}.log")
        row = {"study": "time_to_quality", "version": version, "budget_fraction": fraction,
               "pretrain_updates": updates, "budget_s": round(fraction * budget, 1),
               "pretrain_wall_s": round(seconds, 1),
               "probe_accuracy": linear_probe(work, PRESETS[version], pre_dir / "final")}
        if args.finetune_steps:
            ft_dir = work / f"ft_{name}"
            _run(_finetune_spec(work, PRESETS[version], pre_dir / "final"), [f"trainer.output_dir={ft_dir}",
                                                                             *ft_overrides], work / f"ft_{name}.log")
            row.update(finetune_steps=args.finetune_steps, valid_accuracy=_valid_metric(ft_dir, "accuracy"))
        rows.append(row)
        print(json.dumps(row), flush=True)
    for version in ("1.0", "2.0"):  # the same measurements without pretraining
        row = {"study": "time_to_quality", "version": f"scratch ({PRESETS[version]})", "budget_fraction": 0.0,
               "pretrain_updates": 0, "probe_accuracy": linear_probe(work, PRESETS[version], None)}
        if args.finetune_steps:
            ft_dir = work / f"ft_scratch_{version}"
            _run(_finetune_spec(work, PRESETS[version], None), [f"trainer.output_dir={ft_dir}", *ft_overrides],
                 work / f"ft_scratch_{version}.log")
            row.update(finetune_steps=args.finetune_steps, valid_accuracy=_valid_metric(ft_dir, "accuracy"))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# --------------------------------------------------------------------------- report


def markdown(rows: list[dict[str, Any]], device: str) -> str:
    lines = [f"Measured with `python benchmarks/pretraining.py all --device {device} --write-docs` "
             f"(torch {torch.__version__}, {torch.get_num_threads()} threads).", ""]
    cost = [r for r in rows if r["study"] == "step_cost"]
    if cost:
        lines += ["| demo | objective | s / update | examples / update | examples / s | student | teacher | "
                  "decoder / head | backward | optimizer | EMA | other |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in cost:
            s = r["shares"]
            lines.append(f"| {r['modality']} | data2vec {r['version']} | {r['s_per_update']:.4f} | "
                         f"{r['examples_per_update']:.1f} | {r['examples_per_s']:.1f} | "
                         + " | ".join(f"{s[p]:.0%}" for p in PARTS) + " |")
        lines.append("")
    clones = [r for r in rows if r["study"] == "clone_batch"]
    if clones:
        lines += ["| demo | clone_batch M | s / update | ms per masked copy | teacher share | student share |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in clones:
            lines.append(f"| {r['modality']} | {r['clone_batch']} | {r['s_per_update']:.4f} | "
                         f"{r['ms_per_masked_copy']:.2f} | {r['shares']['teacher']:.0%} | {r['shares']['student']:.0%} |")
        lines.append("")
    quality = [r for r in rows if r["study"] == "time_to_quality"]
    if quality:
        lines += ["| pretraining | budget (share of 1.0's) | pretraining updates | pretraining wall s | "
                  "linear-probe accuracy | fine-tuned accuracy |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in quality:
            tuned = f"{r['valid_accuracy']:.1f}" if "valid_accuracy" in r else "-"
            lines.append(f"| {r['version'] if r['version'].startswith('scratch') else 'data2vec ' + r['version']} | "
                         f"{r['budget_fraction']:.2f} | {r['pretrain_updates']} | {r.get('pretrain_wall_s', 0):.0f} | "
                         f"{r['probe_accuracy']:.1f} | {tuned} |")
        lines.append("")
    return "\n".join(lines)


def write_docs(table: str, path: Path | None = None) -> None:
    """Replace this benchmark's block of docs/performance.md (appended the first time)."""
    from docs_blocks import DOC, replace_block

    replace_block("pretraining", table, heading="## Pretraining: data2vec 1.0 vs 2.0", path=path or DOC)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("study", choices=("step-cost", "clone-batch", "time-to-quality", "all"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modalities", nargs="*", default=["audio", "vision"], choices=list(DEMOS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--clones", nargs="*", type=int, default=[1, 2, 4, 8, 16])
    parser.add_argument("--updates-1", type=int, default=400, help="data2vec 1.0's pretraining updates (the budget)")
    parser.add_argument("--fractions", nargs="*", type=float, default=[0.25, 0.5, 1.0],
                        help="data2vec 2.0's budgets as fractions of data2vec 1.0's")
    parser.add_argument("--finetune-steps", type=int, default=0,
                        help="also fine-tune each checkpoint this many steps (vision_cls_demo's recipe; 0: probe only)")
    parser.add_argument("--work-dir", default="runs/benchmark_pretraining")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: no GPU is available here")
    studies = {"step-cost": [step_cost], "clone-batch": [clone_batch], "time-to-quality": [time_to_quality],
               "all": [step_cost, clone_batch, time_to_quality]}[args.study]
    rows = []
    for study in studies:
        for row in study(args):
            if row["study"] != "time_to_quality":  # those print as they finish
                print(json.dumps(row), flush=True)
            rows.append(row)
    if args.write_docs:
        write_docs(markdown(rows, args.device))
    return rows


if __name__ == "__main__":
    main()
