#!/usr/bin/env python3
"""What IUQ costs in a real training step: CondInst R50 and SOLOv2 R50 (AdelaiDet), SparseInst R50
G-IAM, Mask2Former R50, random initialisation, the paper's per-GPU load (2 images per step, short
side 800, long side <= 1333; SparseInst at its recipe's 640 / 853, Mask2Former on its 1024 x 1024
LSJ crops; images from coco_2017_train), at equal images per step.

    python benchmarks/train_step.py                      # both models, 10K / 100K / 1M, CPU
    python benchmarks/train_step.py --models CondInst --memory 100000 --batches 5 --device cuda
    python benchmarks/train_step.py --modes baseline both --memory 100000 --batches 3 --rounds 3

Modes (every one feeds 2 images + 1 transformed copy of each = 4 images per step, so the
equivariant views count as images of the step as augmented copies do for the baseline):
  baseline   IUQ's losses off, the copies are plain augmentation (EQUI.MODE augment)
  inter      + loss_inter against a memory of M samples (full: steady state)
  equi       + loss_equi (EQUI.MODE full)
  both       + both

How drift and noise are kept out of the ratios. One process per model builds one trainer; for each
batch it runs a training step in every mode (and memory size), each on a copy of the same batch
with the same views and the same random draws, after one untimed step on that batch (the first
step on new image sizes is slower, whatever its mode). The timed steps alternate: baseline, a
mode, baseline, the next mode, ..., baseline (the modes' order rotated from batch to batch;
``--rounds`` times per batch), and each mode step is compared with the mean of the baseline steps
just before and after it. So every mode sees the same images, and a slow drift of the machine's
speed cancels. ``time x`` is a mode's total over all its steps / the total of those baseline
means. A shared machine also jumps in speed for a step or two (seen here: the same step 22 s,
then 43 s, then 22 s again, in CPU seconds as much as in wall seconds), which no interpolation
undoes and which can move a total by several percent: ``median x`` is the median over the
mode's steps of their own ratios (n: how many), which such a jump moves by one rank only.

CPU allocator. With glibc's defaults every tensor over 32 MiB is a fresh mmap, and its pages are
faulted in and zeroed by the kernel on first touch: at 800 px that is ~4 million page faults
and a third of a step's time, varying by a million from step to step with the heap's state,
which both slows the step and drowns the differences between modes. A GPU run never pays this
(PyTorch's caching allocator keeps freed blocks), so for the timed steps the child process tells
glibc the same (``MALLOC_MMAP_MAX_=0``, ``MALLOC_TRIM_THRESHOLD_``: freed memory stays in the
heap and is reused); set ``--system-malloc`` to time with the defaults instead.

Peak memory, in a second process (same warm-up, same batches). GPU:
``torch.cuda.max_memory_allocated`` of one step, reset before it. CPU: the process's peak RSS
during one step (VmHWM, reset through /proc/self/clear_refs), with glibc told the opposite of the
timed steps: hand every freed block of 64 KiB or more straight back (mallopt), so that RSS
follows the live tensors rather than what the allocator happens to keep cached; only the memory
bank of the run being measured exists then. Peaks are taken on the timed batch with the most
pixels (where a training run peaks), after one unmeasured step on it; the baseline's is the mean
of a first and a last one.

IUQ's share inside a step (``in-step x``). Interleaving cancels drift but not a shared machine's
jumps, so the same cost is also measured a second way, which the machine's speed changing between
steps does not move: after each batch's timed steps, one more step of every mode times, inside
that step, IUQ's loss calls (forward, which also forms the inter-scene gradients) and IUQ's part
of backward, the gradient of its losses in the captured embedding map and queries (a pass of its
own, before the step's one backward; everything upstream of those tensors is backward work the
base losses do anyway).
``in-step x`` = step / (step - IUQ's seconds), summed over those steps; ``IUQ s/im`` = IUQ's
seconds per image. It leaves out what IUQ adds outside those calls: the capture's bookkeeping,
the views' crops, the memory's enqueue, and one addition of IUQ's gradient into the embedding
map's (the largest: one pass over the map, a fraction of a percent of a step). Also printed:
IUQ's queries per step (mean).
"""
import argparse
import copy
import ctypes
import gc
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"CondInst": "configs/IUQ/CondInst/MS_R_50_1x.yaml", "SOLOv2": "configs/IUQ/SOLOv2/R50_1x.yaml",
           "SparseInst": "configs/IUQ/SparseInst/R50_GIAM.yaml", "Mask2Former": "configs/IUQ/Mask2Former/R50.yaml"}
