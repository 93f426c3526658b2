"""Inter-scene uniqueness (Eq. 5): a query must fire on no pixel of another image.

- ``samples``: the pixel samples a batch gives (instance-balanced, per image, dense) and the grid
  its instance masks are read on;
- ``memory``: ``PixelMemory``, the FIFO queue of past batches' samples (all-gathered, checkpointed);
- ``losses``: ``inter_scene_loss`` against the batch's and the memory's samples, fused and chunked,
  with its hand-written autograd (``SampleDecode``, ``dot_product_decode``);
- ``stuff``: panoptic data's stuff targets (a stuff query's positives in other images);
- ``bound``: ``MODEL.IUQ.INTER.GRAD_BOUND``, L_inter's gradient at the query head capped at a
  multiple of the base losses' (its value unchanged), per step or (``MomentumBound``) as shares of
  the optimizer's momentum.

Framework-independent: torch only, no detectron2.
"""
from .bound import MomentumBound, bound_influence, momentum_scale, nearest_parameters
from .losses import SampleDecode, dot_product_decode, inter_scene_loss
from .memory import PixelMemory
from .samples import PixelSamples, grid_locations, masks_on_grid, sample_pixels
from .stuff import stuff_classes_of, stuff_flags

__all__ = [
    "MomentumBound",
    "bound_influence",
    "momentum_scale",
    "nearest_parameters",
    "SampleDecode",
    "dot_product_decode",
    "inter_scene_loss",
    "PixelMemory",
    "PixelSamples",
    "grid_locations",
    "masks_on_grid",
    "sample_pixels",
    "stuff_classes_of",
    "stuff_flags",
]
