"""The quickstart dataset as panoptic segmentation: the same shapes as *things*, and the background
split into two or three textured regions of *stuff* classes, in COCO panoptic format, so
panoptic training and PQ run with nothing downloaded.

Layout under the root (``default_quickstart_root()``, next to the instance splits)::

    panoptic/train/000000.jpg ...                  RGB images (JPEG, quality 98: detectron2's COCO
    panoptic/val/000000.jpg ...                    panoptic loader expects .jpg next to each .png)
    panoptic/panoptic_train/000000.png ...         segment ids, RGB-encoded (id = R + 256 G + 256^2 B)
    panoptic/panoptic_val/000000.png ...
    panoptic/annotations/panoptic_{train,val}.json COCO panoptic json (images, annotations with
                                                   segments_info, categories with isthing)

Things: circle, square, triangle (ids 1-3, as the instance quickstart: the same shapes and
layouts, image k of a split is instance image k with its background repainted). Stuff: stripes,
checks, grain (ids 4-6): each image's background pixels are split by one or two slanted lines
into two or three regions, each of a different stuff class, painted with its texture over the
image's own background colour; a region is one segment (stuff is instance-agnostic). Registered
with detectron2's ``register_coco_panoptic`` as ``iuq_quickstart_panoptic_{train,val}`` (64 / 16
images), so ``COCOPanopticEvaluator`` reports PQ, PQ^th and PQ^st on the val split.
"""
import json
import logging
import os

import numpy as np

from .quickstart import (_IMAGE_ID_OFFSET, _SPLIT_STREAM, QUICKSTART_CATEGORIES, _atomic_write, _is_current,
                         default_quickstart_root, render_quickstart_image)

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
STUFF_CATEGORIES = [
    {"id": 4, "name": "stripes", "supercategory": "texture"},
    {"id": 5, "name": "checks", "supercategory": "texture"},
    {"id": 6, "name": "grain", "supercategory": "texture"},
]
PANOPTIC_CATEGORIES = [{**c, "isthing": 1, "color": [220, 20, 60]} for c in QUICKSTART_CATEGORIES] + [
    {**c, "isthing": 0, "color": [70 + 40 * i, 130, 180]} for i, c in enumerate(STUFF_CATEGORIES)
]
PANOPTIC_QUICKSTART_DATASETS = {"iuq_quickstart_panoptic_train": ("train", 64),
                                "iuq_quickstart_panoptic_val": ("val", 16)}
_MIN_STUFF_PIXELS = 64  # a background region smaller than this joins its neighbour's class


def is_panoptic_quickstart_dataset(name):
    return name in PANOPTIC_QUICKSTART_DATASETS


