"""SOLOv2's dead masks (issue 18, item 6), step by step: the slim quickstart SOLOv2
(configs/quickstart_solov2.yaml, SEED 0, random initialisation), ``loss_inter`` only (no views),
trained N steps under a variant while each step records the mean sigmoid of (up to) 8 matched
queries on their own instance (the trainer's dead-mask monitor, ``own_mask_probability``) and the
whole model's gradient norm. One row per variant in probes.jsonl (a variant already there is
skipped).

    python studies/solov2_dead_masks/probe.py [--steps 40] [--seed S] [--only NAME ...]
"""
import argparse
import json
import os

import torch

from run import PAPER  # the sibling study script (this folder is on the path when run)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# The paper's setting as run.py pins it (whatever the quickstart config now ships), loss_inter only.
INTER_ONLY = ["MODEL.IUQ.EQUI.ENABLED", "False", *PAPER]
VARIANTS = {  # name -> (overrides, full-model gradient-norm clip or None)
    "weight_0 (the baseline's training, monitored)": (INTER_ONLY + ["MODEL.IUQ.INTER.WEIGHT", "0.0"], None),
    "focal": (INTER_ONLY, None),
    "focal_weight_0.01": (INTER_ONLY + ["MODEL.IUQ.INTER.WEIGHT", "0.01"], None),
    "focal_momentum_0": (INTER_ONLY + ["SOLVER.MOMENTUM", "0.0"], None),
    "focal_clip_full_model_10": (INTER_ONLY, 10.0),
    "l1": (INTER_ONLY + ["MODEL.IUQ.INTER.LOSS", "l1"], None),
    # the remedy (run.py's inter_lr_warm500): IUQ ramped over 500 iterations at the batch-scaled lr
    "remedy": (INTER_ONLY + ["MODEL.IUQ.WARMUP_ITERS", "500", "SOLVER.BASE_LR", "0.0025"], None),
    # (rows "protect" and "protect_detached_samples" in probes.jsonl ran at commit 7eb4739 with
    # MODEL.IUQ.INTER.PROTECT_OWN_MASKS, an option since removed: at each query, L_inter's gradient
    # lost its component that would lower the query's mean own-instance logit; the second also
    # detached the batch's samples, so L_inter reached the queries only: probe.py at that commit)
}


def probe(overrides, clip, steps, seed=0):
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.events import EventStorage

    from iuq.config import get_iuq_cfg
    from iuq.data import register_quickstart
    from iuq.engine.models import register_base_models
    from iuq.engine.trainer import IUQTrainer

    register_base_models()
    register_quickstart(names=["iuq_quickstart_train"])
    cfg = get_iuq_cfg()
    cfg.merge_from_file(os.path.join(ROOT, "configs/quickstart_solov2.yaml"))
    cfg.merge_from_list(["SEED", str(seed), "OUTPUT_DIR", "/tmp/iuq_dead_mask_probe"] + overrides)
    seed_all_rng(seed)  # as train_net does (default_setup): the weights' and the data order's seed
    trainer = IUQTrainer(cfg)
    own, norms = [], []
    monitor = trainer.watch_dead_masks

    def watch(cap, n):
        p = trainer.own_mask_probability(cap, n)
        own.append(round(float(p.mean()), 4) if p is not None else None)
        monitor(cap, n)

    trainer.watch_dead_masks = watch
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    with EventStorage(0):
        for it in range(steps):
            trainer.iter = it
            loss_dict, samples = trainer.forward_losses(next(trainer._trainer._data_loader_iter))
            trainer.optimizer.zero_grad()
            sum(loss_dict.values()).backward()
            grads = [p.grad for p in params if p.grad is not None]
            norms.append(round(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))), 2))
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            if samples is not None:
                trainer.memory.enqueue(samples.detach())
            trainer.optimizer.step()
            trainer.scheduler.step()
    return own, norms, {k: round(float(v), 4) for k, v in loss_dict.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = os.path.join(HERE, "probes.jsonl")
    done = set()
    if os.path.exists(path):
        with open(path) as f:
            # rows with "seeded": false ran before probe.py applied the seed (a random draw each)
            done = {(r["variant"], r["steps"], r.get("seed", 0)) for r in map(json.loads, f) if r.get("seeded", True)}
    for name, (overrides, clip) in VARIANTS.items():
        if (args.only and name not in args.only) or (name, args.steps, args.seed) in done:
            continue
        own, norms, last = probe(overrides, clip, args.steps, args.seed)
        dead = next((i for i in range(len(own)) if all(p is not None and p < 1e-3 for p in own[i:])), None)
        row = {"variant": name, "steps": args.steps, "seed": args.seed, "seeded": True, "overrides": overrides, "clip_full_model": clip,
               "dead_from_step": dead, "own_mask_p": own, "grad_norm": norms, "last_losses": last}
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name}: dead from step {dead}; own p {own[:12]}...", flush=True)


if __name__ == "__main__":
    main()