# Per model: the package it needs, and its recipe's largest training scale (--min-size / --max-size
# default to it: SparseInst trains at short side <= 640, long side <= 853; AdelaiDet at 800 / 1333;
# Mask2Former on its LSJ crops, 1024 x 1024: --min-size sets INPUT.IMAGE_SIZE).
PACKAGES = {"CondInst": "adet", "SOLOv2": "adet", "SparseInst": "sparseinst", "Mask2Former": "mask2former"}
SIZES = {"SparseInst": (640, 853), "Mask2Former": (1024, 1024)}
MODES = {  # (INTER.ENABLED, EQUI.MODE)
    "baseline": (False, "augment"),
    "inter": (True, "augment"),
    "equi": (False, "full"),
    "both": (True, "full"),
    # Per iteration at a recipe's settings (IMS_PER_BATCH 2 per GPU): the IUQ-off twin steps on 2
    # images and no views; "both" on 2 + 2 views (as above); "matched" (EQUI.VIEWS_IN_BATCH) on
    # 1 image + its view, the twin's 2 images in all.
    "twin": (False, "augment"),
    "matched": (True, "full"),
}
IMAGES_PER_STEP = 4
STEP_IMAGES = {"twin": 2, "matched": 2}  # images a step holds, where not IMAGES_PER_STEP


