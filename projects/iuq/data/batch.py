"""What IUQ reads of a detectron2 training batch: each image's dataset-level id (which keeps a
query's own image out of its negatives) and its instance masks as one bool tensor, rasterised once
per batch and shared by the equivariant views (``iuq.equi.views``) and the inter-scene samples
(``iuq.inter.samples``); and the empty mask field an image without instances needs.
"""
import hashlib
import numbers

import torch
from detectron2.structures import BitMasks, Instances, PolygonMasks


def dataset_image_id(d):
    """The dataset-level image id as an int64: integer ids as they are; any other id (a file name,
    a UUID) by a 64-bit hash of its text (BLAKE2b), so that at 10^6 images two images share an id
    with probability ~3e-8 (a 32-bit hash makes that near certain at COCO's 10^5): two images
    sharing an id would stop being each other's negatives."""
    if "image_id" not in d:
        raise ValueError(
            f"IUQ needs an 'image_id' in every dataset dict (to keep a query's own image out of "
            f"its negatives); {d.get('file_name', 'an image')} has none"
        )
    image_id = d["image_id"]
    if isinstance(image_id, numbers.Integral):
        return int(image_id)
    digest = hashlib.blake2b(str(image_id).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def instance_bitmasks(instances, image_size):
    """The instances' masks as a bool tensor [N, h, w], from polygons, bitmasks or a tensor
    [N, h, w] (Mask2Former's mappers)."""
    masks = instances.gt_masks
    if isinstance(masks, PolygonMasks):
        return BitMasks.from_polygon_masks(masks, *image_size).tensor
    if isinstance(masks, torch.Tensor):
        return masks.bool()
    return masks.tensor.bool()


def batch_masks(batch):
    """Each image's instance masks at its input size, [N_b, h, w] bool: the batch's one
    rasterisation, which its views and its pixel samples both read."""
    return [instance_bitmasks(d["instances"], tuple(d["image"].shape[-2:])) for d in batch]


def with_empty_masks(batch, require=True):
    """``batch`` with an empty ``gt_masks`` (bitmasks [0, H, W]) on each image without instances.

    detectron2 gives an image with no annotation, or only crowd regions, no mask field at all; the
    base models then fail on it (CondInst reads ``gt_bitmasks`` of every image) and IUQ cannot tell
    it from an image whose dataset has no masks. With the empty field it is an image with nothing
    in it everywhere: no queries, no pixel samples, a view like any other. With ``require``, an
    image that *has* instances but no masks is an error naming it (``check_dataset_masks`` names
    the dataset before training; this catches a dataset with masks on some annotations only).
    """
    out = []
    for d in batch:
        instances = d["instances"]
        if not instances.has("gt_masks"):
            if len(instances):
                if require:
                    raise ValueError(
                        f"MODEL.IUQ needs instance masks, but image {d.get('image_id', '?')} "
                        f"({d.get('file_name', 'no file name')}) has {len(instances)} instances "
                        "without masks: train on a dataset with segmentation annotations (DATASETS.TRAIN)"
                    )
            else:
                instances = Instances(instances.image_size, **instances.get_fields())
                instances.gt_masks = BitMasks(torch.zeros(0, *instances.image_size, dtype=torch.bool))
                d = {**d, "instances": instances}
        out.append(d)
    return out
