#!/usr/bin/env python3
"""Issue 30, item 1: what blows up first when the real SOLOv2 R50 (random initialisation, the COCO
sample) loses its masks under IUQ. Trains ``configs/IUQ/SOLOv2/R50_1x.yaml`` through IUQTrainer
for a few steps and records, per step, what L_inter and the base mask loss do at the queries:

- ``loss_ins`` (the base dice loss), ``loss_cate``, the weighted ``loss_inter`` and its raw value
  (divided by the ramp and INTER.WEIGHT);
- the own-instance probability the dead-mask monitor reads (largest and mean);
- the kernels' (queries') norm and the mask feature's norm (per-pixel, mean and max);
- the largest negative logit (a query on another image's sample: the batch's and the memory's),
  and the share of negative pairs above 0;
- the gradient norms of the raw L_inter, of the weighted L_inter and of the base mask loss at the
  kernel head's last conv ("kernel") and the mask head's last conv ("feature"), and their cosine.

    python studies/solov2_r50_instability/probe.py --norm frozen --seed 1 --steps 13 --variant iuq
    python studies/solov2_r50_instability/probe.py --norm bn --seed 1 --variant off     # IUQ-off twin

One JSON row per step in ``probes.jsonl`` next to this file (``--out`` to change). Variants:
``iuq`` (both losses, the recipe's ramp), ``off`` (IUQ off), ``augment`` (views as plain
augmentation), ``zero`` (IUQ on, both weights 0). Extra ``KEY VALUE`` overrides follow ``--``.
"""
import argparse
import contextlib
import fcntl
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DETECTRON2_DATASETS", str(REPO.parent / "shared" / "datasets"))

# The setting: the R50 recipe from random initialisation on the COCO sample, 2 images a
# step, short side 320, memory 5,000 (the test of the bound trains the same).
sys.path.insert(0, str(REPO / "tests"))
from adelaidet_support import R50_COCO_SAMPLE as SETTING  # noqa: E402

NORMS = {"frozen": [], "bn": ["MODEL.RESNETS.NORM", "BN", "MODEL.BACKBONE.FREEZE_AT", "0"]}
VARIANTS = {
    "iuq": [],
    "off": ["MODEL.IUQ.ENABLED", "False"],
    "augment": ["MODEL.IUQ.INTER.ENABLED", "False", "MODEL.IUQ.EQUI.MODE", "augment"],
    "zero": ["MODEL.IUQ.INTER.WEIGHT", "0.0", "MODEL.IUQ.EQUI.WEIGHT", "0.0"],
}


def build(args):
    import train_net
    from detectron2.utils.events import EventStorage  # noqa: F401  (detectron2 must import)

    from iuq.engine.trainer import IUQTrainer

    argv = ["--config-file", str(REPO / "configs/IUQ/SOLOv2/R50_1x.yaml"), "SEED", str(args.seed),
            "OUTPUT_DIR", args.output] + SETTING + NORMS[args.norm] + VARIANTS[args.variant] + args.opts
    cfg = train_net.setup(train_net.default_argument_parser().parse_args(argv))
    from detectron2.utils.env import seed_all_rng

    seed_all_rng(args.seed)

    class Probe(IUQTrainer):
        """IUQTrainer whose loss step also records the quantities above (after the losses, before
        backward: nothing it computes reaches the training)."""

        def inter_loss(self, cap, originals, batch, image_ids, masks=None):
            loss, samples = super().inter_loss(cap, originals, batch, image_ids, masks)
            self._probe = dict(cap=cap, raw=loss / max(self.iuq_cfg.INTER.WEIGHT, 1e-12), samples=samples,
                               image_ids=image_ids)
            return loss, samples

        def forward_losses(self, batch):
            import torch

            from iuq.inter.samples import PixelSamples

            self._probe = None
            self._cap = None
            self.inter_bound = (None, None)  # (ratio, scale) where MODEL.IUQ.INTER.GRAD_BOUND is on
            loss_dict, samples = super().forward_losses(batch)
            row = {k: float(v) for k, v in loss_dict.items()}
            row["ramp"] = self.iuq_weight_factor()
            row["lr"] = self.optimizer.param_groups[0]["lr"]
            row["inter_grad_ratio"], row["inter_grad_scale"] = self.inter_bound
            probe = self._probe
            if probe is not None:
                cap = probe["cap"]
                q = cap.queries
                row["raw_loss_inter"] = float(probe["raw"])
                row["kernel_norm_mean"] = float(q.norm(dim=1).mean()) if len(q) else 0.0
                row["kernel_norm_max"] = float(q.norm(dim=1).max()) if len(q) else 0.0
                feat = cap.embeddings.detach().norm(dim=1)
                row["feature_norm_mean"], row["feature_norm_max"] = float(feat.mean()), float(feat.max())
                with torch.no_grad():
                    bank = PixelSamples.cat([probe["samples"].detach()] + ([self.memory.samples()] if len(self.memory) else []))
                    logits = q.detach() @ bank.embeddings.float().t()
                    negative = probe["image_ids"][cap.query_images][:, None] != bank.image_ids[None, :]
                    neg = logits[negative]
                    row["neg_logit_max"] = float(neg.max()) if neg.numel() else None
                    row["neg_logit_mean"] = float(neg.mean()) if neg.numel() else None
                    row["neg_share_above_0"] = float((neg > 0).float().mean()) if neg.numel() else None
                    own = self.own_mask_probability(cap, len(batch))  # batch: the originals
                    # the dead-mask monitor's reading: dead when the largest is below DEAD_MASK_P
                    row["own_p_max"] = None if own is None else float(own.max())
                    row["own_p_mean"] = None if own is None else float(own.mean())
                # Both losses reach the kernels through the kernel head's last conv and the mask
                # feature through the mask head's last conv (the captured queries are a separate
                # read of the kernels: the base loss does not flow through them).
                params = {"kernel": [self.model.ins_head.kernel_pred.weight, self.model.ins_head.kernel_pred.bias],
                          "feature": [m.weight for m in self.model.mask_head.conv_pred.modules()
                                      if isinstance(m, torch.nn.Conv2d)]}
                for part, wrt in (params.items() if args.grads else ()):
                    grads = {}
                    for name, value in (("inter_raw", probe["raw"]), ("ins", loss_dict.get("loss_ins"))):
                        if value is None or not value.requires_grad:
                            continue
                        got = torch.autograd.grad(value, wrt, retain_graph=True, allow_unused=True)
                        grads[name] = torch.cat([(g if g is not None else torch.zeros_like(w)).flatten()
                                                 for g, w in zip(got, wrt)])
                    if len(grads) == 2:
                        a, b = grads["inter_raw"], grads["ins"]
                        row[f"grad_{part}_inter_raw"] = float(a.norm())
                        row[f"grad_{part}_inter_weighted"] = float(a.norm()) * row["ramp"] * self.iuq_cfg.INTER.WEIGHT
                        row[f"grad_{part}_ins"] = float(b.norm())
                        row[f"grad_{part}_cosine"] = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
            self.rows.append(row)
            return loss_dict, samples

    trainer = Probe(cfg)
    trainer.rows = []
    trainer.resume_or_load(resume=False)
    return trainer, cfg


