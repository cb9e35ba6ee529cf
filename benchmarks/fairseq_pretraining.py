"""One data2vec 2.0 pretraining update, d2v vs fairseq's own ``data2vec_multi``, at equal settings.

    python benchmarks/fairseq_pretraining.py --size tiny                      # quick check (~2 min, mostly imports)
    python benchmarks/fairseq_pretraining.py --size tiny base --profile --write-docs   # base: ~10 s per update on 2 idle cores
    python benchmarks/fairseq_pretraining.py --size base --profile            # + torch.profiler top ops per side

Setup (speech, fairseq's base audio recipe ``examples/data2vec/config/v2/base_audio_only_task``, or a
tiny model of the same layout): fairseq's model, criterion and ``Trainer`` are built from fairseq's
config dataclasses as the fairseq oracle builds them (``tests/fairseq_oracle``: ``oracle_trainer``,
``fairseq_env``), saved through ``Trainer.save_checkpoint``, and imported into d2v with
``d2v convert`` -- so both sides start from the same weights (student, EMA teacher, decoder), and
their eval-mode encoder outputs on the batch are compared before anything is timed. Both sides
get the same batch (``--batch`` examples of ``--seconds`` s of 16 kHz noise, unpadded, as
fairseq's pretraining crops its batches) and the same ``--clones`` masks per example, drawn once
by fairseq's own ``compute_block_mask_1d`` with the recipe's settings (mask_prob 0.5, length 5,
adjust 0.05) and given to both as ``precomputed_mask`` (what fairseq's dataset and d2v's loader
workers hand the model). fp32, dropouts as the recipe (0.1), LayerDrop 0 on both sides (it skips
random layers, which would make equal work a matter of luck).

One update is each framework's own:

* fairseq: ``Trainer.train_step([sample])`` -- ``set_num_updates`` (the EMA step), forward through
  ``data2vec_multi`` and the ``model`` criterion, backward, gradient scaling by ``sample_size``,
  the gradient norm, fairseq's Adam (decoupled weight decay on every parameter, as the recipe's plain
  ``adam`` applies it: data2vec 2.0's ``optim_overrides`` that exempt biases, norms and ALiBi scales
  act only under fairseq's ``composite`` optimizer; its Python per-parameter loop on CPU), the LR
  scheduler; with ``--precision bf16`` its ``FP16Optimizer`` around it (fp32 master weights);
* d2v: the imported ``data2vec2`` objective's forward (under bf16 autocast with ``--precision
  bf16``, as ``trainer.mixed_precision: bf16`` runs it), ``loss.backward()``, d2v's ``adam``
  (``torch.optim.AdamW``, fused, decay on every parameter: the same arithmetic per parameter),
  ``after_optimizer_step`` (the EMA step): what ``d2v-run``'s loop does per update, without
  Accelerate's wrappers and the logging window.

Each side runs in its own long-lived process (fairseq in the oracle venv ``/work/fsvenv``, see
``tests/fairseq_oracle/README.md``; d2v in this venv; fairseq's import shims patch
``dataclasses`` and ``torch.Tensor.__deepcopy__`` process-wide, so the two never share one),
and the updates are interleaved (fairseq, d2v, d2v, fairseq, ...) so machine noise hits both;
the median is reported. Peak memory is the process's ``VmHWM`` during a timed update, reset to
the resident set just before it through ``/proc/self/clear_refs`` (model, teacher, optimizer
state, libraries and the update's activations); ``resident`` is the set before the update.
Minor page faults and system CPU seconds per update (``getrusage``) show what glibc's malloc costs:
freed activations go back to the kernel and are faulted in again by the next update. ``MALLOC_*``
variables in the environment reach both workers, are named in the report, and write their own
docs block (``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736``: freed memory stays).
Shares: wall time inside each part's entry points (student = conv feature extractor + encoder
on the kept tokens of every clone, teacher = EMA forward, decoder = decoder input + conv decoder,
backward, optimizer = gradient scaling / norm / step / zero_grad, EMA = the teacher update;
other = masking, the loss, bookkeeping). Ratios are d2v / fairseq: speed above 1 = d2v faster,
memory below 1 = d2v smaller. ``--write-docs`` writes the table into its block of
``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ORACLE = ROOT / "tests" / "fairseq_oracle"
FAIRSEQ_PYTHON = os.environ.get("FAIRSEQ_PYTHON", "/work/fsvenv/bin/python")
PARTS = ("student", "teacher", "decoder", "backward", "optimizer", "ema", "other")
SIDES = ("fairseq", "d2v")
SAMPLE_RATE = 16000
PROTOCOL = "@@ "  # a worker's replies on stdout start with this; everything else it prints goes to stderr

#: fairseq's base audio recipe (config/v2/base_audio_only_task.yaml) and a tiny model of its layout
SIZES: dict[str, dict[str, Any]] = {
    "base": {
        "model": {"embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0, "average_top_k_layers": 8},
        "audio": {"feature_encoder_spec": "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]",
                  "conv_pos_depth": 5, "conv_pos_width": 95, "conv_pos_groups": 16,
                  "decoder.decoder_dim": 384, "decoder.decoder_groups": 16, "decoder.decoder_kernel": 7,
                  "decoder.decoder_layers": 4},
        "clones": 8, "batch": 2, "seconds": 5.0, "repeats": 5,
    },
    "tiny": {  # d2v's data2vec-audio-tiny width and depth, fairseq's 320x conv layout in 4 layers
        "model": {"embed_dim": 64, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0, "average_top_k_layers": 2},
        "audio": {"feature_encoder_spec": "[(32, 10, 5), (32, 8, 4), (32, 4, 4), (32, 4, 4)]",
                  "conv_pos_depth": 2, "conv_pos_width": 19, "conv_pos_groups": 16,
                  "decoder.decoder_dim": 32, "decoder.decoder_groups": 16, "decoder.decoder_kernel": 7,
                  "decoder.decoder_layers": 2},
        "clones": 4, "batch": 4, "seconds": 2.0, "repeats": 20,
    },
}
#: the recipe's settings that both sizes share (dropouts as the recipe, LayerDrop off)
RECIPE_MODEL = {"loss_beta": 0, "clone_batch": 8, "ema_decay": 0.999, "ema_end_decay": 0.99999,
                "ema_anneal_end_step": 75000, "ema_encoder_only": False, "instance_norm_target_layer": True,
                "layer_norm_target_layer": False, "layer_norm_targets": False, "layerdrop": 0.0, "norm_eps": 1e-5,
                "supported_modality": "AUDIO", "encoder_dropout": 0.1, "attention_dropout": 0.1,
                "activation_dropout": 0.0, "post_mlp_drop": 0.1, "dropout_input": 0.0}
RECIPE_AUDIO = {"prenet_depth": 0, "mask_prob": 0.5, "mask_prob_adjust": 0.05, "inverse_mask": False, "mask_length": 5,
                "mask_noise_std": 0.01, "mask_dropout": 0.0, "add_masks": False, "ema_local_encoder": False,
                "use_alibi_encoder": True, "prenet_layerdrop": 0.0, "prenet_dropout": 0.1, "learned_alibi_scale": True,
                "learned_alibi_scale_per_head": True, "decoder.input_dropout": 0.1}
OPTIM = {"lr": 7.5e-4, "betas": (0.9, 0.98), "eps": 1e-6, "weight_decay": 0.01}


# --------------------------------------------------------------------------- shared by both workers


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1]) / 1024  # kB -> MB
    return float("nan")


class Parts:
    """Wall time inside named entry points; a call nested in a timed call of the same part counts once."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.depth: dict[str, int] = defaultdict(int)

    def wrap(self, part: str, function: Callable) -> Callable:
        def call(*args, **kwargs):
            self.depth[part] += 1
            try:
                if self.depth[part] > 1:
                    return function(*args, **kwargs)
                start = time.perf_counter()
                try:
                    return function(*args, **kwargs)
                finally:
                    self.seconds[part] += time.perf_counter() - start
            finally:
                self.depth[part] -= 1
        return call

    def patch(self, part: str, owner: Any, *names: str) -> None:
        for name in names:
            if callable(getattr(owner, name, None)):
                setattr(owner, name, self.wrap(part, getattr(owner, name)))


