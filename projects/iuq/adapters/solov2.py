"""SOLOv2 (AdelaiDet): the dynamic kernels at the positive grid cells are the queries, the unified
mask feature (stride 4) the pixel embeddings; everything but the dice loss is shared with SOTR
(see ``grid_kernels.py``: ``SOLOv2.loss`` is the wrapped call)."""
from adet.modeling.solov2.loss import dice_loss

from .base import IUQ_ADAPTER_REGISTRY
from .grid_kernels import GridKernelAdapter


@IUQ_ADAPTER_REGISTRY.register()
class SOLOv2(GridKernelAdapter):
    """Registered under the meta-architecture's name, as all adapters are."""

    dice_loss = staticmethod(dice_loss)  # AdelaiDet's own, for L_equi