@contextlib.contextmanager
def _locked(path, mode):
    """``open(path, mode)`` held under an exclusive ``flock``: run.sh's shards share one rows file."""
    with open(path, mode) as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield f
        finally:
            f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--norm", choices=sorted(NORMS), default="frozen")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--steps", type=int, default=13)
    p.add_argument("--variant", choices=sorted(VARIANTS), default="iuq")
    p.add_argument("--tag", default="", help="a name for the extra overrides, recorded in each row")
    p.add_argument("--no-grads", dest="grads", action="store_false",
                   help="skip the four gradient measurements (the long runs: a step costs ~2x without)")
    p.add_argument("--out", default=str(HERE / "probes.jsonl"))
    p.add_argument("--output", default="output/solov2_r50_probe")
    p.add_argument("--stop-dead", type=int, default=0, metavar="K",
                   help="stop after K consecutive steps with every mask off (report.py's dead_step reading): "
                        "SOLOv2's dead state is absorbing; the last row says stopped_dead")
    p.add_argument("--skip-done", action="store_true",
                   help="do nothing when --out already holds this run (same norm, seed, variant, tag) "
                        "through --steps steps or stopped dead")
    p.add_argument("opts", nargs=argparse.REMAINDER)
    args = p.parse_args()
    args.opts = [o for o in args.opts if o != "--"]
    from report import dead_step, rows, run_key

    key = (args.norm, args.seed, args.variant, args.tag)
    if args.skip_done:
        found = rows(args.out)
        mine = [r for r in found if run_key(r) == key]
        if any(r["step"] >= args.steps - 1 or r.get("stopped_dead") for r in mine):
            print(f"[probe] {key}: already in {args.out}, skipped")
            return
        if mine:  # a run cut off part-way: its rows go, it reruns from step 0
            with _locked(args.out, "r+") as f:  # under the lock: run.sh's other shard may be appending
                kept = [r for r in map(json.loads, filter(str.strip, f)) if run_key(r) != key]
                f.seek(0)
                f.truncate()
                f.write("".join(json.dumps(r) + "\n" for r in kept))

    trainer, cfg = build(args)
    from detectron2.utils.events import EventStorage

    with EventStorage(0) as storage:
        trainer.storage = storage
        trainer._trainer.storage = storage
        dead_run = 0
        for it in range(args.steps):
            trainer.iter = it
            storage.iter = it
            trainer.run_step()
            trainer.scheduler.step()  # what detectron2's LRScheduler hook does after each step (the lr warm-up)
            row = {"step": it, "norm": args.norm, "seed": args.seed, "variant": args.variant, "tag": args.tag,
                   "opts": args.opts, **trainer.rows[-1]}
            dead_run = dead_run + 1 if dead_step(row) else 0
            row["stopped_dead"] = bool(args.stop_dead and dead_run >= args.stop_dead)
            with _locked(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                              if k not in ("opts",)}), flush=True)
            if row["stopped_dead"]:
                print(f"[probe] every mask off for {dead_run} steps: stopped at step {it}")
                break


if __name__ == "__main__":
    main()
