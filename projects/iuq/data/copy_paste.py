"""A real-image testbed by copy-paste (Ghiasi et al., "Simple Copy-Paste is a Strong Data
Augmentation Method for Instance Segmentation", CVPR 2021), from any COCO-format dataset.

Why: Eq. 5 presumes that an instance at the same place in another image can be told apart from
the query's own. Real objects' appearance gives that without a download: scenes composed of
real COCO instances, pasted at random places, scales and flips onto real backgrounds, put
different-looking objects at the same place in different images.

How, for a source (COCO instances json + image folder):

1. **Split the source images** into a training part and a held-out part by image id, seeded
   (``split_image_ids``: the sorted ids shuffled by ``seed``, the first ``held_out`` fraction
   held out). Training scenes use only the training part's images, held-out scenes only the
   held-out part's: no object or background of a held-out image is ever seen in training.
2. **Compose each scene** (``compose_scene``, one numpy generator per (seed, split, scene index):
   scene k is the same whatever the number of scenes asked for):
   - the *background*: a random crop (relative side ``background_crop``) of a random image of the
     part, resized to ``image_size``, with its own instances cropped and resized alike (Ghiasi et
     al. keep them; ``background_instances=False`` drops them: they are then unlabelled);
   - ``instances_per_scene`` instances of the part pasted one after another: each instance's
     pixels under its mask, resized by the source image's scale to the canvas times a factor in
     ``scale_range``, flipped with probability 1/2, at a uniform position where it fits. A later
     instance occludes the earlier ones: their masks lose its pixels;
   - instances left with fewer than ``min_area`` pixels or less than ``min_visible`` of their
     pasted area (fully hidden, or tiny remnants) are dropped.
   Crowd annotations are never pasted, and images with crowd regions are not used as
   backgrounds (their unlabelled crowds would be background).
3. **Write** the scenes as JPEGs and a COCO instances json: masks as RLE (``mask_format="rle"``,
   exact; detectron2 needs ``INPUT.MASK_FORMAT bitmask`` for them) or polygons (``"polygon"``:
   outer boundaries from OpenCV, holes filled as COCO polygons cannot hold them; for recipes with
   ``MASK_FORMAT polygon``); ``bbox`` and ``area`` are pycocotools' of the mask as written. Each
   annotation records ``source_image_id`` / ``source_annotation_id``, each image its
   ``background_image_id`` and ``source_image_ids``, and ``info.iuq_copy_paste`` the split.

Registered datasets (``register_copy_paste``, called by ``train_net.py`` for the names it
finds): ``iuq_copy_paste_train`` (1000 scenes) and ``iuq_copy_paste_val`` (200), or
``iuq_copy_paste_{train,val}_N`` for N scenes, built on first use from COCO val2017 under
``$DETECTRON2_DATASETS/coco`` (the LVIS sample's source) into ``$IUQ_COPY_PASTE_ROOT`` (default
``./datasets/iuq_copy_paste``). ``iuq_copy_paste_objects_{train,val}[_N]`` are the same scenes,
class-agnostic: every instance is of one category, ``object`` (``objects_json``), for a study of
mask quality that a small source's ~12 instances per class would otherwise drown in
classification noise. ``tools/make_copy_paste.py`` builds a set from any COCO-format data.
"""
import hashlib
import json
import logging
import os
import re
from collections import OrderedDict

import numpy as np

from .lvis_sample import _stamp_of, default_lvis_sample_source
from .quickstart import _atomic_write

__all__ = [
    "COPY_PASTE_DEFAULTS",
    "compose_scene",
    "default_copy_paste_root",
    "generate_copy_paste_split",
    "is_copy_paste_dataset",
    "make_copy_paste",
    "objects_json",
    "register_copy_paste",
    "split_image_ids",
]

logger = logging.getLogger(__name__)

# Bump when what is written changes, so cached copies are regenerated.
GENERATOR_VERSION = 1

