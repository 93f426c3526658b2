#!/usr/bin/env python3
"""Time and peak memory of the inter-scene loss (forward + backward): IUQ's chunked,
recomputing implementation against the naive one that materialises all Q x M logits.

    python benchmarks/inter_loss.py                      # Q in {100, 500}, M in {10K, 100K, 1M}, D in {8, 256}
    python benchmarks/inter_loss.py --queries 500 --memory 100000 --dims 256 --device cuda

Each measurement runs in a fresh subprocess, so the peak is that of one loss alone:
process RSS growth on CPU, ``torch.cuda.max_memory_allocated`` growth on CUDA, measured after
the queries and the memory bank exist (both variants need those). Time is the median of
``--repeats`` runs after one warm-up. The naive variant is skipped where its estimated need
exceeds ``--naive-budget-gb``; the table then says so. Ratios are chunked / naive.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time


def measure(q, m, d, variant, device, repeats, chunk):
    import torch

    from iuq.inter.losses import inter_scene_loss, naive_inter_scene_loss
    from iuq.inter.samples import PixelSamples

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    queries = (torch.randn(q, d, device=device) * 0.1).requires_grad_(True)
    bank = PixelSamples(
        torch.randn(m, d, device=device), torch.zeros(m, 2, device=device),
        torch.randint(0, 10000, (m,), device=device),
    )
    qids = torch.randint(0, 10000, (q,), device=device)

    def step():
        if variant == "chunked":
            loss = inter_scene_loss(queries, qids, [bank], chunk_size=chunk)
        else:
            loss = naive_inter_scene_loss(queries, qids, [bank])
        loss.backward()
        queries.grad = None
        return loss.item()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    value = step()  # warm-up, and the peak
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"loss": value, "seconds": times[len(times) // 2], "peak_bytes": max(peak, 0)}


def run_child(args, q, m, d, variant):
    cmd = [sys.executable, __file__, "--child", f"{q},{m},{d},{variant}", "--device", args.device,
           "--repeats", str(args.repeats), "--chunk", str(args.chunk)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt_bytes(n):
    return f"{n / 2**20:9.1f} MiB"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, nargs="+", default=[100, 500])
    p.add_argument("--memory", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--dims", type=int, nargs="+", default=[8, 256])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--naive-budget-gb", type=float, default=12.0,
                   help="skip the naive variant where Q*M*4 bytes * 8 (its saved tensors) exceed this")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        q, m, d, variant = args.child.split(",")
        print(json.dumps(measure(int(q), int(m), int(d), variant, args.device, args.repeats, args.chunk)))
        return

    print(f"inter-scene loss, forward + backward, device={args.device}, chunk={args.chunk}")
    header = f"{'Q':>5} {'M':>9} {'D':>4} | {'naive s':>8} {'naive peak':>13} | {'ours s':>8} {'ours peak':>13} | {'time x':>7} {'peak x':>7} | {'|diff|':>8}"
    print(header)
    print("-" * len(header))
    for q in args.queries:
        for m in args.memory:
            for d in args.dims:
                ours = run_child(args, q, m, d, "chunked")
                need = q * m * 4 * 8
                if need > args.naive_budget_gb * 2**30:
                    naive = {"error": f"skipped: needs ~{need / 2**30:.0f} GiB"}
                else:
                    naive = run_child(args, q, m, d, "naive")
                row = f"{q:5d} {m:9d} {d:4d} | "
                if "error" in naive:
                    row += f"{naive['error']:>23} | "
                else:
                    row += f"{naive['seconds']:8.3f} {fmt_bytes(naive['peak_bytes'])} | "
                if "error" in ours:
                    row += ours["error"]
                else:
                    row += f"{ours['seconds']:8.3f} {fmt_bytes(ours['peak_bytes'])} | "
                    if "error" not in naive:
                        row += f"{ours['seconds'] / naive['seconds']:7.2f} "
                        row += f"{ours['peak_bytes'] / max(naive['peak_bytes'], 1):7.3f} | "
                        row += f"{abs(ours['loss'] - naive['loss']):8.1e}"
                    else:
                        row += f"{'-':>7} {'-':>7} | {'-':>8}"
                print(row, flush=True)


if __name__ == "__main__":
    main()
