#!/usr/bin/env python3
"""Issue 30 on the slim quickstart SOLOv2 (``configs/quickstart_solov2.yaml``, random
initialisation) at the paper's setting: IUQ's weight full from step 0 (``WARMUP_ITERS 0``), lr
0.01, a 50-iteration lr warm-up, ``loss_equi`` off — the arm of ``tests/test_dead_masks.py`` whose
masks die. Trains 30 steps per (seed, ``INTER.GRAD_BOUND``) with that test's helper (one thread,
seeded as train_net seeds) and appends the largest own-instance probability per step to
``slim_bound.jsonl``; a (seed, bound) already there is skipped, so a rerun resumes.

    OMP_NUM_THREADS=1 python studies/solov2_r50_instability/slim_bound.py --seeds 0 1 2 3 4 --bounds 0 0.3 1 3
    OMP_NUM_THREADS=1 python studies/solov2_r50_instability/slim_bound.py --bounds 0.3 --on momentum
    python studies/solov2_r50_instability/report.py      # the table
"""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("DETECTRON2_DATASETS", str(REPO.parent / "shared" / "datasets"))
PAPER = ["MODEL.IUQ.WARMUP_ITERS", "0", "SOLVER.BASE_LR", "0.01", "SOLVER.WARMUP_ITERS", "50",
         "SOLVER.WARMUP_FACTOR", "0.001"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--bounds", type=float, nargs="+", default=[0.0, 0.3, 1.0, 3.0])
    p.add_argument("--on", choices=["step", "momentum"], default="step", help="MODEL.IUQ.INTER.GRAD_BOUND_ON")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", default=str(HERE / "slim_bound.jsonl"))
    args = p.parse_args()
    from report import rows

    from test_dead_masks import _own_mask_p_per_step

    done = {(r["seed"], r["grad_bound"], r.get("grad_bound_on", "step")) for r in rows(args.out)}
    for seed in args.seeds:
        for bound in args.bounds:
            if (seed, bound, args.on) in done:
                continue
            p_max = _own_mask_p_per_step(Path(tempfile.mkdtemp()), args.steps, *PAPER, "SEED", str(seed),
                                         "MODEL.IUQ.INTER.GRAD_BOUND", repr(float(bound)),
                                         "MODEL.IUQ.INTER.GRAD_BOUND_ON", args.on)
            row = {"seed": seed, "grad_bound": bound, "grad_bound_on": args.on, "setting": "paper (WARMUP_ITERS 0, lr 0.01, lr warm-up 50)",
                   "own_p_max": [round(x, 5) for x in p_max]}
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
