#!/usr/bin/env python3
"""PyTorch figures for the shapes of bench/cuda/, measured on the same GPU in the same call, so the
CUDA benchmarks' tables can show them beside infuse's rows:

  copy          device-to-device copy of 1 GiB (bytes read + written per second): the bandwidth
                anchor the CUDA benchmarks also measure;
  sdpa.decode   torch.nn.functional.scaled_dot_product_attention, one query token per sequence,
                32 query heads over 8 KV heads (enable_gqa), head dim 128, 4096 cached tokens, half,
                contiguous K/V (PyTorch has no paged cache); GB/s counts K and V once;
  sdpa.prefill  the same function, causal, one sequence of 4096 tokens; TFLOP/s counts the visible
                (query, key) pairs, 4 FLOPs per pair and channel, as bench/cuda/attention.cu does;
  gemv.half     torch.matmul of a half matrix with half activations (cuBLAS), the GEMV anchor of
                bench/cuda/gemv.cu; GB/s counts the weights;
  sample.sort   the sort-based top-k + top-p sampler the PyTorch ecosystem uses (sort, cumsum of the
                softmax, mask, multinomial), vocab 128k;
  greedy.argmax torch.argmax over the vocabulary.

Each figure is the median of timed runs with CUDA events; memory-bound rows write a 512 MiB buffer
before each run so that the L2 cache holds none of the inputs.

  python3 bench/torch/baselines.py [--out FILE.md]
"""
import argparse
import statistics
import sys

import torch
import torch.nn.functional as F


def timed_ms(run, flush=None, repeats=30, warmup=5):
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        if flush is not None:
            flush()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("baselines.py: no CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    torch.manual_seed(0)
    scratch = torch.empty(512 << 20, dtype=torch.uint8, device=device)

    def flush():
        scratch.fill_(1)

    rows = []

    def add(name, ms, figure):
        rows.append((name, ms, figure))
        print(f"{name:45s} {ms * 1e3:10.1f} us  {figure}", flush=True)

    source = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    ms = timed_ms(lambda: target.copy_(source), repeats=10)
    copy_gbps = 2 * source.numel() / ms / 1e6
    add("copy 1 GiB", ms, f"{copy_gbps:.0f} GB/s (read + write)")
    del source, target

    q_heads, kv_heads, dim, tokens = 32, 8, 128, 4096
    for batch in (1, 16, 64, 128):
        q = torch.randn(batch, q_heads, 1, dim, dtype=torch.half, device=device)
        k = torch.randn(batch, kv_heads, tokens, dim, dtype=torch.half, device=device)
        v = torch.randn_like(k)
        run = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        ms = timed_ms(run, flush)
        gbps = 2 * k.numel() * 2 / ms / 1e6
        add(f"sdpa.decode f16 batch:{batch} 4k", ms,
            f"{gbps:.0f} GB/s ({gbps / copy_gbps:.0%} of copy)")
        del q, k, v

    q = torch.randn(1, q_heads, tokens, dim, dtype=torch.half, device=device)
    k = torch.randn(1, kv_heads, tokens, dim, dtype=torch.half, device=device)
    v = torch.randn_like(k)
    ms = timed_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    pairs = tokens * (tokens + 1) / 2
    add("sdpa.prefill causal f16 4k", ms, f"{4 * pairs * q_heads * dim / ms / 1e9:.0f} TFLOP/s")
    a = torch.randn(4096, 4096, dtype=torch.half, device=device)
    ms = timed_ms(lambda: a @ a)
    add("cublas half gemm 4096^3", ms, f"{2 * 4096**3 / ms / 1e9:.0f} TFLOP/s")
    del q, k, v, a

    for n, k_dim in ((4096, 4096), (14336, 4096), (4096, 14336)):
        w = torch.randn(n, k_dim, dtype=torch.half, device=device)
        for batch in (1, 4, 16):
            x = torch.randn(k_dim, batch, dtype=torch.half, device=device)
            ms = timed_ms(lambda: w @ x, flush)
            gbps = w.numel() * 2 / ms / 1e6
            add(f"gemv.half n:{n} k:{k_dim} batch:{batch}", ms,
                f"{gbps:.0f} GB/s ({gbps / copy_gbps:.0%} of copy)")
        del w

    vocab = 128256
    for batch in (1, 16, 128):
        logits = torch.randn(batch, vocab, device=device) * 3

        def sample_sorted():
            top_k, top_p = 50, 0.9
            values, indices = torch.sort(logits, dim=-1, descending=True)
            values[:, top_k:] = float("-inf")
            probs = torch.softmax(values, dim=-1)
            mass = torch.cumsum(probs, dim=-1)
            probs[(mass - probs) > top_p] = 0
            choice = torch.multinomial(probs, 1)
            return torch.gather(indices, 1, choice)

        add(f"sample.sort top_k+top_p vocab:128k batch:{batch}", timed_ms(sample_sorted), "")
    for batch in (1, 128, 256):
        logits = torch.randn(batch, vocab, device=device)
        add(f"greedy.argmax vocab:128k batch:{batch}",
            timed_ms(lambda: torch.argmax(logits, dim=-1)), "")

    table = [f"PyTorch {torch.__version__} on {torch.cuda.get_device_name()}", "",
             "| baseline | time | figure |", "|---|---:|---|"]
    table += [f"| {name} | {ms * 1e3:.1f} us | {figure} |" for name, ms, figure in rows]
    if args.out:
        with open(args.out, "w") as out:
            out.write("\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
