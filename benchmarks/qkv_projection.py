"""What storing the q/k/v projections fused would gain: one self-attention input projection,
forward + backward, in three layouts, interleaved, medians.

    python benchmarks/qkv_projection.py                               # Base width, 16 x 125 tokens, CPU fp32
    python benchmarks/qkv_projection.py --device cuda --dtype bf16 --tokens 8 512 2000 16000

* ``three``: three ``(D, D)`` matmuls (``transformers``' layout and arithmetic);
* ``concatenated``: d2v's ``MultiHeadAttention`` -- three stored weights joined per call into one
  ``(3D, D)`` matmul (names, optimizer state and checkpoints stay per projection);
* ``stored fused``: one stored ``(3D, D)`` weight (fairseq 2.0's ``qkv``), what state-dict hooks
  would be needed for to keep Hugging Face names.

Ratios are ``concatenated`` / the other layout's time (above 1: d2v's layout is faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import timed  # noqa: E402  (synchronises the device around the step)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def layouts(dim: int, device: str, dtype: torch.dtype):
    """``name -> (step, parameters)``: a forward + backward of ``x`` through one layout."""
    def tensor(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

    separate = [(tensor(dim, dim), tensor(dim)) for _ in range(3)]
    fused = (tensor(3 * dim, dim), tensor(3 * dim))

    def three(x):
        return sum(F.linear(x, w, b).sum() for w, b in separate)

    def concatenated(x):
        weight = torch.cat([w for w, _ in separate])
        return F.linear(x, weight, torch.cat([b for _, b in separate])).sum()

    def stored(x):
        return F.linear(x, *fused).sum()

    params = [t for pair in separate for t in pair] + list(fused)
    return {"three": three, "concatenated": concatenated, "stored fused": stored}, params


def measure(tokens: int, dim: int, device: str, dtype: str, repeats: int, warmup: int) -> dict:
    cast = DTYPES[dtype]
    steps, params = layouts(dim, device, cast)
    x = torch.randn(1, tokens, dim, device=device, dtype=cast, requires_grad=True)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(warmup + repeats):
        for name, step in (steps.items() if r % 2 == 0 else reversed(steps.items())):
            for t in [x, *params]:
                t.grad = None
            seconds = timed(lambda: step(x).backward(), device)
            if r >= warmup:
                times[name].append(seconds)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    return {"tokens": tokens, "dim": dim, "device": device, "dtype": dtype, "repeats": repeats,
            "ms": {name: round(m * 1e3, 3) for name, m in medians.items()},
            "concatenated_vs_three": round(medians["three"] / medians["concatenated"], 3),
            "concatenated_vs_stored_fused": round(medians["stored fused"] / medians["concatenated"], 3)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--tokens", type=int, nargs="*", default=[2000], help="batch x length, flattened")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    rows = [measure(n, args.dim, args.device, args.dtype, args.repeats, args.warmup) for n in args.tokens]
    for row in rows:
        print(json.dumps(row))
    return rows


if __name__ == "__main__":
    main()
