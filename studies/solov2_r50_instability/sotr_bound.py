#!/usr/bin/env python3
"""Issue 30 on SOTR (its own environment: README, SOTR): the real SOTR R50 from random
initialisation on the COCO sample, the tests' small setting (``tests/adelaidet_support.py``: short
side 256, 2 images a step, trainable BN, lr 1e-4, a memory of 2,000) at the paper's setting (IUQ's
weights full from step 0), per (seed, ``INTER.GRAD_BOUND``): the largest own-instance probability
per step (the dead-mask monitor's reading) and the bound's ratio and scale. One row per run in
``sotr_bound.jsonl``; a (seed, bound) already there is skipped, so a rerun resumes.

    OMP_NUM_THREADS=1 ~/.cache/iuq-ci/venv-sotr/bin/python studies/solov2_r50_instability/sotr_bound.py --seeds 0 --bounds 0 0.3
    OMP_NUM_THREADS=1 ~/.cache/iuq-ci/venv-sotr/bin/python studies/solov2_r50_instability/sotr_bound.py --seeds 0 --bounds 0.3 --on momentum
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
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ.setdefault("DETECTRON2_DATASETS", str(REPO.parent / "shared" / "datasets"))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--bounds", type=float, nargs="+", default=[0.0, 0.3])
    p.add_argument("--on", choices=["step", "momentum"], default="step", help="MODEL.IUQ.INTER.GRAD_BOUND_ON")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default=str(HERE / "sotr_bound.jsonl"))
    args = p.parse_args()
    from report import rows

    from adelaidet_support import CONFIGS, MODEL_SMALL, SMALL, adet_provides, own_mask_p_per_step

    if not adet_provides("sotr"):
        sys.exit("SOTR (package adet) is not installed in this Python: run it in SOTR's environment (README: SOTR)")
    import train_net
    from detectron2.utils.env import seed_all_rng

    from iuq.engine.trainer import IUQTrainer

    done = {(r["seed"], r["grad_bound"], r.get("grad_bound_on", "step")) for r in rows(args.out)}
    for seed in args.seeds:
        for bound in args.bounds:
            if (seed, bound, args.on) in done:
                continue
            opts = SMALL + MODEL_SMALL["SOTR"] + ["OUTPUT_DIR", tempfile.mkdtemp(), "SEED", str(seed),
                                                  "MODEL.IUQ.INTER.GRAD_BOUND", repr(float(bound)),
                                                  "MODEL.IUQ.INTER.GRAD_BOUND_ON", args.on]
            cfg = train_net.setup(train_net.default_argument_parser().parse_args(
                ["--config-file", str(CONFIGS["SOTR"])] + opts))
            seed_all_rng(seed)
            trainer = IUQTrainer(cfg)
            bounds, bounded = [], trainer.bounded_inter_loss

            def spy(loss_dict, cap):
                out = bounded(loss_dict, cap)
                bounds.append(trainer.inter_bound)
                return out

            trainer.bounded_inter_loss = spy
            p_max = own_mask_p_per_step(trainer, args.steps)
            row = {"seed": seed, "grad_bound": bound, "grad_bound_on": args.on, "steps": args.steps,
                   "setting": "tests' small SOTR (256 px, BN, lr 1e-4), WARMUP_ITERS 0",
                   "own_p_max": [round(x, 6) for x in p_max],
                   "inter_grad_ratio": [None if r is None else round(r, 3) for r, _ in bounds],
                   "inter_grad_scale": [None if s is None else round(s, 5) for _, s in bounds]}
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