def _top_ops(prof, n: int = 30) -> list[dict[str, Any]]:
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 1), "share": round(e.self_cpu_time_total / total, 3),
             "calls": e.count} for e in events[:n]]


def serve(update: Callable[[], None], parts: Parts, extra: dict[str, Any]) -> None:
    """Answer the parent's commands (``step``, ``profile``, ``quit``), one JSON line each."""
    import torch

    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the protocol
    sys.stdout = sys.stderr
    reply.write(PROTOCOL + json.dumps({"ready": True, **extra}) + "\n")
    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            parts.seconds.clear()
            resident = _status("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
            usage = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            update()
            seconds = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_SELF)
            answer = {"seconds": seconds, "peak_mb": _status("VmHWM"), "resident_mb": resident,
                      "parts": dict(parts.seconds), "system_s": after.ru_stime - usage.ru_stime,
                      "page_faults": after.ru_minflt - usage.ru_minflt}
        elif command == "profile":
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                update()
            answer = {"top_ops": _top_ops(prof)}
        elif command == "quit":
            break
        else:
            answer = {"error": f"unknown command {command!r}"}
        reply.write(PROTOCOL + json.dumps(answer) + "\n")


def _batch(work: Path):
    import torch

    return torch.load(work / "batch.pt", weights_only=True)