COPY_PASTE_DEFAULTS = dict(
    seed=0,
    held_out=0.25,  # fraction of the source images held out
    image_size=(384, 512),  # (height, width) of every scene
    instances_per_scene=(3, 8),  # pasted per scene, uniform in [min, max]
    scale_range=(0.5, 1.5),  # factor on the source image's scale to the canvas
    background_crop=(0.5, 1.0),  # relative side of the background's crop
    background_instances=True,
    min_source_area=400,  # source instances smaller than this (pixels) are not pasted
    min_area=64,  # an instance left with fewer pixels is dropped
    min_visible=0.1,  # ... or with less than this fraction of its pasted area visible
    mask_format="rle",
    jpeg_quality=90,
)
DEFAULT_SCENES = {"train": 1000, "val": 200}
SPLITS = ("train", "val")
_NAME = re.compile(r"^iuq_copy_paste_(objects_)?(train|val)(?:_(\d+))?$")
OBJECT_CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}


def default_copy_paste_root():
    """``$IUQ_COPY_PASTE_ROOT``, else ``./datasets/iuq_copy_paste`` (git-ignored). Not under
    ``$DETECTRON2_DATASETS``, which often points at a shared, read-only copy of COCO."""
    return os.path.expanduser(os.environ.get("IUQ_COPY_PASTE_ROOT", os.path.join("datasets", "iuq_copy_paste")))


def split_image_ids(image_ids, held_out=0.25, seed=0):
    """(training ids, held-out ids), each sorted: the sorted ids shuffled by ``seed``, the first
    ``round(held_out * n)`` (at least 1 and at most n - 1 when there are 2 or more) held out."""
    ids = sorted(set(image_ids))
    order = np.random.default_rng(seed).permutation(len(ids))
    k = int(round(held_out * len(ids)))
    if len(ids) >= 2:
        k = min(max(k, 1), len(ids) - 1)
    held = {ids[i] for i in order[:k]}
    return [i for i in ids if i not in held], sorted(held)


class _Source:
    """The source's images and instance masks, read on demand (a few hundred kept decoded)."""

    def __init__(self, coco, image_dir, cache=256):
        self.images = {im["id"]: im for im in coco["images"]}
        self.image_dir = image_dir
        self.by_image = {}
        for a in coco["annotations"]:
            self.by_image.setdefault(a["image_id"], []).append(a)
        self._pixels, self._cache = OrderedDict(), cache

    def pixels(self, image_id):
        if image_id in self._pixels:
            self._pixels.move_to_end(image_id)
            return self._pixels[image_id]
        from PIL import Image, ImageOps

        with Image.open(os.path.join(self.image_dir, self.images[image_id]["file_name"])) as im:
            arr = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        self._pixels[image_id] = arr
        if len(self._pixels) > self._cache:
            self._pixels.popitem(last=False)
        return arr

    def mask(self, ann):
        from pycocotools import mask as mask_util

        im = self.images[ann["image_id"]]
        h, w = im["height"], im["width"]
        seg = ann["segmentation"]
        if isinstance(seg, list):
            rle = mask_util.merge(mask_util.frPyObjects(seg, h, w))
        elif isinstance(seg["counts"], list):
            rle = mask_util.frPyObjects(seg, h, w)
        else:
            rle = seg
        return mask_util.decode(rle).astype(bool)


def _resize(arr, size, resample):
    """``arr`` [h, w(, 3)] resized to ``size`` = (h', w') with PIL."""
    from PIL import Image

    if arr.dtype == bool:
        out = Image.fromarray(arr.astype(np.uint8) * 255).resize(size[::-1], resample)
        return np.asarray(out) >= 128
    return np.asarray(Image.fromarray(arr).resize(size[::-1], resample))


def _bilinear():
    from PIL import Image

    return Image.BILINEAR


