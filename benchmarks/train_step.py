#!/usr/bin/env python3
"""What IUQ costs in a real training step: CondInst R50 and SOLOv2 R50 (AdelaiDet), random
initialisation, the paper's per-GPU load (2 images per step, short side 800, long side <= 1333,
images from coco_2017_train), at equal images per step.

    DETECTRON2_DATASETS=../shared/datasets python benchmarks/train_step.py
    python benchmarks/train_step.py --models CondInst --memory 100000 --rounds 3 --device cuda

Modes (every one feeds 2 images + 1 transformed copy of each = 4 images per step, so the
equivariant views count as images of the step as augmented copies do for the baseline):
  baseline   IUQ's losses off, the copies are plain augmentation (EQUI.MODE augment)
  inter      + loss_inter against a memory of M samples (filled to capacity before timing)
  equi       + loss_equi (EQUI.MODE full)
  both       + both
Each (model, mode, M) runs in its own subprocess (so its peak is its own), and the
combinations are interleaved round by round so drift cancels. Every run sees the same images in
the same order and draws the same views (all RNGs seeded), so modes differ only in IUQ's work.
Reported: median seconds per image over rounds and steps, its ratio to the baseline's, the peak
memory ratio (process peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on GPU), and, to
explain the ratios, the seconds per image spent inside IUQ's own loss calls (``inter_loss``, which
also forms its gradients, and ``equi_loss``'s forward) and the queries per step.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"CondInst": "configs/IUQ/CondInst/MS_R_50_1x.yaml", "SOLOv2": "configs/IUQ/SOLOv2/R50_1x.yaml"}
MODES = {
    "baseline": ["MODEL.IUQ.INTER.ENABLED", "False", "MODEL.IUQ.EQUI.MODE", "augment"],
    "inter": ["MODEL.IUQ.INTER.ENABLED", "True", "MODEL.IUQ.EQUI.MODE", "augment"],
    "equi": ["MODEL.IUQ.INTER.ENABLED", "False", "MODEL.IUQ.EQUI.MODE", "full"],
    "both": ["MODEL.IUQ.INTER.ENABLED", "True", "MODEL.IUQ.EQUI.MODE", "full"],
}


def child(model, mode, memory, args):
    import torch
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.events import EventStorage

    from iuq.config import get_iuq_cfg
    from iuq.models import register_base_models
    from iuq.samples import PixelSamples
    from iuq.trainer import IUQTrainer

    register_base_models()
    cfg = get_iuq_cfg()
    cfg.merge_from_file(os.path.join(REPO, CONFIGS[model]))
    cfg.merge_from_list(MODES[mode] + [
        "MODEL.WEIGHTS", "", "MODEL.DEVICE", args.device, "SEED", "1",
        "INPUT.MIN_SIZE_TRAIN", f"({args.min_size},)", "INPUT.MAX_SIZE_TRAIN", str(args.max_size),
        "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "SOLVER.BASE_LR", "0.001",
        "MODEL.IUQ.MEMORY.SIZE", str(max(memory, 1)), "OUTPUT_DIR", "/tmp/iuq_bench",
    ])
    seed_all_rng(1)  # the data loader's order and flips: the same images for every mode
    trainer = IUQTrainer(cfg)
    cuda = args.device.startswith("cuda")
    times, iuq_times, queries = [], [], []
    in_iuq = [0.0]

    def timed(method):  # seconds spent inside one of the trainer's IUQ loss calls
        def call(cap, *a):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = method(cap, *a)
            if cuda:
                torch.cuda.synchronize()
            in_iuq[0] += time.perf_counter() - t0
            if method.__name__ == "inter_loss":
                queries.append(len(cap.queries))
            return out
        return call

    trainer.inter_loss, trainer.equi_loss = timed(trainer.inter_loss), timed(trainer.equi_loss)
    with EventStorage(0):
        for it in range(args.warmup + args.steps):
            trainer.iter = it
            if it == args.warmup:  # steady state: a full memory
                mem = trainer.memory
                while mode in ("inter", "both") and mem.dim and len(mem) < mem.capacity:
                    n, dev = min(mem.capacity - len(mem), 100_000), mem.device  # in parts: no big temporary
                    mem.enqueue(PixelSamples(
                        torch.randn(n, mem.dim, device=dev), torch.rand(n, 2, device=dev) * 800,
                        torch.randint(10**9, 2 * 10**9, (n,), device=dev)), gather=False)
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
            in_iuq[0] = 0.0
            start = time.perf_counter()
            trainer.run_step()
            if cuda:
                torch.cuda.synchronize()
            if it >= args.warmup:
                times.append(time.perf_counter() - start)
                iuq_times.append(in_iuq[0])
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds_per_image": [t / 4 for t in times], "iuq_seconds_per_image": [t / 4 for t in iuq_times],
            "queries": queries[args.warmup:], "peak_bytes": peak}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--memory", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--min-size", type=int, default=800)
    p.add_argument("--max-size", type=int, default=1333)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    shared = os.path.join(os.path.dirname(REPO), "shared", "datasets")
    if "DETECTRON2_DATASETS" not in os.environ and os.path.isdir(shared):
        os.environ["DETECTRON2_DATASETS"] = shared  # this project's copy of real COCO images
    if args.child:
        model, mode, memory = args.child.split(",")
        print(json.dumps(child(model, mode, int(memory), args)))
        return

    runs = [(m, mode, size) for m in args.models for mode in args.modes
            for size in (args.memory if mode in ("inter", "both") else [0])]
    results = {r: {"t": [], "iuq": [], "q": [], "peak": []} for r in runs}
    for rnd in range(args.rounds):
        for run in runs:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", ",".join(map(str, run))]
            cmd += ["--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup),
                    "--min-size", str(args.min_size), "--max-size", str(args.max_size)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if out.returncode:
                sys.exit(f"{run} failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[run]["t"] += r["seconds_per_image"]
            results[run]["iuq"] += r["iuq_seconds_per_image"]
            results[run]["q"] += r["queries"]
            results[run]["peak"].append(r["peak_bytes"])
            print(f"round {rnd} {run}: {statistics.median(r['seconds_per_image']):.3f} s/image, "
                  f"peak {r['peak_bytes'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)

    unit = "max_memory_allocated" if args.device.startswith("cuda") else "peak RSS"
    print(f"\nIUQ training-step cost, device={args.device}, {args.min_size}x<={args.max_size}, "
          f"4 images/step, {args.rounds} rounds x {args.steps} steps; peak = {unit}")
    print(f"{'model':9} {'mode':9} {'memory':>8} | {'s/image':>8} {'time x':>7} | {'peak GiB':>8} {'peak x':>7}"
          f" | {'IUQ s/im':>8} {'queries':>7}")
    for model in args.models:
        base = results[(model, "baseline", 0)] if "baseline" in args.modes else None
        for run in [r for r in runs if r[0] == model]:
            t, peak = statistics.median(results[run]["t"]), max(results[run]["peak"])
            tx = t / statistics.median(base["t"]) if base else float("nan")
            px = peak / max(base["peak"]) if base else float("nan")
            size = f"{run[2] // 1000}K" if run[2] else "-"
            iuq = statistics.median(results[run]["iuq"])
            q = f"{statistics.median(results[run]['q']):7.0f}" if results[run]["q"] else f"{'-':>7}"
            print(f"{model:9} {run[1]:9} {size:>8} | {t:8.3f} {tx:7.3f} | {peak / 2**30:8.2f} {px:7.3f}"
                  f" | {iuq:8.3f} {q}")


if __name__ == "__main__":
    main()