# --------------------------------------------------------------------------- fairseq side (oracle venv)


def _fairseq_config(size: str, clones: int, data: str, precision: str = "fp32"):
    import oracle_trainer as ot

    preset = SIZES[size]
    model = {**RECIPE_MODEL, **preset["model"], "clone_batch": clones,
             **{f"modalities.audio.{k}": v for k, v in {**RECIPE_AUDIO, **preset["audio"]}.items()}}
    cfg = ot.fairseq_config("audio_pretraining", {"data": data, "normalize": True}, "data2vec_multi", model,
                            lr=OPTIM["lr"], max_update=400000)
    cfg.optimizer.adam_betas = str(OPTIM["betas"])
    cfg.optimizer.adam_eps, cfg.optimizer.weight_decay = OPTIM["eps"], OPTIM["weight_decay"]
    cfg.common.bf16 = precision == "bf16"  # fairseq's --bf16: a bf16 model (teacher too), fp32 master weights
    return cfg


def _fairseq_imports() -> None:
    sys.path.insert(0, str(ORACLE))
    from fairseq_env import load_fairseq

    load_fairseq()
    import logging

    logging.getLogger().setLevel(logging.WARNING)


def fairseq_setup(args: argparse.Namespace) -> None:
    """Build fairseq's model, save it as fairseq's training does, and draw the batch and masks."""
    _fairseq_imports()
    import numpy as np
    import oracle_trainer as ot
    import torch
    from fairseq.data.data_utils import compute_block_mask_1d

    work = Path(args.work)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    _, model, _, trainer = ot.build(_fairseq_config(args.size, args.clones, str(work)))
    ot.save(trainer, str(work / "checkpoint.pt"))
    g = torch.Generator().manual_seed(args.seed)
    source = torch.randn(args.batch, int(args.seconds * SAMPLE_RATE), generator=g)
    with torch.no_grad():
        frames = model.modality_encoders["AUDIO"].local_features(source[:1]).shape[1]
    audio = model.cfg.modalities.audio
    torch.manual_seed(args.seed)
    masks = torch.cat([compute_block_mask_1d((args.clones, frames), mask_prob=audio.mask_prob,
                                             mask_length=audio.mask_length, mask_prob_adjust=audio.mask_prob_adjust,
                                             inverse_mask=audio.inverse_mask, require_same_masks=True)
                       for _ in range(args.batch)]).bool()  # (B * M, T): each example's clones, as fairseq collates
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    torch.save({"source": source, "mask": masks, "params": params}, work / "batch.pt")


