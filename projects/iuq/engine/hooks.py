"""What a run reports beside its losses: the peak memory (a hook) and the dead-mask monitor (read
by ``IUQTrainer.watch_dead_masks`` from each step's capture)."""
import logging
import resource

import torch
from detectron2.engine import HookBase
from detectron2.utils.events import get_event_storage

logger = logging.getLogger(__name__)

# Dead-mask monitor: a step is "dead" when none of (up to) DEAD_MASK_QUERIES matched queries of the
# batch's originals has a mean sigmoid above DEAD_MASK_P on its own instance; DEAD_MASK_STEPS dead
# steps in a row log a warning (the mask losses have almost no gradient left there: SOLOv2's masks
# never came back in our runs; one CondInst quickstart run's did, after ~140 steps), and a warning
# that they are back if they return.
DEAD_MASK_P = 1e-3
DEAD_MASK_STEPS = 20
DEAD_MASK_QUERIES = 8


def put_scalars(scalars):
    """Log ``scalars`` ({name: float}) to detectron2's event storage where one is open (inside
    ``train()``); outside it (a test or a probe stepping the trainer by hand) nothing."""
    try:
        storage = get_event_storage()
    except AssertionError:  # no event storage
        return
    for name, value in scalars.items():
        storage.put_scalar(name, value)


class PeakMemory(HookBase):
    """Logs ``peak_mem_mb`` every 20 iterations: on CUDA the peak of allocated tensor memory
    (``torch.cuda.max_memory_allocated``), on CPU the process's peak resident set (which also
    counts the data, the code and the allocator's cache). Per process; the main one's is logged."""

    def after_step(self):
        if (self.trainer.iter + 1) % 20 and self.trainer.iter + 1 != self.trainer.max_iter:
            return
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        self.trainer.storage.put_scalar("peak_mem_mb", peak, smoothing_hint=False)


@torch.no_grad()
def own_mask_probability(adapter, cap, num_originals):
    """For up to DEAD_MASK_QUERIES matched queries of the originals (evenly spaced), the mean
    sigmoid of the query's mask on its own instance [q]; None if there is none."""
    mine = (cap.query_images < num_originals).nonzero(as_tuple=True)[0]
    if len(mine) == 0:
        return None
    keep = mine[torch.linspace(0, len(mine) - 1, min(len(mine), DEAD_MASK_QUERIES)).long()]
    queries, images, meta, targets = cap.select_queries(keep)
    logits = adapter.decode_map(queries.detach(), meta, images, cap.embeddings.detach())
    hm, wm = min(logits.shape[-2], targets.shape[-2]), min(logits.shape[-1], targets.shape[-1])
    inside = targets[:, :hm, :wm] > 0.5
    p = logits[:, :hm, :wm].float().sigmoid() * inside
    return p.flatten(1).sum(1) / inside.flatten(1).sum(1).clamp(min=1)


def count_dead_steps(p, dead_steps):
    """Log ``iuq/own_mask_p`` (the mean of ``p``, from ``own_mask_probability``) and return the
    count of consecutive dead steps after this one (every mask off: mean sigmoid < DEAD_MASK_P on
    its own instance), warning once when it reaches DEAD_MASK_STEPS and once when they are back."""
    put_scalars({"iuq/own_mask_p": float(p.mean())})
    dead = float(p.max()) < DEAD_MASK_P
    if not dead and dead_steps >= DEAD_MASK_STEPS:
        logger.warning(f"IUQ: the masks are alive again after {dead_steps} dead steps")
    dead_steps = dead_steps + 1 if dead else 0
    if dead_steps == DEAD_MASK_STEPS:
        logger.warning(
            f"IUQ: every mask has been off for {DEAD_MASK_STEPS} steps (no matched query has a "
            f"mean sigmoid >= {DEAD_MASK_P} on its own instance): the masks are dead, and the mask "
            "losses have almost no gradient left to revive them. Seen with SOLOv2, whose ReLU mask "
            "features give all its kernels' logits a common part that IUQ's losses push down at "
            "once while the logits are large, and whose masks came back once in our runs (from a "
            "trained trunk, after ~160 steps); a CondInst quickstart run's after ~140 steps "
            "(docs/study.md, 'SOLOv2's dead masks'). Watch iuq/own_mask_p; if it stays at 0, train "
            "again (from scratch, or MODEL.WEIGHTS of a checkpoint saved before they died: not "
            "--resume, which would skip the ramps) with IUQ's weights ramped in "
            "(MODEL.IUQ.WARMUP_ITERS, e.g. 1000) over the learning rate's warm-up "
            "(SOLVER.WARMUP_ITERS the same, SOLVER.WARMUP_FACTOR 0.01) to a learning rate scaled "
            "to the batch, as the SOLOv2 and SOTR recipes do: that kept the masks alive on every "
            "seed of our runs, from random initialisation and from a trained trunk. Where a ramp is "
            "not enough (the real SOLOv2 R50 from random initialisation), bound L_inter's influence: "
            "MODEL.IUQ.INTER.GRAD_BOUND 0.3 MODEL.IUQ.INTER.GRAD_BOUND_ON momentum keeps L_inter's "
            "share of the optimizer's momentum at the query head at most 0.3x the base losses' (its "
            "value, and every step where it stays below, unchanged). It kept the R50's masks through "
            "50 steps on the 6 (norm, seed) pairs run (one died at step 50, its twins alive to 70), "
            "where the bound on each step's gradient (GRAD_BOUND_ON step) lost them on 2 of 5; from "
            "random initialisation it does so by holding L_inter back on most steps (watch "
            "iuq/inter_grad_scale; docs/study.md, 'A bound on L_inter's influence')."
        )
    return dead_steps
