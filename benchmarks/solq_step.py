#!/usr/bin/env python3
"""What IUQ costs SOLQ per training step (``benchmarks/train_step.py`` is built around the pixel
memory; SOLQ's holds whole images): SOLQ R50 as its recipe builds it (6 + 6 layers, 300 queries,
hidden 384), random initialisation, 2 COCO images per step, against its baseline twin (IUQ off: the
same 2 images, no views), on one trainer and the same batches, interleaved twin / IUQ / twin / ...
(each IUQ step compared with the mean of the twin steps around it, which cancels drift).

    python benchmarks/solq_step.py --min-size 320 --max-size 480 --memory 0 8 --batches 2

IUQ's step trains on the 2 images and their 2 views (the twin on 2): ``time x`` is per
iteration at the same SOLVER.IMS_PER_BATCH, as a user running R50.yaml against R50_baseline.yaml
sees it. ``in IUQ`` is the time inside the trainer's IUQ loss calls (forward only). The memory
holds M whole encoder memories (copies of the batch's, under other image ids: a replay costs the
same on any content); ``MB / image held`` is what one stored image takes at this size, and the
recipe's size (800 x 1333) is given from the level shapes. Peak RSS per mode is taken in a process
of its own (``--peak``), so one mode's heap does not hide another's.
"""
import argparse
import copy
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(args):
    os.environ.setdefault("DETECTRON2_DATASETS", os.path.join(REPO, "..", "shared", "datasets"))
    import torch
    from detectron2.utils.env import seed_all_rng

    from iuq.config import get_iuq_cfg
    from iuq.engine.models import register_base_models
    from iuq.engine.trainer import IUQTrainer

    torch.set_num_threads(args.threads)
    register_base_models()
    cfg = get_iuq_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs/IUQ/SOLQ/R50.yaml"))
    cfg.merge_from_list([
        "MODEL.WEIGHTS", "", "MODEL.DEVICE", args.device, "SEED", "1", "INPUT.MIN_SIZE_TRAIN", f"({args.min_size},)",
        "INPUT.MAX_SIZE_TRAIN", str(args.max_size), "INPUT.CROP.ENABLED", "False", "SOLVER.IMS_PER_BATCH", "2",
        "DATALOADER.NUM_WORKERS", "0", "DATASETS.TRAIN", f"('{args.dataset}',)", "DATASETS.TEST", "()",
        "OUTPUT_DIR", "/tmp/iuq_bench_solq",
    ])
    seed_all_rng(1)
    return IUQTrainer(cfg)


