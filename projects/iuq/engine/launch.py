"""Launch support: what detectron2's launcher needs to run IUQ on a CPU-only machine."""
from contextlib import contextmanager

import torch
from detectron2.engine import defaults as d2_defaults


@contextmanager
def cpu_ddp_support(cfg):
    """Let DefaultTrainer wrap a CPU model in DDP (Gloo): detectron2 always passes
    ``device_ids=[local_rank]``, which DDP rejects for CPU modules. Scoped to the constructor."""
    if torch.device(cfg.MODEL.DEVICE).type != "cpu":
        yield
        return
    create = d2_defaults.create_ddp_model
    d2_defaults.create_ddp_model = lambda model, **kw: create(model, **{"device_ids": None, **kw})
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = create
