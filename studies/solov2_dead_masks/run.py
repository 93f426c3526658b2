"""SOLOv2's dead masks (issue 18, item 6): short runs of the slim quickstart SOLOv2
(configs/quickstart_solov2.yaml, random initialisation) under variants, each appending one row to
results.jsonl as it finishes (a variant already there is skipped, so the script resumes).

    python studies/solov2_dead_masks/run.py [--iters N] [--seed S] [--only NAME ...]

A run's masks are "dead" at a logged step (every 20 iterations, medians over 20 steps) when the
dice term is at its maximum: loss_ins == DICE_WEIGHT (dice loss 1 on every instance).
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# name -> overrides; every run: SEED (--seed), the quickstart's schedule otherwise, from the
# paper's setting pinned here (no IUQ ramp, lr 0.01 at batch 4: what the quickstart config held when
# the study began; it now ships the remedy, so a variant must not inherit its defaults).
PAPER = ["MODEL.IUQ.WARMUP_ITERS", "0", "SOLVER.BASE_LR", "0.01"]
LR_SCALED = ["SOLVER.BASE_LR", "0.0025"]  # 0.01 at 16 images (AdelaiDet's recipe) scaled to 4
VARIANTS = {
    "baseline": ["MODEL.IUQ.ENABLED", "False"],
    "baseline_dice6": ["MODEL.IUQ.ENABLED", "False", "MODEL.SOLOV2.LOSS.DICE_WEIGHT", "6.0"],
    "both": [],
    "inter": ["MODEL.IUQ.EQUI.ENABLED", "False"],
    "equi": ["MODEL.IUQ.INTER.ENABLED", "False"],
    "baseline_lr": ["MODEL.IUQ.ENABLED", "False", *LR_SCALED],
    "both_lr": [*LR_SCALED],
    "inter_lr": ["MODEL.IUQ.EQUI.ENABLED", "False", *LR_SCALED],
    "equi_lr": ["MODEL.IUQ.INTER.ENABLED", "False", *LR_SCALED],
    # IUQ's weights ramped linearly from 0 over 500 iterations (MODEL.IUQ.WARMUP_ITERS)
    "inter_warm500": ["MODEL.IUQ.EQUI.ENABLED", "False", "MODEL.IUQ.WARMUP_ITERS", "500"],
    "inter_lr_warm500": ["MODEL.IUQ.EQUI.ENABLED", "False", "MODEL.IUQ.WARMUP_ITERS", "500", *LR_SCALED],
    "both_lr_warm500": ["MODEL.IUQ.WARMUP_ITERS", "500", *LR_SCALED],
}


def read_metrics(path):
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if "loss_ins" in r]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=os.path.join(HERE, "runs"))
    args = parser.parse_args()
    results = os.path.join(HERE, "results.jsonl")
    done = set()
    if os.path.exists(results):
        with open(results) as f:
            done = {(r["variant"], r["iters"], r.get("seed", 0)) for r in map(json.loads, f)}
    for name, overrides in VARIANTS.items():
        if (args.only and name not in args.only) or (name, args.iters, args.seed) in done:
            continue
        out = os.path.join(args.output_dir, f"{name}_{args.iters}" + (f"_seed{args.seed}" if args.seed else ""))
        cmd = [sys.executable, os.path.join(ROOT, "train_net.py"), "--config-file",
               os.path.join(ROOT, "configs/quickstart_solov2.yaml"), "SEED", str(args.seed),
               "SOLVER.MAX_ITER", str(args.iters), "OUTPUT_DIR", out, *PAPER, *overrides]
        start = time.time()
        log = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if log.returncode:
            print(log.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{name}: train_net failed")
        dice_weight = float(overrides[overrides.index("MODEL.SOLOV2.LOSS.DICE_WEIGHT") + 1]) \
            if "MODEL.SOLOV2.LOSS.DICE_WEIGHT" in overrides else 3.0
        metrics = read_metrics(os.path.join(out, "metrics.json"))
        curve = [{k: r.get(k) for k in ("iteration", "loss_ins", "loss_cate", "loss_inter", "loss_equi",
                                         "iuq/own_mask_p")} for r in metrics]
        dead = [r["iteration"] for r in metrics if r["loss_ins"] >= dice_weight * 0.999]
        ap = None
        for line in log.stdout.splitlines() + log.stderr.splitlines():
            if "copypaste: " in line and line.split("copypaste: ")[1][:1].isdigit():
                ap = line.split("copypaste: ")[1]  # last one is segm
        row = {"variant": name, "iters": args.iters, "seed": args.seed, "overrides": overrides, "seconds": round(time.time() - start),
               "dead_at_logged_iters": dead, "dead_at_end": bool(metrics) and metrics[-1]["iteration"] in dead,
               "warned": "the masks are dead" in log.stderr + log.stdout, "segm_copypaste": ap, "curve": curve}
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name}: dead at end {row['dead_at_end']}, dead at {dead}, {row['seconds']} s", flush=True)


if __name__ == "__main__":
    main()
