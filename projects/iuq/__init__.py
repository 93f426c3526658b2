"""IUQ: Instance-Unique Querying (Wang, Liang, Liu, NeurIPS 2022) for detectron2 segmenters.

The three ideas live in three places:
- ``memory`` + ``samples`` + ``losses``: the external pixel memory and the inter-scene loss;
- ``equivariance``: the transform group acting on images, masks, boxes and feature maps
  (``chunked``: the sum of per-chunk loss terms that keeps the equivariance loss cheap);
- ``adapters`` (with detectron2): how each base model's queries and embeddings are captured.
"""
from .config import add_iuq_config, validate_iuq_config
from .equivariance import sample_transform
from .losses import SampleDecode, dot_product_decode, inter_scene_loss
from .memory import PixelMemory
from .samples import PixelSamples, sample_pixels

__all__ = [
    "add_iuq_config",
    "validate_iuq_config",
    "sample_transform",
    "SampleDecode",
    "dot_product_decode",
    "inter_scene_loss",
    "PixelMemory",
    "PixelSamples",
    "sample_pixels",
]
