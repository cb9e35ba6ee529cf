"""Speed and memory of d2v's data2vec-audio vs Hugging Face's, side by side.

Both models hold the same weights (imported through ``d2v.from_pretrained``); the script
times forward (eval, no grad) and forward+backward (train mode with dropout and SpecAugment
off) on the same padded batch, interleaving the two implementations so machine noise hits
both equally, and reports d2v / HF ratios (< 1 means d2v is faster or smaller).

    python benchmarks/audio_forward.py                 # base-sized, 4 x 10 s on CPU
    python benchmarks/audio_forward.py --size tiny --batch 8 --seconds 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import tracemalloc

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


def build(size: str):
    import transformers

    import d2v

    config = transformers.Data2VecAudioConfig(**SIZES[size], hidden_dropout=0.0, attention_dropout=0.0,
                                              activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0,
                                              final_dropout=0.0, mask_time_prob=0.0, vocab_size=32)
    config.architectures = ["Data2VecAudioForCTC"]
    torch.manual_seed(0)
    hf = transformers.Data2VecAudioForCTC(config)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = d2v.from_pretrained(tmp)
    return hf, ours


def batch(batch_size: int, seconds: float):
    samples = int(16000 * seconds)
    audio = torch.randn(batch_size, samples)
    mask = torch.ones(batch_size, samples, dtype=torch.long)
    for i in range(batch_size):  # a realistic padded batch: lengths from 60% to 100%
        mask[i, int(samples * (0.6 + 0.4 * i / max(1, batch_size - 1))):] = 0
    audio = audio * mask
    return audio, mask


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_python_mb(fn) -> float:
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def peak_rss_delta_mb(fn) -> float:
    """Peak of torch's CPU allocator is not exposed; use the profiler's memory accounting."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.key_averages()
    return max(0.0, sum(e.self_cpu_memory_usage for e in events if e.self_cpu_memory_usage > 0)) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=SIZES, default="base")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    hf, ours = build(args.size)
    audio, mask = batch(args.batch, args.seconds)

    def hf_forward():
        with torch.no_grad():
            hf.eval()(audio, attention_mask=mask)

    def d2v_forward():
        with torch.no_grad():
            ours.eval()(input_values=audio, attention_mask=mask)

    def hf_train():
        hf.train()
        hf(audio, attention_mask=mask).logits.sum().backward()

    def d2v_train():
        ours.train()
        ours(input_values=audio, attention_mask=mask).logits.sum().backward()

    for fn in (hf_forward, d2v_forward, hf_train, d2v_train):  # warm-up
        fn()
    rows = []
    for name, ref, mine in (("forward", hf_forward, d2v_forward), ("forward+backward", hf_train, d2v_train)):
        ref_times, my_times = [], []
        for _ in range(args.repeats):
            ref_times.append(timed(ref, 1))
            my_times.append(timed(mine, 1))
        ref_t, my_t = statistics.median(ref_times), statistics.median(my_times)
        ref_m, my_m = peak_rss_delta_mb(ref), peak_rss_delta_mb(mine)
        rows.append((name, ref_t, my_t, ref_m, my_m))

    print(f"data2vec-audio {args.size}, batch {args.batch} x {args.seconds:g} s, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"{'':18} {'HF s':>8} {'d2v s':>8} {'time ratio':>10} {'HF MB':>9} {'d2v MB':>9} {'mem ratio':>9}")
    for name, ref_t, my_t, ref_m, my_m in rows:
        print(f"{name:18} {ref_t:8.3f} {my_t:8.3f} {my_t / ref_t:10.2f} {ref_m:9.1f} {my_m:9.1f} "
              f"{my_m / max(ref_m, 1e-9):9.2f}")


if __name__ == "__main__":
    main()
