"""IUQ: Instance-Unique Querying (Wang, Liang, Liu, NeurIPS 2022) for detectron2 segmenters.

The package is laid out by the paper's ideas:
- ``inter/``: inter-scene uniqueness (Eq. 5): pixel samples, the memory, the loss, stuff targets;
- ``equi/``: transformation equivariance (Eq. 6-8): the transform group, a batch's views, the
  autograd helpers of its loss;
- ``adapters/``: how each base model's queries, embeddings and mask loss are reached;
around them ``engine/`` (``IUQTrainer``, hooks, solver, launch support), ``data/``, ``evaluation/``,
``config`` (``MODEL.IUQ``), and tooling: ``study`` (the ablation study), ``frameworks`` and
``collect_env`` (``python -m iuq.collect_env``).

``import iuq`` needs no detectron2: the names that need it (``IUQTrainer``, the adapter registry,
``get_iuq_cfg``'s frameworks) are resolved on first use.
"""
from ._lazy import lazy_getattr
from .config import add_iuq_config, get_iuq_cfg, validate_iuq_config
from .equi.transforms import sample_transform
from .inter.losses import SampleDecode, dot_product_decode, inter_scene_loss
from .inter.memory import PixelMemory
from .inter.samples import PixelSamples, sample_pixels

_LAZY = {  # name -> the module that defines it (imported on first use: these need detectron2 or fvcore)
    "IUQTrainer": "engine.trainer",
    "IUQ_ADAPTER_REGISTRY": "adapters.base",
    "IUQAdapter": "adapters.base",
    "Captured": "adapters.base",
    "build_adapter": "adapters.base",
    "register_base_models": "engine.models",
}

__all__ = [
    "add_iuq_config",
    "get_iuq_cfg",
    "validate_iuq_config",
    "sample_transform",
    "SampleDecode",
    "dot_product_decode",
    "inter_scene_loss",
    "PixelMemory",
    "PixelSamples",
    "sample_pixels",
    *_LAZY,
]


__getattr__ = lazy_getattr(__name__, _LAZY)