def fairseq_worker(args: argparse.Namespace) -> None:
    _fairseq_imports()
    import oracle_trainer as ot
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    _, model, _, trainer = ot.build(_fairseq_config(args.size, args.clones, str(work), args.precision))
    trainer.load_checkpoint(str(work / "checkpoint.pt"), reset_optimizer=True, reset_lr_scheduler=True,
                            reset_meters=True)
    batch = _batch(work)
    source, mask = batch["source"], batch["mask"]

    model.eval()
    with torch.no_grad():
        dtype = next(model.parameters()).dtype
        hidden = model(source.to(dtype), mask=False, features_only=True)["x"].float()
    torch.save(hidden, work / "hidden_fairseq.pt")
    model.train()

    sample = {"id": torch.arange(source.shape[0]),
              "net_input": {"source": source, "padding_mask": None, "precomputed_mask": mask}}
    parts = Parts()
    audio, teacher = model.modality_encoders["AUDIO"], model.ema.model
    parts.patch("student", audio, "forward")
    for block in model.blocks:
        parts.patch("student", block, "forward")
    parts.patch("teacher", teacher.modality_encoders["AUDIO"], "contextualized_features")
    for block in teacher.blocks:
        parts.patch("teacher", block, "forward")
    parts.patch("decoder", model, "forward_decoder")
    optimizer = trainer.optimizer  # built lazily: build it before wrapping
    parts.patch("backward", optimizer, "backward")
    parts.patch("optimizer", optimizer, "step", "multiply_grads", "zero_grad")
    parts.patch("optimizer", trainer, "clip_grad_norm")
    parts.patch("ema", model, "set_num_updates")

    def update() -> None:
        trainer.train_step([sample])

    for _ in range(args.warmup):
        update()
    serve(update, parts, {"params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                          "threads": torch.get_num_threads(), "torch": torch.__version__,
                          "optimizer": _fairseq_optimizer_name(optimizer)})


def _fairseq_optimizer_name(optimizer: Any) -> str:
    """The torch optimizer inside fairseq's wrappers (``FP16Optimizer`` holds an fp32 one)."""
    inner = getattr(optimizer, "fp32_optimizer", None)
    name = "" if inner is None else type(optimizer).__name__ + " over "
    inner = (inner or optimizer)._optimizer
    return name + type(inner).__module__ + "." + type(inner).__name__


# --------------------------------------------------------------------------- d2v side (this venv)


def d2v_setup(args: argparse.Namespace) -> None:
    """``d2v convert`` of fairseq's checkpoint, as a user would run it."""
    import d2v.cli.main

    work = Path(args.work)
    shutil.rmtree(work / "d2v", ignore_errors=True)  # a kept --work-dir from an earlier run
    code = d2v.cli.main.main(["convert", str(work / "checkpoint.pt"), str(work / "d2v")])
    if code != 0:
        raise SystemExit(f"d2v convert failed (exit {code})")


def d2v_worker(args: argparse.Namespace) -> None:
    import torch
    import yaml
    from d2v.api import plugins
    from d2v.interop.weights import load_initial_weights
    from d2v.spec.model import TaskModel, build_component, build_model
    from d2v.ssl import distill2

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    converted = work / "d2v"
    spec = yaml.safe_load((converted / "spec.yaml").read_text())
    registry = plugins.registry()
    model = build_model(spec["model"], registry, "pretrain")
    load_initial_weights(model, converted, strict=True)
    batch_file = _batch(work)
    source, mask = batch_file["source"], batch_file["mask"]

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")  # what Accelerate's
    with torch.no_grad(), autocast:  # mixed_precision: bf16 wraps the forward in (loss and backward outside)
        hidden = TaskModel(model.feature_extractor, model.encoder).eval()(
            {"inputs": source, "padding_mask": None}).last_hidden_state.float()
    torch.save(hidden, work / "hidden_d2v.pt")
    model.train()
    if args.d2v_compile:  # what trainer.compile does: each Transformer block (student and teacher) compiled in place
        from d2v.nn.layer_options import apply_layer_options

        apply_layer_options(model, compile={"dynamic": False})

    batch = {"inputs": source, "padding_mask": None,
             "precomputed_mask": mask.view(source.shape[0], model.clone_batch, -1)}
    optimizer = build_component(registry, "optimizer", {"name": "adam", "lr": OPTIM["lr"], "betas": list(OPTIM["betas"]),
                                                        "eps": OPTIM["eps"], "weight_decay": OPTIM["weight_decay"]},
                                "optim", model=model)
    parts = Parts()
    for module in (model.feature_extractor, model.encoder):
        parts.patch("student", module, "forward", "embed", "contextualize")
    teacher = model.teacher.model
    for module in (teacher.values() if isinstance(teacher, torch.nn.ModuleDict) else [teacher]):
        parts.patch("teacher", module, "forward", "embed", "contextualize")
    parts.patch("decoder", model.decoder, "forward")
    parts.patch("decoder", distill2, "decoder_input")
    step = [0]

    def update() -> None:
        with autocast:
            out = model(batch)
        with timed(parts, "backward"):
            out.loss.backward()
        with timed(parts, "optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step[0] += 1
        with timed(parts, "ema"):
            model.after_optimizer_step(step[0])

    for _ in range(args.warmup):
        update()
    serve(update, parts, {"params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                          "threads": torch.get_num_threads(), "torch": torch.__version__,
                          "optimizer": type(optimizer).__module__ + "." + type(optimizer).__name__
                          + (" (fused)" if optimizer.defaults.get("fused") else ""),
                          "objective": {k: v for k, v in spec["model"].get("objective", {}).items()
                                        if k in ("clone_batch", "mask_noise_std", "decoder_input_dropout",
                                                 "decoder_dim", "decoder_layers", "decoder_kernel", "decoder_groups")}})


@contextmanager
def timed(parts: Parts, part: str):
    start = time.perf_counter()
    yield
    parts.seconds[part] += time.perf_counter() - start


# --------------------------------------------------------------------------- the parent


class Worker:
    def __init__(self, side: str, args: argparse.Namespace, work: Path):
        python = FAIRSEQ_PYTHON if side == "fairseq" else sys.executable
        self.side = side
        self.log = (work / f"{side}.log").open("w")
        cmd = [python, __file__, "--worker", side, "--work", str(work), "--size", args.size, "--clones",
               str(args.clones), "--threads", str(args.threads), "--warmup", str(args.warmup), "--precision", args.precision,
               *(["--d2v-compile"] if args.d2v_compile and side == "d2v" else [])]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, bufsize=1)

    def read(self) -> dict[str, Any]:
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL):])
        raise SystemExit(f"the {self.side} worker stopped (exit {self.proc.wait()}); see {self.log.name}")

    def ask(self, command: str) -> dict[str, Any]:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait()
        self.log.close()