class Peak:
    """Peak memory of a block of code: CUDA allocator peak, or the process's RSS high-water mark."""

    def __init__(self, cuda):
        self.cuda = cuda
        if not cuda:  # RSS follows live tensors: no cached blocks (glibc; elsewhere RSS as it is)
            try:
                libc = ctypes.CDLL("libc.so.6")
                libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD, fixed
                self.trim = lambda: libc.malloc_trim(0)
            except OSError:
                self.trim = lambda: None

    def reset(self):
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        self.trim()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS

    def read(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def child(model, args):
    """One model's steps in one process: the timed steps (``args.child_phase`` "time") or the
    peaks ("peak"), each after the same warm-up, on the same batches."""
    import torch
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.events import EventStorage

    from iuq.config import get_iuq_cfg
    from iuq.engine.models import register_base_models
    from iuq.engine.trainer import IUQTrainer
    from iuq.inter.memory import PixelMemory
    from iuq.inter.samples import PixelSamples

    register_base_models()
    min_size, max_size = sizes(model, args)
    cfg = get_iuq_cfg()
    cfg.merge_from_file(os.path.join(REPO, CONFIGS[model]))
    cfg.merge_from_list([
        "MODEL.WEIGHTS", "", "MODEL.DEVICE", args.device, "SEED", "1",
        "INPUT.MIN_SIZE_TRAIN", f"({min_size},)", "INPUT.MAX_SIZE_TRAIN", str(max_size),
        "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "SOLVER.BASE_LR", "0.001",
        "MODEL.IUQ.MEMORY.SIZE", "1000", "OUTPUT_DIR", "/tmp/iuq_bench",
    ])
    if model == "Mask2Former":  # LSJ crops of IMAGE_SIZE; AMP as its recipe on a GPU (float32 on a CPU)
        cfg.merge_from_list(["INPUT.IMAGE_SIZE", str(min_size), "SOLVER.AMP.ENABLED", str(args.device.startswith("cuda"))])
    seed_all_rng(1)  # the data loader's order and flips
    cuda = args.device.startswith("cuda")
    peak = Peak(cuda) if args.child_phase == "peak" else None  # before the model: its malloc setting
    trainer = IUQTrainer(cfg)
    iuq = trainer.iuq_cfg
    runs = [(mode, size) for mode in args.modes for size in (args.memory if MODES[mode][0] else [0])]
    in_iuq, queries = [0.0], []

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

    def full_memory(size, dim):
        mem = PixelMemory(size, dim=dim, dtype=getattr(torch, iuq.MEMORY.DTYPE), device=cfg.MODEL.DEVICE)
        while len(mem) < size:  # random samples of other images, in parts: no big temporary
            n = min(size - len(mem), 100_000)
            mem.enqueue(PixelSamples(torch.randn(n, dim, device=mem.device), torch.rand(n, 2, device=mem.device) * 800,
                                     torch.randint(10**9, 2 * 10**9, (n,), device=mem.device)), gather=False)
        return mem

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def setup(run, batch, seed):
        """Put the trainer in ``run``'s mode; returns a fresh copy of ``batch``."""
        mode, size = run
        iuq.INTER.ENABLED, iuq.EQUI.MODE = MODES[mode]
        trainer.iuq_on = mode != "twin"  # the twin: IUQ off, so no views either
        trainer.memory = memories[size] if size else no_memory
        trainer.view_rng = random.Random(seed)  # the same views in every mode
        torch.manual_seed(seed)  # the same sampled pixels and proposals
        in_iuq[0] = 0.0
        return copy.deepcopy(batch[:1] if mode == "matched" else batch)  # matched: 1 image + its view

    def step(run, batch, seed):
        """One training step of ``run`` on a copy of ``batch``; returns (wall seconds, process CPU
        seconds, IUQ wall seconds, page faults)."""
        trainer._trainer._data_loader_iter_obj = iter([setup(run, batch, seed)])
        sync()
        start, cpu, faults = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        trainer.run_step()
        sync()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        return time.perf_counter() - start, time.process_time() - cpu, in_iuq[0], faults

    def split_step(run, batch, seed):
        """One ``step`` of ``run`` with IUQ's share of it timed inside the step: its loss calls
        (forward) and its part of backward, d(IUQ's losses) / d(the captured embedding map and
        queries), timed in a pass of its own between ``forward_losses`` and the step's one backward
        (everything upstream of those tensors is backward work the base losses do anyway). Returns
        (seconds of the step without that extra pass, IUQ's seconds: forward + backward)."""
        captured, extra = [], [0.0]  # this step's capture only: kept past it, it would hold its map

        def forward_losses(batch):
            loss_dict, samples = type(trainer).forward_losses(trainer, batch)
            if not captured:  # IUQ off (the twin): nothing of IUQ's to time
                return loss_dict, samples
            cap = captured.pop()
            sync()
            mark = time.perf_counter()
            own = sum(v for k, v in loss_dict.items() if k in ("loss_inter", "loss_equi"))
            torch.autograd.grad(own, [cap.embeddings, cap.queries], retain_graph=True, allow_unused=True)
            sync()
            extra[0] = time.perf_counter() - mark
            return loss_dict, samples

        trainer.read_embeddings = lambda cap, *a: captured.append(cap) or type(trainer).read_embeddings(cap, *a)
        trainer.forward_losses = forward_losses
        try:
            seconds, _, iuq_seconds, _ = step(run, batch, seed)
        finally:
            del trainer.read_embeddings, trainer.forward_losses  # the class's again
        return seconds - extra[0], iuq_seconds + extra[0]

    loader = trainer._trainer._data_loader_iter
    batches = [next(loader) for _ in range(1 + args.batches)]  # a warm-up batch, then the timed ones
    results = {f"{m},{s}": {k: [] for k in ("seconds", "around", "queries", "split")} for m, s in runs}
    no_memory = PixelMemory(0)
    baseline, others = runs[0], runs[1:]

    def timed_step(run, batch, b):
        trainer.iter = b
        queries.clear()
        seconds, cpu, iuq_seconds, faults = step(run, batch, seed=b)
        r = results[f"{run[0]},{run[1]}"]
        r["seconds"].append(seconds)
        r["queries"] += queries
        print(f"batch {b} {run}: {seconds:.2f} s (CPU {cpu:.2f} s, {faults} page faults), IUQ {iuq_seconds:.2f} s",
              file=sys.stderr, flush=True)
        return seconds

    with EventStorage(0):
        memories = {1000: PixelMemory(1000)}
        step(("both", 1000), batches[0], 0)  # warm-up; sets the embedding dim of the memory
        dim = memories[1000].dim
        if peak:
            return peaks(runs, batches, step, peak, full_memory, dim, memories)
        memories = {size: full_memory(size, dim) for size in args.memory}
        for b, batch in enumerate(batches[1:], start=1):
            # Untimed first: whichever run meets new image sizes first pays for growing the
            # process's memory and the kernels' caches for them; the timed runs then do not.
            step(runs[-1], batch, seed=b)
            # Baseline, mode, baseline, mode, ..., baseline: each mode is compared with the mean
            # of the baseline steps just before and after it, which cancels the machine's drift.
            before = timed_step(baseline, batch, b)
            for _ in range(args.rounds):
                for run in others[b % len(others):] + others[: b % len(others)]:
                    timed_step(run, batch, b)
                    after = timed_step(baseline, batch, b)
                    results[f"{run[0]},{run[1]}"]["around"].append((before, after))
                    before = after
            for run in others:  # IUQ's share measured inside one step of each mode
                seconds, own = split_step(run, batch, seed=b)
                results[f"{run[0]},{run[1]}"]["split"].append((seconds, own))
                print(f"batch {b} {run}, split: {seconds:.2f} s, IUQ {own:.2f} s", file=sys.stderr, flush=True)
        r = results[f"{baseline[0]},{baseline[1]}"]
        r["around"] = [(t, t) for t in r["seconds"]]
    return results


def peaks(runs, batches, step, peak, full_memory, dim, memories):
    """Each run's peak on the timed batch with the most pixels (where a training run peaks); only
    the measured run's memory bank exists. Returns {"mode,size": {"peak_bytes": ...}}."""
    pixels = [sum(d["image"].shape[-2] * d["image"].shape[-1] for d in batch) for batch in batches[1:]]
    b = 1 + max(range(len(pixels)), key=pixels.__getitem__)
    memories.clear()
    found = {}
    step(runs[0], batches[b], seed=b)  # unmeasured: the heap meets this batch's sizes
    for run in runs + runs[:1]:  # the baseline first and last: its peak is the mean of both
        if run[1]:
            memories[run[1]] = full_memory(run[1], dim)
        peak.reset()
        step(run, batches[b], seed=b)
        found.setdefault(f"{run[0]},{run[1]}", []).append(peak.read())
        memories.clear()
        print(f"peak {run}: {found[f'{run[0]},{run[1]}'][-1] / 2**30:.3f} GiB", file=sys.stderr, flush=True)
    return {key: {"peak_bytes": sum(v) / len(v)} for key, v in found.items()}


def sizes(model, args):
    """(short side, long side cap) of the benchmark's images: --min-size / --max-size, else the
    model's recipe scale (SIZES), else 800 / 1333."""
    default = SIZES.get(model, (800, 1333))
    return args.min_size or default[0], args.max_size or default[1]


def installed_models():
    import importlib.util

    return [m for m in CONFIGS if importlib.util.find_spec(PACKAGES[m]) is not None] or list(CONFIGS)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=installed_models(), choices=list(CONFIGS),
                   help="default: those whose package is installed here")
    p.add_argument("--memory", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batches", type=int, default=2, help="timed batches (each run in every mode)")
    p.add_argument("--rounds", type=int, default=1, help="timed steps of every mode per batch")
    p.add_argument("--min-size", type=int, default=None, help="default: the model's recipe scale (800, SparseInst 640, Mask2Former's crop 1024)")
    p.add_argument("--max-size", type=int, default=None, help="default: 1333, SparseInst 853")
    p.add_argument("--system-malloc", action="store_true",
                   help="CPU: time with glibc's default allocator settings (see 'CPU allocator')")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-phase", choices=["time", "peak"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.modes[0] != "baseline":
        p.error("--modes must start with baseline: every ratio is to it")
    shared = os.path.join(os.path.dirname(REPO), "shared", "datasets")
    if "DETECTRON2_DATASETS" not in os.environ and os.path.isdir(shared):
        os.environ["DETECTRON2_DATASETS"] = shared  # this project's copy of real COCO images
    if args.child:
        print(json.dumps(child(args.child, args)))
        return

    unit = "max_memory_allocated" if args.device.startswith("cuda") else "peak RSS"
    rows, per_iter = [], []
    for model in args.models:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", model, "--device", args.device,
               "--batches", str(args.batches), "--rounds", str(args.rounds), "--min-size", str(sizes(model, args)[0]),
               "--max-size", str(sizes(model, args)[1]), "--memory", *map(str, args.memory), "--modes", *args.modes, "--child-phase"]
        caching = {} if args.device.startswith("cuda") or args.system_malloc else {  # as on GPU
            "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}
        results = {}
        for phase, env in (("time", {**os.environ, **caching}), ("peak", dict(os.environ))):
            out = subprocess.run(cmd + [phase], stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)  # progress: stderr
            if out.returncode:
                sys.exit(f"{model} ({phase}) failed (exit {out.returncode})")
            for key, r in json.loads(out.stdout.strip().splitlines()[-1]).items():
                results.setdefault(key, {}).update(r)
        base = results["baseline,0"]
        for key, r in results.items():
            mode, size = key.split(",")
            images = STEP_IMAGES.get(mode, IMAGES_PER_STEP)
            t = sum(r["seconds"]) / (len(r["seconds"]) * images)
            around = [(a + b) / 2 for a, b in r["around"]]  # the mean of the baselines around each step
            ratio = sum(r["seconds"]) / sum(around)
            median = f"{statistics.median(sec / ref for sec, ref in zip(r['seconds'], around)):7.3f} {len(around):>3}"
            split = r.get("split") or [(1.0, 0.0)]  # the baseline: no IUQ inside its steps
            in_step = sum(t for t, _ in split) / sum(t - own for t, own in split)
            iuq = sum(own for _, own in split) / (len(split) * images)
            q = f"{sum(r['queries']) / len(r['queries']):7.0f}" if r["queries"] else f"{'-':>7}"
            size = f"{int(size) // 1000}K" if int(size) else "-"
            rows.append(f"{model:9} {mode:9} {size:>8} | {t:8.3f} {ratio:7.3f} {median:>11} | {in_step:9.3f} {iuq:8.3f} | "
                        f"{r['peak_bytes'] / 2**30:8.2f} {r['peak_bytes'] / base['peak_bytes']:7.3f} | {q}")
            r["ratio"] = ratio
        twin = results.get("twin,0")
        for key, r in results.items() if twin else ():
            mode, size = key.split(",")
            size = f"{int(size) // 1000}K" if int(size) else "-"
            per_iter.append(f"{model:9} {mode:9} {size:>8} | {STEP_IMAGES.get(mode, IMAGES_PER_STEP):6} | "
                            f"{r['ratio'] / twin['ratio']:8.3f} | {r['peak_bytes'] / twin['peak_bytes']:7.3f}")
    malloc = "" if args.device.startswith("cuda") else (", system malloc" if args.system_malloc else ", caching malloc")
    scales = ", ".join(f"{m} {sizes(m, args)[0]}x<={sizes(m, args)[1]}" for m in args.models)
    print(f"\nIUQ training-step cost, device={args.device}{malloc}, {scales}, "
          f"{IMAGES_PER_STEP} images/step, {args.batches} batches x {args.rounds} rounds x every mode; peak = {unit}")
    print(f"{'model':9} {'mode':9} {'memory':>8} | {'s/image':>8} {'time x':>7} {'median x   n':>11} | {'in-step x':>9} "
          f"{'IUQ s/im':>8} | {'peak GiB':>8} {'peak x':>7} | {'queries':>7}")
    print("\n".join(rows))
    if per_iter:  # both ratios drift-cancelled through the interleaved baseline steps
        print("\nPer iteration at the recipe's settings (2 images per GPU), against the IUQ-off twin's step")
        print(f"{'model':9} {'mode':9} {'memory':>8} | {'images':>6} | {'iter x':>8} | {'peak x':>7}")
        print("\n".join(per_iter))


if __name__ == "__main__":
    main()