def _texture(rng, kind, height, width):
    """A zero-mean texture [H, W] of stuff class ``kind`` (4 stripes, 5 checks, 6 grain), +-30."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    if kind == 4:
        angle, period = rng.uniform(0, np.pi), rng.uniform(6, 10)
        return 30.0 * np.sign(np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period))
    if kind == 5:
        size = int(rng.integers(6, 10))
        return 30.0 * (((xx // size + yy // size) % 2) * 2 - 1)
    return rng.normal(0, 30.0, size=(height, width))


def render_panoptic_image(seed, split, index, image_size=(192, 256)):
    """One image of the panoptic quickstart, deterministically from ``(seed, split, index)``.

    Returns:
        image (np.ndarray): [H, W, 3] uint8, RGB.
        segments (list[dict]): each with ``category_id`` (1-3 things, 4-6 stuff), ``isthing`` and
            ``mask`` (bool [H, W]); masks are disjoint and cover the image.
    """
    image, instances = render_quickstart_image(seed, split, index, image_size)
    height, width = image_size
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split], index, 7])  # a stream of its own
    foreground = np.zeros((height, width), dtype=bool)
    for inst in instances:
        foreground |= inst["mask"]
    # Two or three regions, cut by slanted lines across the width; each a different stuff class.
    count = int(rng.integers(2, 4))
    kinds = rng.permutation([c["id"] for c in STUFF_CATEGORIES])[:count]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    slope = rng.uniform(-0.5, 0.5)
    cuts = np.sort(rng.uniform(0.25, 0.75, size=count - 1)) * width
    region = np.searchsorted(cuts, xx + slope * (yy - height / 2))
    base = image.astype(np.float64)
    segments = [{"category_id": inst["category_id"], "isthing": 1, "mask": inst["mask"]} for inst in instances]
    for k, kind in enumerate(kinds):
        mask = (region == k) & ~foreground
        if mask.sum() < _MIN_STUFF_PIXELS:
            continue
        texture = _texture(rng, int(kind), height, width)
        base[mask] += texture[mask][:, None]
        segments.append({"category_id": int(kind), "isthing": 0, "mask": mask})
    covered = np.zeros((height, width), dtype=bool)
    for s in segments:
        covered |= s["mask"]
    leftover = ~covered  # tiny background slivers: joined to the first stuff segment
    stuff = [s for s in segments if not s["isthing"]]
    if leftover.any() and stuff:
        stuff[0]["mask"] = stuff[0]["mask"] | leftover
    image = np.clip(np.round(base), 0, 255).astype(np.uint8)
    return image, segments


def _id_to_rgb(ids):
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def _generate_split(root, seed, split, num_images, image_size):
    from PIL import Image
    from pycocotools import mask as mask_util

    base = os.path.join(root, "panoptic")
    image_dir = os.path.join(base, split)
    panoptic_dir = os.path.join(base, f"panoptic_{split}")
    json_file = os.path.join(base, "annotations", f"panoptic_{split}.json")
    info = {"generator": "iuq quickstart panoptic", "version": GENERATOR_VERSION, "seed": seed, "split": split,
            "num_images": num_images, "image_size": list(image_size)}
    if _is_current(json_file, info, image_dir):
        return json_file, image_dir, panoptic_dir
    logger.info(f"Generating the IUQ panoptic quickstart {split} split ({num_images} images) in {base} ...")
    for d in (image_dir, panoptic_dir, os.path.dirname(json_file)):
        os.makedirs(d, exist_ok=True)
    height, width = image_size
    images, annotations = [], []
    for index in range(num_images):
        image, segments = render_panoptic_image(seed, split, index, image_size)
        image_id = _IMAGE_ID_OFFSET[split] + index
        ids = np.zeros((height, width), dtype=np.int64)
        info_segments = []
        for k, s in enumerate(segments):
            segment_id = k + 1
            ids[s["mask"]] = segment_id
            rle = mask_util.encode(np.asfortranarray(s["mask"].astype(np.uint8)))
            info_segments.append({"id": segment_id, "category_id": s["category_id"], "iscrowd": 0,
                                  "area": int(mask_util.area(rle)), "bbox": [float(v) for v in mask_util.toBbox(rle)]})
        stem = f"{index:06d}"
        _atomic_write(os.path.join(image_dir, stem + ".jpg"),
                      lambda f: Image.fromarray(image).save(f, format="JPEG", quality=98), ".jpg")
        _atomic_write(os.path.join(panoptic_dir, stem + ".png"),
                      lambda f: Image.fromarray(_id_to_rgb(ids)).save(f, format="PNG"), ".png")
        images.append({"id": image_id, "file_name": stem + ".jpg", "height": height, "width": width})
        annotations.append({"image_id": image_id, "file_name": stem + ".png", "segments_info": info_segments})
    data = {"info": info, "images": images, "annotations": annotations, "categories": PANOPTIC_CATEGORIES}
    payload = json.dumps(data, separators=(",", ":")).encode("utf-8")
    _atomic_write(json_file, lambda f: f.write(payload), ".json")  # last: marks a complete split
    return json_file, image_dir, panoptic_dir


def panoptic_metadata():
    """The metadata detectron2 (and Mask2Former) read for a COCO-panoptic-style dataset: things'
    and stuff's contiguous ids in one space (things 0-2, stuff 3-5), ``stuff_classes`` naming all."""
    things = [c for c in PANOPTIC_CATEGORIES if c["isthing"]]
    return {
        "thing_classes": [c["name"] for c in things],
        "thing_colors": [c["color"] for c in things],
        "stuff_classes": [c["name"] for c in PANOPTIC_CATEGORIES],
        "stuff_colors": [c["color"] for c in PANOPTIC_CATEGORIES],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(PANOPTIC_CATEGORIES) if c["isthing"]},
        "stuff_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(PANOPTIC_CATEGORIES) if not c["isthing"]},
    }


def register_panoptic_quickstart(root=None, names=None, seed=0):
    """Generate (if needed) and register ``iuq_quickstart_panoptic_{train,val}`` (or ``names``)
    with detectron2's ``register_coco_panoptic``. Returns the registered names."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_panoptic

    root = root or default_quickstart_root()
    names = list(names) if names is not None else list(PANOPTIC_QUICKSTART_DATASETS)
    for name in names:
        if name not in PANOPTIC_QUICKSTART_DATASETS:
            raise ValueError(f"{name!r} is not a panoptic quickstart dataset: {sorted(PANOPTIC_QUICKSTART_DATASETS)}")
        split, num_images = PANOPTIC_QUICKSTART_DATASETS[name]
        json_file, image_dir, panoptic_dir = _generate_split(root, seed, split, num_images, (192, 256))
        if name in DatasetCatalog.list():
            if MetadataCatalog.get(name).get("panoptic_json") == json_file:
                continue
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_panoptic(name, panoptic_metadata(), image_dir, panoptic_dir, json_file)
    return names
