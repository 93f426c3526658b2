"""Optimizers the transformer-style base models train with, where their own code builds them only
in their ``train_net.py`` (which a package user cannot import): one parameter group per parameter
and gradient clipping of the whole model at once (``SOLVER.CLIP_GRADIENTS.CLIP_TYPE
"full_model"``, which detectron2 lacks)."""
import torch
from detectron2.solver.build import maybe_add_gradient_clipping


def clip_full_model(optimizer_class, max_norm):
    """``optimizer_class`` whose ``step`` first clips the gradient norm of all its parameters
    together at ``max_norm``."""

    class FullModelClipping(optimizer_class):
        def step(self, closure=None):
            torch.nn.utils.clip_grad_norm_([p for g in self.param_groups for p in g["params"]], max_norm)
            return super().step(closure=closure)

    FullModelClipping.__name__ = f"FullModelClipping{optimizer_class.__name__}"
    return FullModelClipping


def build_grouped_optimizer(cfg, groups, owner):
    """``SOLVER.OPTIMIZER`` ("ADAMW" or "SGD" with ``SOLVER.MOMENTUM``) over ``groups``, clipped as
    ``SOLVER.CLIP_GRADIENTS`` says: the whole model at once for CLIP_TYPE "full_model", else
    detectron2's per-parameter clipping. ``owner`` names the model in the error."""
    s = cfg.SOLVER
    if s.OPTIMIZER == "ADAMW":
        kind, kwargs = torch.optim.AdamW, ({"amsgrad": s.AMSGRAD} if "AMSGRAD" in s else {})
    elif s.OPTIMIZER == "SGD":
        kind, kwargs = torch.optim.SGD, {"momentum": s.MOMENTUM}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER {s.OPTIMIZER!r}: {owner} trains with 'ADAMW' or 'SGD'")
    clip = s.CLIP_GRADIENTS
    if clip.CLIP_TYPE == "full_model":
        if clip.ENABLED and clip.CLIP_VALUE > 0:
            kind = clip_full_model(kind, clip.CLIP_VALUE)
    else:
        kind = maybe_add_gradient_clipping(cfg, kind)
    return kind(groups, s.BASE_LR, **kwargs)
