"""End to end: a whole CTC fine-tune through d2v's runner versus the same job through
``transformers``' ``Trainer``, data loading included.

    nice -n 5 python benchmarks/end_to_end.py                   # tiny model, CPU, 5 interleaved repetitions
    python benchmarks/end_to_end.py --device cuda --size base --write-docs
    python benchmarks/end_to_end.py --sides d2v hf hf-random --workers 2 --repeats 3

The job: fine-tune a data2vec-audio CTC model (the ``data2vec-audio-tiny`` preset, or Base) on
the demo LibriSpeech corpus (``experiments/data/speech_demo``), fp32, for ``--warmup`` +
``--updates`` optimizer updates. Both sides start from the same weights (a ``transformers``
model saved once; d2v loads it with ``model.init``, strictly), use the same batch size, AdamW
(no weight decay), linear warmup then linear decay, gradient clipping, the conv feature encoder
frozen, the same number of loader workers, and log every ``--log-every`` updates; neither
evaluates nor saves while timed.

* ``d2v``: a spec built in code, run by :class:`d2v.train.Run` (what ``d2v-run`` does);
  ``data.loader.batch_size`` sorts the corpus by length and cuts it into batches.
* ``hf``: ``Trainer`` + ``TrainingArguments`` with ``Data2VecAudioForCTC``, a torch ``Dataset``
  reading the same files (soundfile, ``Wav2Vec2FeatureExtractor``, ``Wav2Vec2CTCTokenizer``) and
  a collator that pads like d2v; ``train_sampling_strategy="group_by_length"``.
* ``hf-random``: the same with Trainer's default random batches (more padding).

Each (side, repetition) runs in a fresh process, in the order d2v, hf, d2v, hf, ...; medians
are reported. What is measured, from outside each loop (hooks, nothing inside the loops changes):

* wall time of the timed updates: from the end of update ``warmup`` to the end of the last
  (a global optimizer step post-hook; on CUDA the device is synchronised at those two points);
* examples/s and audio seconds/s over that window (unpadded audio);
* ``idle``: the time from one update's optimizer step to the next forward, summed: the model
  is idle then (batch fetch, host-to-device copy, LR schedule, zero_grad, logging, loop
  bookkeeping); ``loader``: the part of it spent inside torch's ``DataLoader`` (creating the
  epoch's iterator, ``next``), i.e. waiting for data. On a GPU these are host times;
* padding fraction: padded samples / real samples of the batches in the window;
* CPU time of the training process over the window (steadier than wall time on a shared machine);
* the training loss at the start (first 5 updates) and the end (last 10): both must learn.

One JSON line per repetition, then one per side with medians, then the d2v / HF ratios;
``--write-docs`` puts the table into the marker-delimited "End to end" section of
docs/performance.md (one block per machine / size / batch / workers configuration; the rest of
the file is left as it is).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "experiments" / "data" / "speech_demo" / "LibriSpeech"
DOCS = ROOT / "docs" / "performance.md"
SECTION_START = "<!-- end-to-end:start -->"
SECTION_END = "<!-- end-to-end:end -->"
SECTION_TITLE = "## End to end: d2v-run vs transformers' Trainer"
RUN_START = "<!-- end-to-end:run"           # + " <configuration key> -->"
RUN_END = "<!-- end-to-end:run-end -->"
PRESETS = {"tiny": "data2vec-audio-tiny", "base": "data2vec-audio-base"}
SIDES = ("d2v", "hf", "hf-random")
HF_SAMPLING = {"hf": "group_by_length", "hf-random": "random"}
SAMPLE_RATE = 16000


@dataclasses.dataclass
class Job:
    """One fine-tuning job, identical for every side."""

    size: str = "tiny"
    device: str = "cpu"
    batch_size: int = 8
    warmup: int = 10            # updates run before the timed window (not timed)
    updates: int = 100          # timed updates
    lr: float = 1e-3
    lr_warmup_steps: int = 10   # linear LR warmup, then linear decay to 0 at the last update
    clip_norm: float = 5.0
    workers: int = 0
    log_every: int = 10
    seed: int = 1
    root: str = str(CORPUS)
    split: str = "train-demo"

    @property
    def total_updates(self) -> int:
        return self.warmup + self.updates


# --------------------------------------------------------------------------- the shared model


def model_section(job: Job) -> dict[str, Any]:
    """The d2v ``model:`` spec of the job (the recipe shape of experiments/asr_demo.yaml)."""
    return {
        "preset": PRESETS[job.size],
        "encoder": {"mask_time_prob": 0.05, "mask_time_length": 5, "mask_feature_prob": 0.0, "layerdrop": 0.0},
        "head": {"name": "ctc", "vocab": "librispeech", "ctc_loss_reduction": "mean", "ctc_zero_infinity": True},
        "freeze": ["feature_extractor.conv_layers"],
    }


def prepare_checkpoint(job: Job, directory: str | Path) -> Path:
    """Save a freshly initialised ``Data2VecAudioForCTC`` (transformers' own seeded init) that
    both sides start from, with its feature extractor and CTC tokenizer files.

    The Hugging Face config is derived from the d2v spec through d2v's exporter, so the two
    architectures cannot drift apart; d2v then loads the weights back strictly."""
    import torch
    import transformers

    from d2v.api import plugins
    from d2v.interop.hf import save_pretrained
    from d2v.spec.model import build_model

    directory = Path(directory)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(build_model(model_section(job), plugins.registry(), "finetune"), tmp, "Data2VecAudioForCTC")
        config = transformers.Data2VecAudioConfig.from_pretrained(tmp)
        vocab = Path(tmp, "vocab.json").read_text()
    torch.manual_seed(job.seed)
    transformers.Data2VecAudioForCTC(config).save_pretrained(directory)
    (directory / "vocab.json").write_text(vocab)
    feature_extractor = transformers.Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=True, return_attention_mask=True)
    feature_extractor.save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------- measuring a loop


class LoopClock:
    """Times a training loop from outside: when each forward starts, when each optimizer step
    ends, and how long the main process spends inside torch's ``DataLoader``.

    ``batch_stats(args, kwargs) -> (examples, real_samples, padded_size)`` reads a batch as the
    model gets it (``padded_size``: batch x longest); ``real_samples`` may stay a tensor (no host
    sync until :meth:`summary`). ``sync_after``: the
    update numbers after which the device is synchronised (the timed window's two ends)."""

    def __init__(self, model, batch_stats: Callable, *, device: str, sync_after: tuple[int, ...] = ()):
        self.model = model
        self.batch_stats = batch_stats
        self.cuda = device.startswith("cuda")
        self.sync_after = set(sync_after)
        self.forward_start: list[float] = []
        self.forward_cpu: list[float] = []   # this process's CPU time at each forward start
        self.step_end: list[float] = []
        self.step_cpu: list[float] = []      # this process's CPU time at each step end
        self.loader_s: list[float] = []      # time inside the DataLoader before each forward
        self.examples: list[int] = []
        self.real: list[Any] = []
        self.padded: list[int] = []          # batch * longest, real included
        self.losses: list[Any] = []
        self._loader_pending = 0.0
        self._undo: list[Callable[[], None]] = []

    def __enter__(self) -> LoopClock:
        from torch.optim.optimizer import register_optimizer_step_post_hook
        from torch.utils.data import DataLoader, dataloader

        handles = [self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                   self.model.register_forward_hook(self._after_forward),
                   register_optimizer_step_post_hook(self._after_step)]
        self._undo += [h.remove for h in handles]
        self._time_method(DataLoader, "__iter__")
        self._time_method(dataloader._BaseDataLoaderIter, "__next__")
        return self

    def __exit__(self, *exc) -> None:
        while self._undo:
            self._undo.pop()()

    def _time_method(self, cls: type, name: str) -> None:
        original = cls.__dict__[name]

        def timed(obj, *args, **kwargs):
            start = time.perf_counter()
            try:
                return original(obj, *args, **kwargs)
            finally:
                self._loader_pending += time.perf_counter() - start

        setattr(cls, name, timed)
        self._undo.append(lambda: setattr(cls, name, original))

    def _before_forward(self, module, args, kwargs) -> None:
        self.forward_start.append(time.perf_counter())
        self.forward_cpu.append(time.process_time())
        self.loader_s.append(self._loader_pending)
        self._loader_pending = 0.0
        examples, real, padded = self.batch_stats(args, kwargs)
        self.examples.append(examples)
        self.real.append(real)
        self.padded.append(padded)

    def _after_forward(self, module, args, output) -> None:
        self.losses.append(output.loss.detach())

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self.cuda and len(self.step_end) + 1 in self.sync_after:
            import torch

            torch.cuda.synchronize()
        self.step_end.append(time.perf_counter())
        self.step_cpu.append(time.process_time())

    def summary(self, job: Job) -> dict[str, Any]:
        """The timed window's numbers (updates ``warmup + 1 .. warmup + updates``)."""
        first, last = job.warmup, job.total_updates  # 0-based: forwards first..last-1
        if len(self.step_end) < last or len(self.forward_start) < last:
            raise RuntimeError(f"the loop made {len(self.step_end)} updates and {len(self.forward_start)} forwards; "
                               f"{last} of each were expected (one forward per update)")
        wall = self.step_end[last - 1] - self.step_end[first - 1]
        cpu = self.step_cpu[last - 1] - self.step_cpu[first - 1]
        idle = sum(self.forward_start[k] - self.step_end[k - 1] for k in range(first, last))
        compute_cpu = sum(self.step_cpu[k] - self.forward_cpu[k] for k in range(first, last))
        loader = sum(self.loader_s[first:last])
        examples = sum(self.examples[first:last])
        real = sum(float(r) for r in self.real[first:last])
        padded = sum(self.padded[first:last])
        losses = [float(x) for x in self.losses[:last]]
        return {
            "updates": job.updates, "examples": examples, "wall_s": round(wall, 4),
            "examples_per_s": round(examples / wall, 3),
            "cpu_s": round(cpu, 4), "examples_per_cpu_s": round(examples / cpu, 3),
            "compute_cpu_s": round(compute_cpu, 4),  # forward to optimizer step; the rest is idle
            "audio_s_per_s": round(real / SAMPLE_RATE / wall, 3),
            "loader_s": round(loader, 4), "loader_share": round(loader / wall, 4),
            "idle_s": round(idle, 4), "idle_share": round(idle / wall, 4),
            "padding_fraction": round((padded - real) / real, 4),
            "loss_start": round(statistics.fmean(losses[:5]), 4),
            "loss_end": round(statistics.fmean(losses[-10:]), 4),
        }


# --------------------------------------------------------------------------- d2v


def d2v_spec(job: Job, checkpoint: Path, output_dir: Path) -> dict[str, Any]:
    return {
        "task": "finetune",
        "seed": job.seed,
        "model": {**model_section(job), "init": {"checkpoint": str(checkpoint), "strict": True}},
        "data": {
            "processor": {"name": "audio", "sample_rate": SAMPLE_RATE, "normalize": True},
            "train": {"name": "librispeech", "root": job.root, "splits": [job.split]},
            "loader": {"batch_size": job.batch_size, "num_workers": job.workers},
        },
        "optim": {"name": "adamw", "lr": job.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
        "schedule": {"name": "polynomial", "warmup_steps": job.lr_warmup_steps, "power": 1.0, "final_lr_scale": 0.0},
        "trainer": {"output_dir": str(output_dir), "max_steps": job.total_updates, "clip_norm": job.clip_norm,
                    "mixed_precision": "no", "log_every": job.log_every, "eval_every": 0, "save_every": 0,
                    "progress_bar": False, "cpu": job.device == "cpu"},
    }


def _d2v_batch_stats(args, kwargs):
    batch = args[0]
    inputs = batch["inputs"]
    return int(inputs.shape[0]), batch["lengths"].sum(), int(inputs.numel())


def run_d2v(job: Job, checkpoint: Path, workdir: Path) -> dict[str, Any]:
    from d2v.spec.config import spec_from_dict
    from d2v.train import Run

    runner = Run(spec_from_dict(d2v_spec(job, checkpoint, workdir / "d2v-run"), "end_to_end.py"))
    with LoopClock(runner.model, _d2v_batch_stats, device=job.device,
                   sync_after=(job.warmup, job.total_updates)) as clock:
        runner.train()
    return clock.summary(job)


# --------------------------------------------------------------------------- transformers


class LibriSpeechForCTC:
    """The LibriSpeech layout read as a ``transformers`` user would: soundfile for the audio,
    the feature extractor for normalisation, the CTC tokenizer for the transcript (in the
    loader workers, like d2v's processor)."""

    def __init__(self, root: str, split: str, feature_extractor, tokenizer):
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer
        self.items: list[tuple[Path, str]] = []
        for transcripts in sorted(Path(root, split).glob("*/*/*.trans.txt")):
            for line in transcripts.read_text(encoding="utf-8").splitlines():
                utterance, _, text = line.partition(" ")
                self.items.append((transcripts.parent / f"{utterance}.flac", text.strip()))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import soundfile

        path, text = self.items[index]
        audio, rate = soundfile.read(path, dtype="float32")
        values = self.feature_extractor(audio, sampling_rate=rate).input_values[0]
        return {"input_values": values, "labels": self.tokenizer(text).input_ids}


class PadForCTC:
    """Pads waveforms with zeros after normalisation (with an attention mask) and labels with
    -100: what d2v's audio processor and CTC head do."""

    def __init__(self, feature_extractor, tokenizer):
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.feature_extractor.pad([{"input_values": f["input_values"]} for f in features], padding=True,
                                           return_attention_mask=True, return_tensors="pt")
        labels = self.tokenizer.pad({"input_ids": [f["labels"] for f in features]}, padding=True, return_tensors="pt")
        batch["labels"] = labels["input_ids"].masked_fill(labels["attention_mask"].ne(1), -100)
        return batch


def hf_tools(checkpoint: Path):
    import transformers

    feature_extractor = transformers.Wav2Vec2FeatureExtractor.from_pretrained(checkpoint)
    tokenizer = transformers.Wav2Vec2CTCTokenizer(str(checkpoint / "vocab.json"), unk_token="<unk>",
                                                  pad_token="<pad>", word_delimiter_token="|")
    return feature_extractor, tokenizer


def _hf_batch_stats(args, kwargs):
    values = kwargs["input_values"]
    return int(values.shape[0]), kwargs["attention_mask"].sum(), int(values.numel())


def run_hf(job: Job, checkpoint: Path, workdir: Path, sampling: str = "group_by_length") -> dict[str, Any]:
    import transformers

    feature_extractor, tokenizer = hf_tools(checkpoint)
    model = transformers.Data2VecAudioForCTC.from_pretrained(checkpoint)
    model.freeze_feature_encoder()
    args = transformers.TrainingArguments(
        output_dir=str(workdir / "hf-run"), per_device_train_batch_size=job.batch_size,
        max_steps=job.total_updates, learning_rate=job.lr, lr_scheduler_type="linear",
        warmup_steps=job.lr_warmup_steps, optim="adamw_torch", weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=job.clip_norm, logging_strategy="steps",
        logging_steps=job.log_every, eval_strategy="no", save_strategy="no", report_to="none",
        dataloader_num_workers=job.workers, train_sampling_strategy=sampling, seed=job.seed,
        use_cpu=job.device == "cpu", disable_tqdm=True, bf16=False, fp16=False,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=LibriSpeechForCTC(job.root, job.split, feature_extractor, tokenizer),
        data_collator=PadForCTC(feature_extractor, tokenizer), processing_class=feature_extractor,
    )
    with LoopClock(model, _hf_batch_stats, device=job.device,
                   sync_after=(job.warmup, job.total_updates)) as clock:
        trainer.train()
    return clock.summary(job)


# --------------------------------------------------------------------------- one measurement


def run_side(side: str, job: Job, checkpoint: str | Path) -> dict[str, Any]:
    """Run one side's job in this process; its console output goes to stderr."""
    import torch

    checkpoint = Path(checkpoint)
    workdir = Path(tempfile.mkdtemp(prefix=f"e2e-{side}-"))
    try:
        with contextlib.redirect_stdout(sys.stderr):
            if side == "d2v":
                numbers = run_d2v(job, checkpoint, workdir)
            elif side in HF_SAMPLING:
                numbers = run_hf(job, checkpoint, workdir, HF_SAMPLING[side])
            else:
                raise ValueError(f"unknown side {side!r}; choose from {', '.join(SIDES)}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"side": side, "device": job.device, "size": job.size, "batch_size": job.batch_size,
            "workers": job.workers, "threads": torch.get_num_threads(), **numbers}


def run_side_in_subprocess(side: str, job: Job, checkpoint: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--run-side", side, "--job", json.dumps(dataclasses.asdict(job)),
           "--checkpoint", str(checkpoint)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{side} run failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report

#: what every repetition of a side shares
SETTINGS = ("device", "size", "batch_size", "workers", "threads", "updates", "examples")
#: the per-repetition numbers whose median is reported
MEDIAN_FIELDS = ("wall_s", "examples_per_s", "cpu_s", "examples_per_cpu_s", "compute_cpu_s", "audio_s_per_s",
                 "loader_s", "loader_share", "idle_s", "idle_share", "padding_fraction", "loss_start", "loss_end")
SIDE_NAMES = {"d2v": "d2v-run (length-sorted batches)", "hf": "Trainer, group_by_length",
              "hf-random": "Trainer, random batches"}


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per side: the median of every number over its repetitions."""
    summaries = []
    for side in dict.fromkeys(r["side"] for r in rows):
        mine = [r for r in rows if r["side"] == side]
        summary = {"kind": "summary", "side": side, "repetitions": len(mine),
                   **{k: mine[0][k] for k in SETTINGS}}
        summary.update({k: round(statistics.median(r[k] for r in mine), 4) for k in MEDIAN_FIELDS})
        summaries.append(summary)
    return summaries


def ratios(summaries: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """d2v / each Hugging Face side: above 1, d2v does more examples per second of wall time
    (or of its training process's CPU time). ``examples_per_s`` is the ratio of the medians;
    ``examples_per_s_paired`` the median of the per-repetition ratios (each pair ran back to
    back, so a load change on a shared machine hits both of a pair)."""
    by_side = {s["side"]: s for s in summaries}
    ours = by_side.get("d2v")
    if ours is None:
        return []
    d2v_runs = {r["repetition"]: r for r in rows if r["side"] == "d2v"}
    result = []
    for side, theirs in by_side.items():
        if side == "d2v":
            continue
        paired = [d2v_runs[r["repetition"]]["examples_per_s"] / r["examples_per_s"]
                  for r in rows if r["side"] == side and r["repetition"] in d2v_runs]
        result.append({"kind": "ratio", "d2v_over": side,
                       "examples_per_s": round(ours["examples_per_s"] / theirs["examples_per_s"], 3),
                       "examples_per_s_paired": round(statistics.median(paired), 3),
                       "examples_per_cpu_s": round(ours["examples_per_cpu_s"] / theirs["examples_per_cpu_s"], 3)})
    return result


def machine(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.machine() or 'CPU'} CPU, {os.cpu_count()} cores"


INTRO = f"""{SECTION_TITLE}

`python benchmarks/end_to_end.py` fine-tunes the same CTC model on the demo LibriSpeech corpus
(experiments/data/speech_demo, train-demo: 400 utterances of 1-2.4 s) through d2v's runner
(`d2v.train.Run`, what `d2v-run` does) and through `transformers`' `Trainer`: same initial weights
(a saved `Data2VecAudioForCTC`, loaded by d2v with `model.init`, strictly), same batch size, AdamW
without weight decay, linear warmup then linear decay, clipping at 5, frozen conv feature encoder,
SpecAugment as in experiments/asr_demo.yaml, fp32, the same number of loader workers, a log line
every 10 updates, no evaluation or saving. The `Trainer` side reads the files in its `Dataset` with
soundfile, `Wav2Vec2FeatureExtractor` and `Wav2Vec2CTCTokenizer` (the same features within 1e-6
and the same label ids as d2v's processor and CTC head) and pads in a collator the way d2v does.
Every run is a fresh process; runs alternate (d2v, Trainer, d2v, Trainer, ...) and medians are
shown. Timing is taken from outside both loops, without changing them: a global optimizer step
post-hook marks the end of each update and a forward pre-hook the start of each forward.

- *examples/s*: examples of the timed updates / wall time from the end of the last untimed update
  to the end of the last timed one (on CUDA the device is synchronised at both ends); *audio s/s*
  counts unpadded audio. *per CPU s*: examples / CPU time of the training process over the same
  window: on a shared machine it is steadier than wall time (loader workers' CPU is not in it).
- *idle*: summed time from each update's optimizer step to the next forward, when the model
  waits: batch fetch, host-to-device copy, LR schedule, zero_grad, logging. *loader*: the part of
  it spent inside torch's `DataLoader` (creating an epoch's iterator, `next`), i.e. waiting for data.
- *padding*: padded samples / real samples over the timed batches. d2v's `data.loader.batch_size`
  sorts the whole corpus by length before cutting batches; `group_by_length` sorts groups of
  (here) 12 batches; random batches show what padding costs.
- *loss*: mean training loss of the first 5 and the last 10 updates (both sides learn).
"""


def run_block(summaries: list[dict[str, Any]], ratio_rows: list[dict[str, Any]], job: Job, repeats: int) -> str:
    """One configuration's table (machine, size, batch, workers), delimited so that measuring
    another configuration adds a block instead of replacing this one."""
    import torch
    import transformers

    threads = summaries[0]["threads"] if summaries else torch.get_num_threads()
    lines = [
        f"{RUN_START} {run_key(job)} -->",
        f"### {machine(job.device)}, {job.size} (`{PRESETS[job.size]}`), batch {job.batch_size}, "
        f"{job.workers} loader workers",
        "",
        f"`{f'OMP_NUM_THREADS={threads} nice -n 5 ' if job.device == 'cpu' else ''}"
        f"python benchmarks/end_to_end.py --device {job.device} --size {job.size} --batch-size {job.batch_size} "
        f"--workers {job.workers} --updates {job.updates} --warmup {job.warmup} --repeats {repeats} "
        f"--sides {' '.join(s['side'] for s in summaries)} --write-docs` "
        f"({threads} torch thread{'' if threads == 1 else 's'}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}): "
        f"{job.updates} timed updates after {job.warmup} untimed {'one' if job.warmup == 1 else 'ones'}, "
        f"median of {repeats}.",
        "",
        "| loop | examples/s | audio s/s | per CPU s | loader (share) | idle (share) | padding | loss start -> end |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summaries:
        lines.append(f"| {SIDE_NAMES.get(s['side'], s['side'])} | {s['examples_per_s']:.1f} | "
                     f"{s['audio_s_per_s']:.1f} | {s['examples_per_cpu_s']:.1f} | "
                     f"{s['loader_s']:.2f} s ({s['loader_share']:.0%}) | {s['idle_s']:.2f} s ({s['idle_share']:.0%}) | "
                     f"{s['padding_fraction']:.1%} | {s['loss_start']:.2f} -> {s['loss_end']:.2f} |")
    lines.append("")
    for r in ratio_rows:
        lines.append(f"- d2v / {SIDE_NAMES.get(r['d2v_over'], r['d2v_over'])}: **{r['examples_per_s']:.2f}x** "
                     f"examples/s (median of the paired repetitions' ratios: {r['examples_per_s_paired']:.2f}x), "
                     f"{r['examples_per_cpu_s']:.2f}x examples per CPU second.")
    lines.append(RUN_END)
    return "\n".join(lines) + "\n"


def run_key(job: Job) -> str:
    return f"{job.device.split(':')[0]}-{job.size}-b{job.batch_size}-w{job.workers}"


def _run_blocks(section: str) -> dict[str, str]:
    """The configuration blocks of an existing section, by key, in order."""
    blocks: dict[str, str] = {}
    rest = section
    while (start := rest.find(RUN_START)) != -1 and (end := rest.find(RUN_END, start)) != -1:
        block = rest[start:end + len(RUN_END)]
        blocks[block[len(RUN_START):].split("-->", 1)[0].strip()] = block
        rest = rest[end + len(RUN_END):]
    return blocks


def replace_section(document: str, key: str, block: str) -> str:
    """``document`` with ``block`` put into its end-to-end section (replacing the block of the
    same configuration ``key``, keeping the others; the section is appended when missing).
    Nothing outside the section's markers changes."""
    start, end = document.find(SECTION_START), document.find(SECTION_END)
    present = start != -1 and end > start
    blocks = _run_blocks(document[start:end]) if present else {}
    blocks[key] = block.strip("\n")
    section = SECTION_START + "\n" + "\n\n".join([INTRO.strip("\n"), *blocks.values()]) + "\n" + SECTION_END
    if present:
        return document[:start] + section + document[end + len(SECTION_END):]
    return (document.rstrip("\n") + "\n\n" if document.strip() else "") + section + "\n"

# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = Job()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--size", choices=tuple(PRESETS), default=defaults.size)
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=["d2v", "hf"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--updates", type=int, default=defaults.updates, help="timed optimizer updates")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="untimed updates first (>= 1)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--workers", type=int, default=defaults.workers, help="DataLoader workers (both sides)")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--log-every", type=int, default=defaults.log_every)
    parser.add_argument("--split", default=defaults.split, help="split of the demo corpus to train on")
    parser.add_argument("--write-docs", action="store_true",
                        help="put the table into docs/performance.md (its end-to-end section only)")
    parser.add_argument("--markdown-out", default=None, help="write the section to this file instead")
    parser.add_argument("--run-side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.updates < 1:
        parser.error("--warmup and --updates must be >= 1 (the window starts at the end of an update)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.run_side:  # a child process: one measurement, one JSON line
        print(json.dumps(run_side(args.run_side, Job(**json.loads(args.job)), args.checkpoint)), flush=True)
        return
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: no GPU is available here")
    job = Job(size=args.size, device=args.device, batch_size=args.batch_size, warmup=args.warmup,
              updates=args.updates, lr=args.lr, workers=args.workers, log_every=args.log_every, split=args.split)
    rows = []
    with tempfile.TemporaryDirectory(prefix="e2e-checkpoint-") as tmp:
        checkpoint = prepare_checkpoint(job, tmp)
        for repetition in range(args.repeats):
            for side in args.sides:
                row = {"kind": "repetition", "repetition": repetition, **run_side_in_subprocess(side, job, checkpoint)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    summaries = summarize(rows)
    ratio_rows = ratios(summaries, rows)
    for line in summaries + ratio_rows:
        print(json.dumps(line), flush=True)
    target = Path(args.markdown_out) if args.markdown_out else (DOCS if args.write_docs else None)
    if target is not None:
        document = target.read_text() if target.exists() else ""
        target.write_text(replace_section(document, run_key(job), run_block(summaries, ratio_rows, job, args.repeats)))
        print(f"wrote the end-to-end section to {target}", file=sys.stderr)


if __name__ == "__main__":
    main()
