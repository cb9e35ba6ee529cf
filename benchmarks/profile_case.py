"""Where a benchmark case spends its time, d2v next to ``transformers``: the top operators of one
step from ``torch.profiler`` (self time, calls), for finding what a speed ratio below 1 is made of.

    python benchmarks/profile_case.py vision_cls_8x224 --mode infer --size base
    python benchmarks/profile_case.py audio_ctc_2x5s --mode train --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import CASES, build  # noqa: E402
from run import DTYPES, make_step, sync  # noqa: E402


def top_operators(step, device: str, rows: int) -> tuple[float, list[tuple[str, float, int]]]:
    """Total and per-operator self time (ms) of one ``step`` after two warm-up steps."""
    for _ in range(2):
        step()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    key = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) / 1e3
    return total, [(e.key, getattr(e, key) / 1e3, e.count) for e in events[:rows]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("case", choices=list(CASES))
    parser.add_argument("--mode", choices=("train", "infer"), default="infer")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--size", choices=("tiny", "base"), default="base")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args(argv)
    hf, ours, inputs, labels, _ = build(args.case, args.size, args.device)
    for name, model in (("transformers", hf), ("d2v", ours)):
        total, ops = top_operators(make_step(model, inputs, labels, args.mode, args.dtype, args.device),
                                   args.device, args.rows)
        print(f"\n{name}: {total:.1f} ms of operator self time")
        for op, ms, calls in ops:
            print(f"  {ms:9.2f} ms  {calls:5d}x  {op}")


if __name__ == "__main__":
    main()
