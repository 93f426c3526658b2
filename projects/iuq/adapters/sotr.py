"""SOTR (github.com/easton-cau/SOTR): its twin-transformer head predicts a 256-d dynamic kernel per
grid cell; the kernels at the positive cells (SOLO-style grid assignment) are the queries, the
unified mask feature (256 channels, stride 4) the pixel embeddings, decoded by a 1x1 convolution,
i.e. a dot product. Its ground truth and ``loss(cate_preds, kernel_preds, ins_pred, targets)`` are
textually SOLOv2's, so the SOLO-family adapter (``grid_kernels.py``) wraps that call unchanged.

SOTR's package is also named ``adet``: it lives in its own environment, apart from AdelaiDet.
"""
from adet.modeling.sotr.loss import dice_loss

from .base import IUQ_ADAPTER_REGISTRY
from .grid_kernels import GridKernelAdapter


@IUQ_ADAPTER_REGISTRY.register()
class SOTR(GridKernelAdapter):
    """Registered under the meta-architecture's name, as all adapters are."""

    dice_loss = staticmethod(dice_loss)  # SOTR's own, for L_equi