def compose_scene(source, image_ids, pool, rng, options):
    """One scene: (image [H, W, 3] uint8, instances [dict(mask, category_id, source_image_id,
    source_annotation_id)], background image id). ``image_ids``: the part's images usable as
    backgrounds; ``pool``: the part's annotations that may be pasted."""
    H, W = options["image_size"]
    bilinear = _bilinear()
    bg_id = image_ids[rng.integers(len(image_ids))]
    bg = source.pixels(bg_id)
    h, w = bg.shape[:2]
    # The largest crop of the canvas's aspect, shrunk by r, at a random place.
    r = rng.uniform(*options["background_crop"])
    ch, cw = (h, h * W / H) if h * W / H <= w else (w * H / W, w)
    ch, cw = max(1, int(round(ch * r))), max(1, int(round(cw * r)))
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    canvas = _resize(np.ascontiguousarray(bg[y0:y0 + ch, x0:x0 + cw]), (H, W), bilinear).copy()
    objects = []
    if options["background_instances"]:
        for a in (a for a in source.by_image.get(bg_id, []) if a.get("segmentation")):
            m = _resize(np.ascontiguousarray(source.mask(a)[y0:y0 + ch, x0:x0 + cw]), (H, W), bilinear)
            if m.sum() >= options["min_area"]:
                objects.append(dict(mask=m, pasted_area=int(m.sum()), category_id=a["category_id"],
                                    source_image_id=a["image_id"], source_annotation_id=a["id"]))
    lo, hi = options["instances_per_scene"]
    for _ in range(int(rng.integers(lo, hi + 1)) if pool else 0):
        a = pool[rng.integers(len(pool))]
        src = source.pixels(a["image_id"])
        full = source.mask(a)
        ys, xs = np.nonzero(full)
        if len(ys) == 0:
            continue
        top, left, bottom, right = ys.min(), xs.min(), ys.max() + 1, xs.max() + 1
        patch, m = src[top:bottom, left:right], full[top:bottom, left:right]
        s = min(H / src.shape[0], W / src.shape[1]) * rng.uniform(*options["scale_range"])
        ph, pw = max(1, int(round(m.shape[0] * s))), max(1, int(round(m.shape[1] * s)))
        fit = min(1.0, H / ph, W / pw)
        ph, pw = min(H, max(1, int(ph * fit))), min(W, max(1, int(pw * fit)))
        patch, m = _resize(np.ascontiguousarray(patch), (ph, pw), bilinear), _resize(np.ascontiguousarray(m), (ph, pw), bilinear)
        if rng.random() < 0.5:
            patch, m = patch[:, ::-1], m[:, ::-1]
        y, x = int(rng.integers(0, H - ph + 1)), int(rng.integers(0, W - pw + 1))
        placed = np.zeros((H, W), dtype=bool)
        placed[y:y + ph, x:x + pw] = m
        area = int(placed.sum())
        if area < options["min_area"]:
            continue
        canvas[y:y + ph, x:x + pw][m] = patch[m]
        for o in objects:  # the new instance occludes every earlier one
            o["mask"] &= ~placed
        objects.append(dict(mask=placed, pasted_area=area, category_id=a["category_id"],
                            source_image_id=a["image_id"], source_annotation_id=a["id"]))
    kept = [o for o in objects
            if o["mask"].sum() >= options["min_area"] and o["mask"].sum() >= options["min_visible"] * o["pasted_area"]]
    return canvas, kept, bg_id


def _encode(mask, mask_format):
    """(segmentation, bbox [x, y, w, h], area) of a bool mask, by pycocotools, or None when the
    written mask is empty (a polygon format may lose a sliver)."""
    from pycocotools import mask as mask_util

    h, w = mask.shape
    if mask_format == "rle":
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        segmentation = {"size": [int(h), int(w)], "counts": rle["counts"].decode("ascii")}
    elif mask_format == "polygon":
        import cv2

        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        segmentation = [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]
        if not segmentation:
            return None
        rle = mask_util.merge(mask_util.frPyObjects(segmentation, h, w))
    else:
        raise ValueError(f"mask_format must be 'rle' or 'polygon', got {mask_format!r}")
    area = float(mask_util.area(rle))
    if area == 0:
        return None
    return segmentation, [float(v) for v in mask_util.toBbox(rle)], area


