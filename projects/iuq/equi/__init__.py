"""Transformation equivariance (Eq. 6-8): the queries of g(I) on g(F) must give g's ground truth.

- ``transforms``: the transform group G (flip, crop, rotation, scale) on images, masks, boxes and
  padded feature maps, stride-exact;
- ``views``: one transformed view of each image of a detectron2 batch (the only module here that
  needs detectron2: its ``Instances``);
- ``crops``, ``chunked``: the autograd helpers that keep the equivariance loss's memory small.

``import iuq.equi`` needs no detectron2: ``views`` is imported by name (``iuq.equi.views``).
"""
from .chunked import chunked_sum
from .crops import crops
from .transforms import sample_transform, valid_cells

__all__ = ["chunked_sum", "crops", "sample_transform", "valid_cells"]