def _call(cmd: list[str], log: Path) -> None:
    with log.open("w") as out:
        code = subprocess.call(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed (exit {code}); see {log}")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    keep = Path(args.work_dir) if args.work_dir else None
    tmp = None if keep else tempfile.TemporaryDirectory(prefix="d2v_fairseq_bench_")
    work = keep or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    try:
        common = ["--work", str(work), "--size", args.size, "--clones", str(args.clones), "--batch", str(args.batch),
                  "--seconds", str(args.seconds), "--seed", str(args.seed)]
        _call([FAIRSEQ_PYTHON, __file__, "--worker", "fairseq-setup", *common], work / "fairseq-setup.log")
        _call([sys.executable, __file__, "--worker", "d2v-setup", *common], work / "d2v-setup.log")
        batch = torch.load(work / "batch.pt", weights_only=True)
        workers: dict[str, Worker] = {}
        info: dict[str, dict[str, Any]] = {}
        try:
            for side in SIDES:  # one builds and warms up while the other does not exist yet
                workers[side] = Worker(side, args, work)
                info[side] = workers[side].read()
            diff = (torch.load(work / "hidden_d2v.pt") - torch.load(work / "hidden_fairseq.pt")).abs().max().item()
            times: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
            for r in range(args.repeats):
                for side in (SIDES if r % 2 == 0 else SIDES[::-1]):
                    times[side].append(workers[side].ask("step"))
                    print(json.dumps({"repeat": r, "side": side, **{k: round(v, 3) for k, v in times[side][-1].items()
                                                                   if isinstance(v, float)}}), file=sys.stderr,
                          flush=True)
            profiles = {side: workers[side].ask("profile")["top_ops"] for side in SIDES} if args.profile else {}
        finally:
            for w in workers.values():
                w.close()
    finally:
        if tmp is not None:
            tmp.cleanup()
    row: dict[str, Any] = {
        "size": args.size, "clones": args.clones, "batch": args.batch, "seconds_of_audio": args.seconds,
        "frames": int(batch["mask"].shape[1]), "masked_fraction": round(batch["mask"].float().mean().item(), 4),
        "params": info["d2v"]["params"], "fairseq_params": info["fairseq"]["params"], "threads": args.threads,
        "repeats": args.repeats, "warmup": args.warmup, "torch": info["d2v"]["torch"],
        "encoder_output_max_diff": diff, "d2v_compile": bool(args.d2v_compile), "precision": args.precision,
        "optimizers": {side: info[side]["optimizer"] for side in SIDES}, "d2v_objective": info["d2v"].get("objective"),
    }
    for side in SIDES:
        steps = times[side]
        seconds = statistics.median(s["seconds"] for s in steps)
        total = sum(s["seconds"] for s in steps)
        measured = {p: sum(s["parts"].get(p, 0.0) for s in steps) for p in PARTS[:-1]}
        measured["other"] = max(0.0, total - sum(measured.values()))
        row[side] = {"s_per_update": round(seconds, 4), "all_s": [round(s["seconds"], 4) for s in steps],
                     "page_faults": round(statistics.median(s["page_faults"] for s in steps)),
                     "system_s": round(statistics.median(s["system_s"] for s in steps), 3),
                     "peak_mb": round(max(s["peak_mb"] for s in steps)),
                     "resident_mb": round(statistics.median(s["resident_mb"] for s in steps)),
                     "shares": {p: round(v / total, 3) for p, v in measured.items()}}
        if profiles:
            row[side]["top_ops"] = profiles[side]
    row["speed_ratio"] = round(row["fairseq"]["s_per_update"] / row["d2v"]["s_per_update"], 3)
    paired = sorted(f["seconds"] / d["seconds"] for f, d in zip(times["fairseq"], times["d2v"]))  # same repeat: same load
    row["paired_speed_ratios"] = {"median": round(statistics.median(paired), 3), "min": round(paired[0], 3),
                                  "max": round(paired[-1], 3)}
    row["memory_ratio"] = round(row["d2v"]["peak_mb"] / row["fairseq"]["peak_mb"], 3)
    return row


# --------------------------------------------------------------------------- report


def markdown(rows: list[dict[str, Any]], commands: list[str]) -> str:
    precision = {"fp32": "fp32", "bf16": ("bf16 (fairseq's `--bf16`: bf16 model and teacher, fp32 master weights; d2v's "
                                          "`mixed_precision: bf16`: fp32 weights, bf16 autocast forward)")}[rows[0]["precision"]]
    lines = [(f"Measured on {platform.machine()} CPU, {os.cpu_count()} cores, torch {rows[0]['torch']}, {precision}, "
              f"{rows[0]['threads']} threads per process, the two sides interleaved so that noise hits both:"), ""]
    lines += [f"    {c}" for c in commands] + [""]
    lines += [("| size | batch | clones M | side | s / update (median) | ratio (speed) | fastest s / update | ratio | "
               "peak MB | resident MB | ratio (memory) | student | teacher | decoder | backward | optimizer | EMA | other |"),
              "| --- | --- | ---: | --- |" + " ---: |" * 14]
    for r in rows:
        batch = f"{r['batch']} x {r['seconds_of_audio']:g} s ({r['frames']} frames, {r['masked_fraction']:.0%} masked)"
        for side in SIDES:
            s = r[side]
            fastest = {k: min(r[k]["all_s"]) for k in SIDES}
            ratio_s = f"**{r['speed_ratio']:.2f}x**" if side == "d2v" else ""
            ratio_f = f"{fastest['fairseq'] / fastest['d2v']:.2f}x" if side == "d2v" else ""
            ratio_m = f"**{r['memory_ratio']:.2f}x**" if side == "d2v" else ""
            label = "d2v + trainer.compile" if side == "d2v" and r.get("d2v_compile") else side
            lines.append(f"| {r['size']} ({r['params'] / 1e6:.1f}M) | {batch} | {r['clones']} | {label} | "
                         f"{s['s_per_update']:.3f} | {ratio_s} | {fastest[side]:.3f} | {ratio_f} | {s['peak_mb']} | "
                         f"{s['resident_mb']} | {ratio_m} | "
                         + " | ".join(f"{s['shares'][p]:.0%}" for p in PARTS) + " |")
    lines.append("")
    lines.append("Median of " + ", ".join(f"{r['repeats']} ({r['size']})" for r in rows)
                 + " interleaved updates after " + ", ".join(f"{r['warmup']}" for r in rows)
                 + " warm-up update(s) per side; encoder outputs of the two imports before training differ by at most "
                 + ", ".join(f"{r['encoder_output_max_diff']:.1e} ({r['size']})" for r in rows) + ".")
    lines.append("Paired speed ratios (fairseq / d2v of the same repeat, which ran back to back): "
                 + "; ".join(f"{r['size']} median {p['median']:.2f}x, range {p['min']:.2f}-{p['max']:.2f}x"
                             for r in rows if (p := r.get("paired_speed_ratios"))) + ".")
    lines.append("Per update (medians), minor page faults and system CPU seconds: " + "; ".join(
        f"{r['size']} " + ", ".join(f"{side} {r[side]['page_faults']:,} / {r[side]['system_s']:.2f} s" for side in SIDES)
        for r in rows) + ".")
    for r in rows:  # --profile: the top operators of one more update per side, by self CPU time
        for side in SIDES:
            if r[side].get("top_ops"):
                ops = ", ".join(f"{o['op'].removeprefix('aten::')} {o['share']:.0%}" for o in r[side]["top_ops"][:8])
                lines.append(f"- {r['size']}, {side}, top operators (self CPU time, one profiled update): {ops}")
    return "\n".join(lines)


def malloc_settings() -> str:
    """glibc malloc settings given to both sides through the environment (see docs/performance.md:
    by default a CPU update page-faults its freed activations back in)."""
    return " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES")