def _options(overrides):
    unknown = set(overrides) - set(COPY_PASTE_DEFAULTS)
    if unknown:
        raise ValueError(f"Unknown copy-paste options {sorted(unknown)}; known: {sorted(COPY_PASTE_DEFAULTS)}")
    options = {**COPY_PASTE_DEFAULTS, **overrides}
    for key in ("image_size", "instances_per_scene", "scale_range", "background_crop"):
        options[key] = tuple(options[key])
    return options


def make_copy_paste(coco, image_dir, split, num_scenes, out_dir, **overrides):
    """Compose ``num_scenes`` scenes of ``split`` ("train": from the training part, "val": from
    the held-out part) of the COCO instances dict ``coco`` (images in ``image_dir``), write the
    JPEGs under ``out_dir/<split>/`` and return the COCO instances dict (not written)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    options = _options(overrides)
    source = _Source(coco, image_dir)
    train_ids, held_ids = split_image_ids(source.images, options["held_out"], options["seed"])
    part = train_ids if split == "train" else held_ids
    in_part = set(part)
    crowded = {a["image_id"] for a in coco["annotations"] if a.get("iscrowd", 0)}
    backgrounds = [i for i in part if i not in crowded]
    pool = [a for a in coco["annotations"]
            if a["image_id"] in in_part and not a.get("iscrowd", 0) and a.get("area", 0) >= options["min_source_area"]
            and a.get("segmentation")]
    if not backgrounds:
        raise ValueError(f"copy-paste {split}: no image of its part ({len(part)} images) can be a background")
    from PIL import Image

    folder = os.path.join(out_dir, split)
    os.makedirs(folder, exist_ok=True)
    images, annotations = [], []
    split_index = SPLITS.index(split)
    for k in range(num_scenes):
        rng = np.random.default_rng([options["seed"], split_index, k])
        canvas, objects, bg_id = compose_scene(source, backgrounds, pool, rng, options)
        file_name = f"{k:06d}.jpg"
        path = os.path.join(folder, file_name)
        _atomic_write(path, lambda f, c=canvas: Image.fromarray(c).save(f, format="JPEG",
                                                                        quality=options["jpeg_quality"]), ".jpg")
        image_id = k + 1
        sources = set()
        for o in objects:
            encoded = _encode(o["mask"], options["mask_format"])
            if encoded is None:
                continue
            segmentation, bbox, area = encoded
            sources.add(o["source_image_id"])
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": o["category_id"],
                "segmentation": segmentation, "bbox": bbox, "area": area, "iscrowd": 0,
                "source_image_id": o["source_image_id"], "source_annotation_id": o["source_annotation_id"],
            })
        images.append({"id": image_id, "file_name": file_name, "height": options["image_size"][0],
                       "width": options["image_size"][1], "background_image_id": bg_id,
                       "source_image_ids": sorted(sources)})
    info = {"description": f"IUQ copy-paste scenes ({split}) from a COCO-format source",
            "iuq_copy_paste": {"split": split, "part_image_ids": part, "train_image_ids": train_ids,
                               "held_out_image_ids": held_ids, "options": {k: list(v) if isinstance(v, tuple) else v
                                                                            for k, v in options.items()}}}
    return {"info": info, "images": images, "annotations": annotations, "categories": coco["categories"]}


def generate_copy_paste_split(split, num_scenes, root=None, coco_json=None, image_dir=None, **overrides):
    """Write ``root/<split>_<N>/`` (JPEGs under ``<split>/``, the json ``<split>.json``) unless the
    same set (same source, options, generator version) is there. Returns (json_file, image_root)."""
    default_json, default_dir = default_lvis_sample_source()
    coco_json = os.path.abspath(coco_json or default_json)
    image_dir = os.path.abspath(image_dir or default_dir)
    if not os.path.isfile(coco_json):
        raise FileNotFoundError(
            f"The copy-paste testbed is made from a COCO instances json, and {coco_json} does not exist: set "
            "DETECTRON2_DATASETS to the folder holding coco/ (coco/annotations/instances_val2017.json, "
            "coco/val2017/), or use tools/make_copy_paste.py --json --images")
    options = _options(overrides)
    source = os.stat(coco_json)
    stamp = json.loads(json.dumps({
        "source": coco_json, "source_size": source.st_size, "source_mtime_ns": source.st_mtime_ns,
        "image_dir": image_dir, "num_scenes": num_scenes, "options": sorted(options.items()),
        "version": GENERATOR_VERSION}))
    digest = hashlib.sha1(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:8]
    out_dir = os.path.join(root or default_copy_paste_root(), f"{split}_{num_scenes}_{digest}")
    json_file = os.path.join(out_dir, f"{split}.json")
    if _stamp_of(json_file) == stamp:
        return json_file, os.path.join(out_dir, split)
    logger.info(f"Composing {num_scenes} copy-paste {split} scenes from {coco_json} into {out_dir} ...")
    with open(coco_json) as f:
        coco = json.load(f)
    data = make_copy_paste(coco, image_dir, split, num_scenes, out_dir, **overrides)
    data["info"]["iuq_stamp"] = stamp
    payload = json.dumps(data, separators=(",", ":")).encode("utf-8")
    _atomic_write(json_file, lambda f: f.write(payload), ".json")
    return json_file, os.path.join(out_dir, split)


def objects_json(json_file):
    """The class-agnostic twin of a COCO instances json, written beside it once
    (``<name>_objects.json``): the same images and annotations, every ``category_id`` 1, the one
    category ``object``; each annotation keeps its category as ``source_category_id``. Rewritten
    when ``json_file`` changed since. Returns its path."""
    out = os.path.splitext(json_file)[0] + "_objects.json"
    source = os.stat(json_file)
    stamp = {"source": os.path.abspath(json_file), "source_size": source.st_size,
             "source_mtime_ns": source.st_mtime_ns}
    if _stamp_of(out) == stamp:
        return out
    with open(json_file) as f:
        data = json.load(f)
    data["annotations"] = [{**a, "category_id": OBJECT_CATEGORY["id"], "source_category_id": a["category_id"]}
                           for a in data["annotations"]]
    data["categories"] = [dict(OBJECT_CATEGORY)]
    data["info"] = {**data.get("info", {}), "iuq_stamp": stamp}
    payload = json.dumps(data, separators=(",", ":")).encode("utf-8")
    _atomic_write(out, lambda f: f.write(payload), ".json")
    return out


def is_copy_paste_dataset(name):
    """Whether ``name`` is ``iuq_copy_paste[_objects]_train`` / ``_val``, optionally with ``_N``
    scenes."""
    return bool(_NAME.match(name))


def register_copy_paste(names=None, root=None, coco_json=None, image_dir=None, **overrides):
    """Build (if needed) and register the copy-paste datasets ``names`` with detectron2's
    ``register_coco_instances``. Re-registering the same files is a no-op. Returns the names."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    names = list(names) if names is not None else ["iuq_copy_paste_train", "iuq_copy_paste_val"]
    for name in names:
        m = _NAME.match(name)
        if not m:
            raise ValueError(f"{name!r} is not a copy-paste dataset (iuq_copy_paste[_objects]_train[_N], "
                             "iuq_copy_paste[_objects]_val[_N])")
        objects, split = bool(m.group(1)), m.group(2)
        n = int(m.group(3)) if m.group(3) else DEFAULT_SCENES[split]
        json_file, image_root = generate_copy_paste_split(split, n, root, coco_json, image_dir, **overrides)
        if objects:
            json_file = objects_json(json_file)
        if name in DatasetCatalog.list():
            if MetadataCatalog.get(name).get("json_file") == json_file:
                continue
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(name, {}, json_file, image_root)
    return names
