#!/usr/bin/env python3
"""How hard each loss pulls on the queries and on the pixel embeddings: the gradient norms of the
base model's mask loss, ``loss_inter`` and ``loss_equi`` at the captured queries [Q, P] and
embedding map [B, D, H, W], on real training batches (the model at random initialisation, or
trained: ``MODEL.WEIGHTS``).

    python tools/loss_gradients.py --config-file configs/quickstart.yaml --batches 4
    python tools/loss_gradients.py --config-file configs/quickstart.yaml MODEL.WEIGHTS output/quickstart/model_final.pth

Each loss is taken as it enters the total (with its weight). Printed per loss: the mean over
batches of ||dL/dq|| and ||dL/dF|| (Frobenius norms over the whole tensor), each also as a ratio to
the base mask loss's, and the loss value. A ratio far below 1 means the loss barely moves what the
base loss already moves; far above, that it dominates it.
"""
import argparse
import os
import sys
from contextlib import contextmanager

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

BASE_MASK_LOSSES = ("loss_mask", "loss_ins", "loss_dice")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--fill", type=int, default=0,
                        help="first fill the memory from this many batches (their gradients are not used): the "
                             "loss then sees up to MODEL.IUQ.MEMORY.SIZE negatives from the first measured batch")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE or KEY=VALUE")
    args = parser.parse_args(argv)

    import torch
    from tabulate import tabulate

    import train_net
    from iuq.engine.trainer import IUQTrainer

    d2_args = train_net.default_argument_parser().parse_args(
        ["--config-file", args.config_file] + list(args.opts) + ["MODEL.IUQ.ENABLED", "True"]
    )
    cfg = train_net.setup(d2_args)
    trainer = IUQTrainer(cfg)
    if cfg.MODEL.WEIGHTS:  # the model, and the memory if the checkpoint has it
        trainer.checkpointer.load(cfg.MODEL.WEIGHTS, checkpointables=["iuq_memory"])
    kept = []
    capture = trainer.adapter.capture

    @contextmanager
    def keeping():
        with capture() as cap:
            kept.append(cap)
            yield cap

    trainer.adapter.capture = keeping
    data = iter(trainer.data_loader)
    for _ in range(args.fill):  # (a training forward: the graph is built and dropped)
        _, samples = trainer.forward_losses(next(data))
        trainer.memory.enqueue(samples.detach())
    if args.fill:
        print(f"memory filled: {len(trainer.memory)} samples")
    sums = {}
    for _ in range(args.batches):
        kept.clear()
        loss_dict, samples = trainer.forward_losses(next(data))
        cap = kept[-1]
        for name, loss in loss_dict.items():
            if name not in BASE_MASK_LOSSES + ("loss_inter", "loss_equi"):
                continue
            gq, gf = torch.autograd.grad(loss, [cap.queries, cap.embeddings], retain_graph=True, allow_unused=True)
            norms = [0.0 if g is None else float(g.norm()) for g in (gq, gf)]
            acc = sums.setdefault(name, [0.0, 0.0, 0.0])
            acc[0] += norms[0] / args.batches
            acc[1] += norms[1] / args.batches
            acc[2] += float(loss) / args.batches
        if samples is not None:  # as in training: the memory fills from batch to batch
            trainer.memory.enqueue(samples.detach())
    base = next((sums[k] for k in BASE_MASK_LOSSES if k in sums), None)
    rows = []
    for name, (q, f, value) in sums.items():
        rq = q / base[0] if base and base[0] else float("nan")
        rf = f / base[1] if base and base[1] else float("nan")
        rows.append([name, f"{value:.4f}", f"{q:.3e}", f"{rq:.3f}", f"{f:.3e}", f"{rf:.3f}"])
    print(tabulate(rows, headers=["loss", "value", "|dL/dq|", "x base", "|dL/dF|", "x base"], tablefmt="pipe"))
    return sums


if __name__ == "__main__":
    main()
