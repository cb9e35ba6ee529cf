"""d2v vs Hugging Face ``transformers``, side by side: fine-tuning step and inference speed, peak
memory and achieved FLOP/s, for every modality.

    python benchmarks/run.py                          # base size, CPU, every case, fp32 and bf16
    python benchmarks/run.py --device cuda --write-docs
    python benchmarks/run.py --size tiny --cases text_cls_8x256 --dtypes fp32 --repeats 3

Both implementations hold the same weights (the Hugging Face model is loaded through
``d2v.from_pretrained``) and get the same batch; timings are interleaved (HF, d2v, d2v, HF, ...)
so machine noise hits both, and the median is reported, with the quartiles of the per-repeat
ratios. A fine-tuning step is forward + loss + backward + ``torch.optim.AdamW`` step (the same
optimizer for both). Peak memory is measured per case in a fresh process after the model and
optimizer exist (Linux ``VmHWM`` reset through ``/proc/self/clear_refs``; ``max_memory_allocated``
on CUDA). One JSON line per case goes to stdout; ``--write-docs`` puts the table into its own
marked block of ``docs/performance.md``. Ratios are d2v / HF: above 1 is faster for speed, below 1
is smaller for memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import CASES, build  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


#: what is timed: Hugging Face eager and compiled (``torch.compile`` of the whole model), d2v as
#: loaded, and d2v with ``padding_free`` on (cases with padding only)
IMPLS = ("hf", "hf_compiled", "d2v", "d2v_padding_free")


def model_for(impl: str, hf, ours):
    """The model ``impl`` times (d2v's ``padding_free`` is set on its encoder)."""
    if impl.startswith("hf"):
        return torch.compile(hf) if impl == "hf_compiled" else hf
    from d2v.nn.layer_options import set_padding_free

    set_padding_free(ours, impl == "d2v_padding_free")
    return ours


def make_step(model, inputs: dict, labels, mode: str, dtype: str, device: str,
              before: Callable[[], None] = lambda: None) -> Callable[[], None]:
    """One fine-tuning step or one inference forward, as a closure (``before`` runs first: the
    d2v variants share one model and switch ``padding_free`` there)."""
    cast = DTYPES[dtype]
    autocast = (lambda: torch.autocast(device.split(":")[0], dtype=cast)) if cast is not None else nullcontext
    if mode == "train":  # fused: what transformers' Trainer and d2v's optim both use by default
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

        def step() -> None:
            before()
            model.train()
            with autocast():
                loss = model(**inputs, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        def step() -> None:
            before()
            model.eval()
            with torch.no_grad(), autocast():
                model(**inputs)
    return step


def timed(step: Callable[[], None], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - start


def matmul_peak(device: str, dtype: str) -> float:
    """This machine's FLOP/s on a large square matmul (the ceiling for the FLOP fraction)."""
    n = 2048 if device == "cpu" else 8192
    cast = DTYPES[dtype] or torch.float32
    a, b = torch.randn(n, n, device=device, dtype=cast), torch.randn(n, n, device=device, dtype=cast)
    torch.mm(a, b)
    times = [timed(lambda: torch.mm(a, b), device) for _ in range(5)]
    return 2 * n**3 / min(times)


def step_flops(step: Callable[[], None]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


# --------------------------------------------------------------------------- memory (own process)


def _read_status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1]) / 1024  # kB -> MB
    return float("nan")


def probe_memory(case: str, impl: str, mode: str, dtype: str, size: str, device: str,
                 options: argparse.Namespace) -> float:
    """Peak MB of one step, with model, optimizer state and warm-up already resident."""
    hf, ours, inputs, labels, _ = build(case, size, device)
    hf, ours = prepare(hf, ours, options)
    model = model_for(impl, hf, ours)
    hf = ours = None  # only the measured model stays resident
    step = make_step(model, inputs, labels, mode, dtype, device)
    step()  # optimizer state, caches
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    step()
    return _read_status("VmHWM")


def memory_in_subprocess(case: str, impl: str, mode: str, dtype: str, size: str, device: str,
                         options: argparse.Namespace) -> float:
    cmd = [sys.executable, __file__, "--probe-memory", case, impl, mode, dtype, "--size", size, "--device", device,
           "--compile", options.compile] + (["--gradient-checkpointing"] if options.gradient_checkpointing else [])
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        print(result.stderr[-2000:], file=sys.stderr)
        return float("nan")
    return float(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- one case


def prepare(hf, ours, options: argparse.Namespace):
    """Apply ``--compile d2v`` (``trainer.compile``'s per-block compile; the compiled Hugging Face
    baseline is its own column, ``hf_compiled``) and ``--gradient-checkpointing`` (d2v:
    ``trainer.gradient_checkpointing``; HF: ``gradient_checkpointing_enable()``)."""
    from d2v.nn.layer_options import apply_layer_options

    apply_layer_options(ours, compile=options.compile == "d2v", gradient_checkpointing=options.gradient_checkpointing)
    if options.gradient_checkpointing:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return hf, ours


def impls_for(case: str, args: argparse.Namespace) -> list[str]:
    wanted = ["hf"] + (["hf_compiled"] if args.hf_compiled else []) + ["d2v"]
    return wanted + (["d2v_padding_free"] if args.padding_free and CASES[case].padded else [])


def run_case(case: str, mode: str, dtype: str, args: argparse.Namespace, peaks: dict[str, float]) -> dict[str, Any]:
    hf, ours, inputs, labels, samples = build(case, args.size, args.device)
    hf, ours = prepare(hf, ours, args)
    impls = impls_for(case, args)
    steps = {}
    for impl in impls:
        model = model_for(impl, hf, ours)
        before = (lambda on=(impl == "d2v_padding_free"): model_for("d2v_padding_free" if on else "d2v", hf, ours)) \
            if impl.startswith("d2v") else (lambda: None)
        steps[impl] = make_step(model, inputs, labels, mode, dtype, args.device, before)
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for r in range(args.repeats):  # the order flips every repeat, so neither side always runs first
        for impl in (impls if r % 2 == 0 else impls[::-1]):
            times[impl].append(timed(steps[impl], args.device))
    speed = {impl: samples / statistics.median(t) for impl, t in times.items()}
    best = max((impl for impl in impls if impl.startswith("d2v")), key=speed.get)
    flops = step_flops(steps["d2v"])
    row: dict[str, Any] = {
        "case": case, "mode": mode, "dtype": dtype, "device": args.device, "size": args.size,
        "compile": args.compile, "gradient_checkpointing": args.gradient_checkpointing,
        **{f"{impl}_samples_per_s": round(speed[impl], 3) for impl in impls},
        "speed_ratio": round(speed["d2v"] / speed["hf"], 3), "best_d2v": best,
        "best_speed_ratio": round(speed[best] / speed["hf"], 3),
        "paired_best_ratio": paired_quartiles(times["hf"], times[best]),
        "d2v_flops_fraction": round(flops * speed["d2v"] / samples / peaks[dtype], 4),
    }
    if "hf_compiled" in speed:
        row["best_vs_hf_compiled"] = round(speed[best] / speed["hf_compiled"], 3)
    if "d2v_padding_free" in speed:
        row["padding_free_ratio"] = round(speed["d2v_padding_free"] / speed["d2v"], 3)
    if args.memory:
        peak = {impl: memory_in_subprocess(case, impl, mode, dtype, args.size, args.device, args) for impl in impls}
        row.update({f"{impl}_peak_mb": round(mb, 1) for impl, mb in peak.items()})
        row["memory_ratio"] = round(peak[best] / min(peak[i] for i in impls if i.startswith("hf")), 3)
    return row


def paired_quartiles(reference: list[float], ours: list[float]) -> dict[str, float]:
    """Quartiles of the per-repeat speed ratios (the two steps of one repeat ran back to back, under
    the same load): steadier than a ratio of medians on a shared machine."""
    ratios = sorted(a / b for a, b in zip(reference, ours))
    q1, median, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {"q1": round(q1, 3), "median": round(median, 3), "q3": round(q3, 3)}


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "CPU"
    flags = (f" --compile {args.compile}" if args.compile != "none" else "") + \
        (" --gradient-checkpointing" if args.gradient_checkpointing else "")
    lines = [
        f"Measured with `python benchmarks/run.py --device {args.device} --size {args.size}{flags} --write-docs` on "
        f"{device} ({torch.get_num_threads()} threads), torch {torch.__version__}. Same weights, same padded "
        f"batch, interleaved timings (median of {args.repeats}; the order flips every repeat). Paired: the "
        "per-repeat ratios' median and quartiles. Samples/s per implementation: HF eager, HF + `torch.compile` "
        "(when measured), d2v padded, d2v `padding_free` (audio and text). Ratios use d2v's faster variant "
        "(`best`): vs HF eager, vs HF compiled; padding-free / padded; memory = d2v best's peak / the smaller HF peak, one fresh process per "
        "measurement (< 1: d2v smaller); FLOP fraction = d2v padded's achieved FLOP/s over this machine's "
        "large-matmul FLOP/s in that dtype.",
        "",
        "| case | step | dtype | HF | HF compiled | d2v | d2v padding-free | best / HF | paired best / HF (quartiles) "
        "| best / HF compiled | padding-free / padded | memory ratio | d2v FLOP fraction |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def cell(row: dict[str, Any], key: str, bold: bool = False) -> str:
        value = row.get(key)
        return "-" if value is None else (f"**{value:.2f}**" if bold else f"{value:.2f}")

    def paired(row: dict[str, Any]) -> str:
        q = row.get("paired_best_ratio")
        return "-" if q is None else f"{q['median']:.2f} ({q['q1']:.2f}-{q['q3']:.2f})"

    for r in rows:
        lines.append(f"| {CASES[r['case']].description} | {'fine-tune' if r['mode'] == 'train' else 'inference'} | "
                     f"{r['dtype']} | " + " | ".join(cell(r, f"{impl}_samples_per_s") for impl in IMPLS) +
                     f" | {cell(r, 'best_speed_ratio', True)} | {paired(r)} | "
                     f"{cell(r, 'best_vs_hf_compiled', True)} | "
                     f"{cell(r, 'padding_free_ratio')} | {cell(r, 'memory_ratio')} | {r['d2v_flops_fraction']:.1%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", choices=("base", "tiny"), default="base")
    parser.add_argument("--cases", nargs="*", default=None, choices=list(CASES) + ["realistic", "small"],
                        help="case names, or 'realistic' / 'small' (default: small on CPU, realistic on a GPU)")
    parser.add_argument("--modes", nargs="*", default=["train", "infer"], choices=["train", "infer"])
    parser.add_argument("--dtypes", nargs="*", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--compile", choices=("none", "d2v"), default="none",
                        help="d2v's per-block trainer.compile")
    parser.add_argument("--hf-compiled", action=argparse.BooleanOptionalAction, default=None,
                        help="also time torch.compile(HF model) (default: on a GPU only)")
    parser.add_argument("--padding-free", action=argparse.BooleanOptionalAction, default=True,
                        help="also time d2v with padding_free on the padded cases (audio, text)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="activation checkpointing on both sides (memory for speed)")
    parser.add_argument("--write-docs", action="store_true", help="put the table into its block of docs/performance.md")
    parser.add_argument("--markdown-out", default=None, help="write the table to this file instead")
    parser.add_argument("--probe-memory", nargs=4, metavar=("CASE", "IMPL", "MODE", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.probe_memory:
        print(probe_memory(*args.probe_memory, args.size, args.device, args))
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: no GPU is available here")
    gpu = args.device.startswith("cuda")
    if args.hf_compiled is None:
        args.hf_compiled = gpu
    groups = {"realistic": [c for c in CASES if CASES[c].realistic], "small": [c for c in CASES if not CASES[c].realistic]}
    chosen = args.cases or ["realistic" if gpu else "small"]
    args.cases = [c for name in chosen for c in groups.get(name, [name])]
    peaks = {dtype: matmul_peak(args.device, dtype) for dtype in args.dtypes}
    rows = []
    for case in args.cases:
        for mode in args.modes:
            for dtype in args.dtypes:
                row = run_case(case, mode, dtype, args, peaks)
                print(json.dumps(row), flush=True)
                rows.append(row)
    table = markdown(rows, args)
    if args.markdown_out:
        Path(args.markdown_out).write_text(table)
    if args.write_docs:  # one block per machine and setting; the rest of the page is kept
        from docs_blocks import replace_block

        name = f"step-{args.device.split(':')[0]}-{args.size}-compile-{args.compile}" + \
            ("-checkpointing" if args.gradient_checkpointing else "")
        replace_block(name, table, heading=f"## Fine-tuning step and inference: {args.device}, {args.size}")


if __name__ == "__main__":
    main()
