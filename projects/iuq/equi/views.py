"""Equivariant views of a detectron2 training batch: for each image ``I``, a transformed copy
``g(I)`` with its instances moved by the same ``g`` (the transform group of ``transforms``).

The views join the batch as images of their own, so the base model assigns its queries on them
(the paper's ``sigma`` on the transformed view) and its losses treat them as augmented copies.
"""
import random
from dataclasses import dataclass

import torch
from detectron2.structures import BitMasks, Boxes, Instances

from ..data.batch import instance_bitmasks
from .transforms import Crop, HFlip, TransformList, sample_transform


@dataclass
class View:
    """A view of original ``source`` (its index in the batch) under transform ``g``."""

    source: int
    g: TransformList


def make_view(d, stride, equi_cfg, pixel_mean, rng=random, tries=10, masks=None, kind=None):
    """A view dict of dataset dict ``d`` (as the model consumes it) and its transform. ``masks``:
    ``d``'s instance masks [N, h, w] where the caller has them (``iuq.data.batch.batch_masks``).
    ``kind``: None, ``g`` composed of ``equi_cfg.TRANSFORMS`` (``sample_transform``); or one
    transform name, ``g`` is that transform alone (a flip always flips).

    The view's instances are those whose mask survives ``g`` (boxes recomputed tight around the
    moved masks). If ``tries`` draws all lose every instance, the view is a plain flip, which
    loses none (with ``kind="crop"``: the whole-image crop). An image without instances gets the
    first draw (there is nothing to lose).
    """
    image = d["image"]
    size = tuple(image.shape[-2:])
    if masks is None:
        masks = instance_bitmasks(d["instances"], size)
    names, flip_p = (tuple(equi_cfg.TRANSFORMS), 0.5) if kind is None else ((kind,), 1.0)
    for _ in range(tries):
        g = sample_transform(
            size, stride, names, tuple(equi_cfg.CROP_RANGE),
            tuple(equi_cfg.ROTATION_RANGE), tuple(equi_cfg.SCALE_RANGE), rng, flip_p=flip_p,
        )
        moved = g.apply_masks(masks)
        keep = moved.flatten(1).any(dim=1)
        if bool(keep.any()) or len(masks) == 0:
            break
    else:
        whole = Crop(size, stride, (0, 0) + size) if kind == "crop" else HFlip(size, stride)
        g = TransformList([whole], size, stride)
        moved = g.apply_masks(masks)
        keep = moved.flatten(1).any(dim=1)
    bitmasks = BitMasks(moved[keep])
    instances = Instances(
        g.out_size,
        gt_boxes=Boxes(bitmasks.get_bounding_boxes().tensor),
        gt_classes=d["instances"].gt_classes[keep],
        gt_masks=bitmasks,
    )
    # Float image, so that the flip canvas's padding is exactly the mean (0 after normalising).
    view_image = g.apply_image(image.float(), pad_value=pixel_mean)
    view = {k: v for k, v in d.items() if k not in ("image", "instances")}
    view.update(image=view_image, instances=instances, height=g.out_size[0], width=g.out_size[1])
    return view, g


def add_views(batch, stride, equi_cfg, pixel_mean, rng=random, masks=None):
    """``batch`` followed by one view of each of its images, and the list of :class:`View`.
    ``masks``: the images' instance masks (``batch_masks``), rasterised here without.
    ``equi_cfg.DRAW`` (``MODEL.IUQ.EQUI.DRAW``): "per_image_compose", each image's ``g`` composed
    of the listed transforms; "per_batch_choice", one transform kind drawn for the batch (uniform
    over ``TRANSFORMS``, Algorithm 1's ``RandomChoice``) and each image's ``g`` that one transform."""
    views, meta = [], []
    draw = equi_cfg.get("DRAW", "per_image_compose")
    kind = rng.choice(list(equi_cfg.TRANSFORMS)) if draw == "per_batch_choice" else None
    for i, d in enumerate(batch):
        view, g = make_view(d, stride, equi_cfg, pixel_mean, rng, masks=None if masks is None else masks[i],
                            kind=kind)
        views.append(view)
        meta.append(View(i, g))
    return list(batch) + views, meta