def write_docs(table: str, *, compiled: bool, precision: str) -> None:
    """Each precision, eager and compiled, with and without malloc settings, has its own block."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from docs_blocks import DOC, replace_block

    if malloc_settings():
        replace_block(f"fairseq-pretraining-malloc-{precision}{'-compiled' if compiled else ''}", table, path=DOC,
                      heading=f"### The same with freed memory kept by malloc (both sides), {precision}"
                              + (", d2v with trainer.compile" if compiled else ""))
        return
    suffix = "" if precision == "fp32" else f"-{precision}"
    if compiled:
        replace_block(f"fairseq-pretraining-compiled{suffix}", table, path=DOC,
                      heading=f"### The same with d2v's trainer.compile (fairseq has no compiled path){', ' + precision if suffix else ''}")
    elif suffix:
        replace_block(f"fairseq-pretraining{suffix}", table, path=DOC,
                      heading=f"### The same in {precision}, each side's own mixed precision")
    else:
        replace_block("fairseq-pretraining", table, heading="## data2vec 2.0 update: d2v vs fairseq", path=DOC)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", nargs="*", default=["tiny"], choices=list(SIZES))
    parser.add_argument("--clones", type=int, default=None, help="clone_batch M (default: the size's, base 8, tiny 4)")
    parser.add_argument("--batch", type=int, default=None, help="examples per update (default: base 2, tiny 4)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds of 16 kHz audio per example (base 5, tiny 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed updates per side (default: base 5, tiny 20)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="also one profiled update per side: top ops by self CPU time")
    parser.add_argument("--work-dir", default=None, help="keep checkpoints, batch and worker logs here (default: a temporary folder)")
    parser.add_argument("--d2v-compile", action="store_true",
                        help="d2v with trainer.compile (torch.compile per Transformer block; compiled in the warm-up)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: fairseq's --bf16 against d2v's trainer.mixed_precision: bf16 (CPU autocast)")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--worker", choices=("fairseq-setup", "d2v-setup", "fairseq", "d2v"), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.size = args.size[0]
        {"fairseq-setup": fairseq_setup, "d2v-setup": d2v_setup, "fairseq": fairseq_worker,
         "d2v": d2v_worker}[args.worker](args)
        return []
    rows = []
    sizes = list(args.size)
    for size in sizes:
        one = argparse.Namespace(**vars(args))
        one.size = size
        for key in ("clones", "batch", "seconds", "repeats"):
            if getattr(args, key) is None:
                setattr(one, key, SIZES[size][key])
        if args.work_dir:
            one.work_dir = str(Path(args.work_dir) / size)
        row = measure(one)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.write_docs:
        given = list(argv if argv is not None else sys.argv[1:])
        if "--work-dir" in given:  # where the files went is not part of the measurement
            del given[given.index("--work-dir"):given.index("--work-dir") + 2]
        command = " ".join([*([malloc_settings()] if malloc_settings() else []), "python benchmarks/fairseq_pretraining.py",
                            *given])
        write_docs(markdown(rows, [command]), compiled=args.d2v_compile, precision=args.precision)
    return rows


if __name__ == "__main__":
    main()