def run(args):
    import torch
    from detectron2.utils.events import EventStorage

    from iuq.inter.images import ImageMemory

    trainer = build(args)
    in_iuq = [0.0]

    def timed(method):
        def call(*a):
            t0 = time.perf_counter()
            out = method(*a)
            in_iuq[0] += time.perf_counter() - t0
            return out
        return call

    trainer.replay_inter_loss, trainer.equi_loss = timed(trainer.replay_inter_loss), timed(trainer.equi_loss)
    loader = trainer._trainer._data_loader_iter
    batches = [next(loader) for _ in range(1 + args.batches)]
    memories = {}

    def step(mode, size, batch, seed):
        trainer.iuq_on = mode == "iuq"
        if mode == "iuq":
            trainer.memory = copy.deepcopy(memories[size])  # full, and not grown by this step
        trainer.view_rng = random.Random(seed)
        torch.manual_seed(seed)
        trainer._trainer._data_loader_iter_obj = iter([copy.deepcopy(batch)])
        in_iuq[0] = 0.0
        t0 = time.perf_counter()
        trainer.run_step()
        return time.perf_counter() - t0, in_iuq[0]

    results = {}
    with EventStorage(0):
        trainer.memory = ImageMemory(max(args.memory) or 1)
        memories[0] = ImageMemory(0)
        if args.peak == "twin,0":  # the twin's process never runs an IUQ step
            step("twin", 0, batches[0], 0)
            step("twin", 0, batches[1], 1)
            return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        step("iuq", 0, batches[0], 0)  # warm-up; and scenes to fill the memories with
        scenes = []
        captured = trainer.adapter

        def grab(cap, image_ids, n):
            out = type(captured).batch_scenes(captured, cap, image_ids, n)
            scenes.extend(s for _, s in out.detach())
            return out

        captured.batch_scenes = grab
        step("iuq", 0, batches[0], 0)
        del captured.batch_scenes
        per_image = [sum(f.numel() * 4 for f in s.levels) for s in scenes]
        for size in args.memory:
            mem = ImageMemory(size)
            mem.enqueue([(10**9 + k, scenes[k % len(scenes)]) for k in range(size)], gather=False)
            memories[size] = mem
        if args.peak:
            mode, size = args.peak.split(",")
            step(mode, int(size), batches[1], 1)
            return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        for b, batch in enumerate(batches[1:], start=1):
            step("twin", 0, batch, b)  # untimed: new image sizes
            before, _ = step("twin", 0, batch, b)
            for size in args.memory:
                seconds, own = step("iuq", size, batch, b)
                after, _ = step("twin", 0, batch, b)
                results.setdefault(size, []).append((seconds, own, (before + after) / 2))
                print(f"batch {b} memory {size}: {seconds:.1f} s (IUQ calls {own:.1f} s), twin {before:.1f} / "
                      f"{after:.1f} s", file=sys.stderr, flush=True)
                before = after
    return {"per_image_bytes": statistics.mean(per_image), "steps": results}


def recipe_bytes_per_image(hidden=384, size=(800, 1333), strides=(8, 16, 32, 64)):
    """Bytes of one stored image (float32) at the recipe's scale: hidden x the valid cells of every level."""
    return hidden * 4 * sum(-(-size[0] // s) * -(-size[1] // s) for s in strides)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--min-size", type=int, default=320)
    p.add_argument("--max-size", type=int, default=480)
    p.add_argument("--memory", type=int, nargs="+", default=[0, 8])
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--dataset", default="coco_2017_val")
    p.add_argument("--peak", help=argparse.SUPPRESS)  # child: "mode,size"
    p.add_argument("--no-peaks", action="store_true")
    args = p.parse_args()
    if args.peak:
        print(json.dumps(run(args)))
        return
    out = run(args)
    rows = []
    for size, steps in out["steps"].items():
        total, own, twin = (sum(s[i] for s in steps) for i in range(3))
        rows.append((size, total / len(steps), twin / len(steps), total / twin, own / len(steps)))
    peaks = {}
    if not args.no_peaks:
        base = [sys.executable, __file__, "--min-size", str(args.min_size), "--max-size", str(args.max_size),
                "--memory", *map(str, args.memory), "--batches", "1", "--device", args.device,
                "--threads", str(args.threads), "--dataset", args.dataset]
        for mode, size in [("twin", 0)] + [("iuq", s) for s in args.memory]:
            res = subprocess.run(base + ["--peak", f"{mode},{size}"], capture_output=True, text=True, check=True)
            peaks[(mode, size)] = json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    print(f"SOLQ R50 (6+6 layers, 300 queries), 2 images/step at short side {args.min_size} (long <= {args.max_size}), "
          f"{args.device}, {args.threads} thread(s)")
    print("memory M | IUQ s/it | twin s/it | time x | in IUQ calls s | peak RSS MB (twin)")
    for size, t, tw, x, own in rows:
        peak = f"{peaks.get(('iuq', size), float('nan')):.0f} ({peaks.get(('twin', 0), float('nan')):.0f})"
        print(f"{size:8d} | {t:8.1f} | {tw:9.1f} | {x:6.2f} | {own:14.1f} | {peak}")
    print(f"MB per image held: {out['per_image_bytes'] / 2**20:.2f} here; "
          f"{recipe_bytes_per_image() / 2**20:.1f} at 800 x 1333 (float32; MEMORY.DTYPE bfloat16 halves it)")


if __name__ == "__main__":
    main()
