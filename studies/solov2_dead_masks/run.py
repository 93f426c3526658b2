"""SOLOv2's dead masks (issue 18, item 6): short runs of the slim quickstart SOLOv2
(configs/quickstart_solov2.yaml, random initialisation) under variants, each appending one row to
results.jsonl as it finishes (a variant already there is skipped, so the script resumes).

    python studies/solov2_dead_masks/run.py [--iters N] [--seed S] [--only NAME ...]

Variants named ``trunk_*`` stand in for the R50 recipes, which start from an ImageNet-trained
ResNet with new heads: their ResNet trunk (``backbone.bottom_up``, what an ImageNet checkpoint
holds) comes from the ``baseline`` run of the same seed and length (IUQ off, run first if it is
missing), their FPN and heads are random, and they train at the recipe's batch-scaled lr and its
learning-rate warm-up (1000 iterations from 1%). No ImageNet weights can be had here.

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
RESULTS = os.path.join(HERE, "results.jsonl")

# name -> overrides; every run: SEED (--seed), from the paper's setting pinned here (no IUQ ramp,
# lr 0.01 at batch 4, warmed up over 50 iterations from 0.1%, stepped at 400: what the quickstart
# config held when the study began; it now ships the remedy, so a variant must not inherit its
# defaults).
PAPER = ["MODEL.IUQ.WARMUP_ITERS", "0", "SOLVER.BASE_LR", "0.01", "SOLVER.WARMUP_ITERS", "50",
         "SOLVER.WARMUP_FACTOR", "0.001", "SOLVER.STEPS", "(400,)"]
LR_SCALED = ["SOLVER.BASE_LR", "0.0025"]  # 0.01 at 16 images (AdelaiDet's recipe) scaled to 4
RECIPE_LR = [*LR_SCALED, "SOLVER.WARMUP_ITERS", "1000", "SOLVER.WARMUP_FACTOR", "0.01"]  # Base-SOLOv2.yaml's
NO_DECAY = ["SOLVER.STEPS", "(100000,)"]  # the quickstart's lr step at 400 moved past any run here
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
    # (rows "inter_protect" in results.jsonl ran at commit 7eb4739 with MODEL.IUQ.INTER.PROTECT_OWN_MASKS,
    # an option since removed: L_inter's gradient at a query could not lower its own-instance logit)
    # the R50 recipes' situation (see the docstring): a trained trunk, new heads, the recipe's lr
    "trunk_baseline": ["MODEL.IUQ.ENABLED", "False", *RECIPE_LR],
    "trunk_both": [*RECIPE_LR],  # Base-SOLOv2.yaml as it is: no IUQ ramp
    "trunk_both_warm1000": ["MODEL.IUQ.WARMUP_ITERS", "1000", *RECIPE_LR],  # ramp as long as the lr's
    # the same past the ramp's end: the recipe's lr stays flat after its warm-up until 60K, so no step
    "trunk_both_warm1000_flat": ["MODEL.IUQ.WARMUP_ITERS", "1000", *RECIPE_LR, *NO_DECAY],
    # Base-SOLOv2.yaml's schedule as shipped (IUQ and lr ramped over 1000 iterations) from random init
    "recipe_both_flat": ["MODEL.IUQ.WARMUP_ITERS", "1000", *RECIPE_LR, *NO_DECAY],
    "recipe_baseline_flat": ["MODEL.IUQ.ENABLED", "False", *RECIPE_LR, *NO_DECAY],  # its IUQ-off twin
    # the quickstart with the recipe's shape of schedule: the lr warmed up from 1% over the same 500
    # iterations as IUQ's ramp, then flat (no step at 400); configs/quickstart_solov2.yaml since
    "quick_both_lrwarm500": ["MODEL.IUQ.WARMUP_ITERS", "500", *LR_SCALED, "SOLVER.WARMUP_ITERS", "500",
                             "SOLVER.WARMUP_FACTOR", "0.01", *NO_DECAY],
    # IUQ switched on after the base model has trained alone: every weight from this seed's
    # 300-iteration baseline, then IUQ ramped over 500 iterations at the batch-scaled lr
    "after_baseline_both_lr_warm500": ["MODEL.IUQ.WARMUP_ITERS", "500", *LR_SCALED],
}


def baseline_weights(args, trunk_only):
    """A checkpoint from this seed's ``baseline`` run (trained first if missing): its every weight,
    or (``trunk_only``) its ResNet trunk alone, saved as a checkpoint holding nothing else (what
    MODEL.WEIGHTS gives a recipe from ImageNet)."""
    iters = args.baseline_iters or args.iters
    base = os.path.join(args.output_dir, f"baseline_{iters}" + (f"_seed{args.seed}" if args.seed else ""))
    final = os.path.join(base, "model_final.pth")
    if not os.path.exists(final):
        run(argparse.Namespace(**{**vars(args), "iters": iters}), "baseline")
    if not trunk_only:
        return final
    path = base + "_trunk.pth"
    if not os.path.exists(path):
        import torch

        model = torch.load(final, map_location="cpu")["model"]
        torch.save({"model": {k: v for k, v in model.items() if k.startswith("backbone.bottom_up.")}}, path)
    return path


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
    parser.add_argument("--baseline-iters", type=int, help="length of the baseline run that trunk_* and "
                        "after_baseline_* variants take their weights from (default: --iters)")
    args = parser.parse_args()
    done = set()
    if os.path.exists(RESULTS):
        with open(RESULTS) as f:
            done = {(r["variant"], r["iters"], r.get("seed", 0)) for r in map(json.loads, f)}
    for name in VARIANTS:
        if (args.only and name not in args.only) or (name, args.iters, args.seed) in done:
            continue
        run(args, name)
        done.add((name, args.iters, args.seed))


def run(args, name):
    overrides = VARIANTS[name]
    if name.startswith("trunk_"):
        overrides = overrides + ["MODEL.WEIGHTS", baseline_weights(args, trunk_only=True)]
    elif name.startswith("after_baseline_"):
        overrides = overrides + ["MODEL.WEIGHTS", baseline_weights(args, trunk_only=False)]
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
    row = {"variant": name, "iters": args.iters, "seed": args.seed, "overrides": overrides,
           "seconds": round(time.time() - start), "dead_at_logged_iters": dead,
           "dead_at_end": bool(metrics) and metrics[-1]["iteration"] in dead,
           "warned": "the masks are dead" in log.stderr + log.stdout, "segm_copypaste": ap, "curve": curve}
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{name}: dead at end {row['dead_at_end']}, dead at {dead}, {row['seconds']} s", flush=True)


if __name__ == "__main__":
    main()
