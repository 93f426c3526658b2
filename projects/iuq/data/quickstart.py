"""A small synthetic instance-segmentation dataset the project generates itself.

It lets ``configs/quickstart.yaml`` train and evaluate on a laptop CPU with nothing downloaded.
Every image holds 2-6 *similar* instances: filled circles/ellipses, squares and triangles
(3 classes) of nearly the same colour, some touching or overlapping one another, on a noisy
textured background. Instances of one class look alike, so a query can only single out "its"
instance by where it is -- the situation instance-unique querying is about.

Layout under the root (``default_quickstart_root()``)::

    train/000000.png ...                   RGB PNG images (lossless: pixels are exactly as drawn)
    val/000000.png ...
    annotations/quickstart_train.json      COCO instances json: polygons, bbox, area, iscrowd 0
    annotations/quickstart_val.json

Masks are exact: each visible region is written as a union of convex polygons, and the image is
painted with pycocotools' own rasterisation of exactly those (rounded) coordinates, so
``annToMask`` of an annotation gives precisely the pixels drawn for that instance. Polygons
(not RLE) keep the dataset usable with detectron2's default ``INPUT.MASK_FORMAT: polygon``
as well as with ``bitmask``.
"""
import json
import logging
import os
import re
import tempfile

import numpy as np

__all__ = [
    "QUICKSTART_CATEGORIES",
    "QUICKSTART_DATASETS",
    "is_quickstart_dataset",
    "default_quickstart_root",
    "render_quickstart_image",
    "generate_quickstart",
    "register_quickstart",
]

logger = logging.getLogger(__name__)

# Bump when the rendering changes, so cached copies are regenerated.
GENERATOR_VERSION = 1

# COCO-style category ids start at 1; detectron2 maps them to contiguous 0..2.
QUICKSTART_CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]
# name -> split
QUICKSTART_DATASETS = {"iuq_quickstart_train": "train", "iuq_quickstart_val": "val"}
DEFAULT_SPLIT_SIZES = {"train": 64, "val": 16}
# Other sizes by name: iuq_quickstart_train_256, iuq_quickstart_val_128, ... (N images; image k
# is the same image in every size, so a larger split extends a smaller one).
_SIZED_NAME = re.compile(r"^iuq_quickstart_(train|val)_([1-9][0-9]*)$")

# Val ids are offset so that no val image shares an id with a train image (IUQ's memory keys
# its samples by image id).
_IMAGE_ID_OFFSET = {"train": 1, "val": 100001}
_SPLIT_STREAM = {"train": 0, "val": 1}  # separate random streams per split

_MIN_VISIBLE_PIXELS = 60  # an occluded instance keeps at least this many pixels ...
_MIN_VISIBLE_FRACTION = 0.35  # ... and this fraction of its full area


def default_quickstart_root():
    """``$IUQ_QUICKSTART_ROOT``, else ``./datasets/iuq_quickstart`` (detectron2's ``datasets/``
    convention). Not under ``$DETECTRON2_DATASETS``: that often points at a shared, read-only
    copy of COCO / LVIS."""
    return os.path.expanduser(os.environ.get("IUQ_QUICKSTART_ROOT", os.path.join("datasets", "iuq_quickstart")))


# ---------------------------------------------------------------------------------------------
# Geometry: convex polygons as [K, 2] float arrays of (x, y), counter-clockwise in image axes.
# ---------------------------------------------------------------------------------------------


def _signed_area(poly):
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _orient(poly):
    return poly if _signed_area(poly) > 0 else poly[::-1].copy()


def _clip(poly, a, b, keep_left):
    """Sutherland-Hodgman: the part of convex ``poly`` on one side of the line a->b."""
    if len(poly) == 0:
        return poly
    d = b - a
    side = d[0] * (poly[:, 1] - a[1]) - d[1] * (poly[:, 0] - a[0])
    if not keep_left:
        side = -side
    out = []
    for i in range(len(poly)):
        j = (i + 1) % len(poly)
        if side[i] >= 0:
            out.append(poly[i])
        if (side[i] >= 0) != (side[j] >= 0):
            t = side[i] / (side[i] - side[j])
            out.append(poly[i] + t * (poly[j] - poly[i]))
    return np.array(out).reshape(-1, 2)


def _subtract(pieces, cover):
    """Convex pieces minus the convex polygon ``cover``, as disjoint convex pieces.

    Peels ``cover``'s half-planes off one by one: what lies outside edge k (and inside edges
    0..k-1) is a convex piece of the difference; what remains inside all edges is the
    intersection, which is dropped.
    """
    out = []
    lo, hi = cover.min(axis=0), cover.max(axis=0)
    for piece in pieces:
        if (piece.max(axis=0) < lo).any() or (piece.min(axis=0) > hi).any():
            out.append(piece)  # bounding boxes apart: nothing to subtract
            continue
        rest = piece
        for k in range(len(cover)):
            a, b = cover[k], cover[(k + 1) % len(cover)]
            outside = _clip(rest, a, b, keep_left=False)
            if len(outside) >= 3 and abs(_signed_area(outside)) > 1e-6:
                out.append(outside)
            rest = _clip(rest, a, b, keep_left=True)
            if len(rest) < 3:
                break
    return out


def _random_shape(rng, category_id, center, radius):
    """Vertices of a filled shape of the given class around ``center`` (size ~ ``radius``)."""
    cx, cy = center
    theta = rng.uniform(0, 2 * np.pi)
    if category_id == 1:  # circle / ellipse: a 40-gon is round to the pixel at these sizes
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        rx, ry = radius, radius * rng.uniform(0.75, 1.0)
        x, y = rx * np.cos(t), ry * np.sin(t)
    elif category_id == 2:  # square, slightly rectangular at most
        half = radius / np.sqrt(2)
        hx, hy = half, half * rng.uniform(0.85, 1.0)
        x, y = np.array([-hx, hx, hx, -hx]), np.array([-hy, -hy, hy, hy])
    else:  # triangle, roughly equilateral
        t = np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.15, 0.15, 3)
        x, y = radius * np.cos(t), radius * np.sin(t)
    c, s = np.cos(theta), np.sin(theta)
    poly = np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)
    return _orient(poly)


# ---------------------------------------------------------------------------------------------
# Rasterisation, always with pycocotools on the rounded coordinates that go into the json.
# ---------------------------------------------------------------------------------------------


def _to_coco_polygons(pieces):
    """Pieces -> COCO polygon lists [[x0, y0, x1, y1, ...], ...], rounded to 2 decimals."""
    return [[round(float(v), 2) for v in piece.reshape(-1)] for piece in pieces]


def _rasterize(polygons, height, width):
    """Union of COCO polygons -> bool [H, W], exactly as ``COCO.annToMask`` decodes them."""
    from pycocotools import mask as mask_util

    if not polygons:
        return np.zeros((height, width), dtype=bool)
    rle = mask_util.merge(mask_util.frPyObjects(polygons, height, width))
    return mask_util.decode(rle).astype(bool)


def _visible_regions(shapes, height, width):
    """For shapes drawn in order (later on top): per shape, its visible COCO polygons and mask.

    Polygon pieces that rasterise to no pixel are dropped, so every kept polygon is meaningful
    and the union of the kept ones still rasterises to the same mask.
    """
    regions = []
    for i, shape in enumerate(shapes):
        pieces = [shape]
        for cover in shapes[i + 1:]:
            pieces = _subtract(pieces, cover)
        polygons, mask = [], np.zeros((height, width), dtype=bool)
        for poly in _to_coco_polygons(pieces):
            m = _rasterize([poly], height, width)
            if m.any():
                polygons.append(poly)
                mask |= m
        regions.append((polygons, mask))
    return regions


def _layout_ok(shapes, regions, height, width):
    """Every instance keeps enough visible pixels, and no pixel belongs to two instances (the
    rasterised boundaries of a clipped piece and of its cover can disagree by a pixel)."""
    total = np.zeros((height, width), dtype=np.int32)
    for shape, (_, mask) in zip(shapes, regions):
        full = _rasterize(_to_coco_polygons([shape]), height, width).sum()
        visible = mask.sum()
        if visible < max(_MIN_VISIBLE_PIXELS, _MIN_VISIBLE_FRACTION * full):
            return False
        total += mask
    return total.max() <= 1


# ---------------------------------------------------------------------------------------------
# Painting
# ---------------------------------------------------------------------------------------------


def _smooth_noise(rng, height, width, cells, amplitude):
    """Low-frequency texture: a coarse random grid, bilinearly upsampled. [H, W, 3] float."""
    gy, gx = cells
    grid = rng.uniform(-amplitude, amplitude, size=(gy + 1, gx + 1, 3))

    def upsample(values, n, axis):  # linear interpolation along one axis (separable)
        pos = np.linspace(0, values.shape[axis] - 1, n)
        i0 = np.minimum(pos.astype(int), values.shape[axis] - 2)
        f = pos - i0
        f = f[:, None, None] if axis == 0 else f[None, :, None]
        return np.take(values, i0, axis) * (1 - f) + np.take(values, i0 + 1, axis) * f

    return upsample(upsample(grid, width, axis=1), height, axis=0)


def render_quickstart_image(seed, split, index, image_size=(192, 256)):
    """Draw one image of the dataset, deterministically from ``(seed, split, index)``.

    Returns:
        image (np.ndarray): [H, W, 3] uint8, RGB.
        instances (list[dict]): in drawing order, each with ``category_id`` (1..3, see
            ``QUICKSTART_CATEGORIES``), ``segmentation`` (COCO polygons of the visible region)
            and ``mask`` (bool [H, W], the painted pixels; equal to the polygons' rasterisation).
    """
    height, width = image_size
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split], index])

    # Layout: place shapes one by one; about half are pushed against an earlier shape so that
    # they touch or overlap it. A placement that would hide too much of an earlier instance is
    # retried elsewhere.
    target = int(rng.integers(2, 7))
    shapes, categories, centers, radii, regions = [], [], [], [], []
    for _ in range(target):
        for _attempt in range(50):
            category_id = int(rng.integers(1, 4))
            radius = float(rng.uniform(12, 34))
            if centers and rng.random() < 0.5:
                j = int(rng.integers(len(centers)))
                phi = rng.uniform(0, 2 * np.pi)
                dist = (radius + radii[j]) * rng.uniform(0.55, 1.0)
                center = (centers[j][0] + dist * np.cos(phi), centers[j][1] + dist * np.sin(phi))
            else:
                center = (rng.uniform(0, width), rng.uniform(0, height))
            # Keep the whole shape in the image (the polygon lies within `radius` of its centre).
            center = (float(np.clip(center[0], radius + 1, width - radius - 1)),
                      float(np.clip(center[1], radius + 1, height - radius - 1)))
            shape = _random_shape(rng, category_id, center, radius)
            candidate = shapes + [shape]
            candidate_regions = _visible_regions(candidate, height, width)
            if _layout_ok(candidate, candidate_regions, height, width):
                shapes, regions = candidate, candidate_regions
                categories.append(category_id)
                centers.append(center)
                radii.append(radius)
                break

    # Colours: one base colour per image, every instance a small jitter of it (so colour does
    # not tell instances or classes apart); the background differs from it by a moderate offset.
    background_color = rng.uniform(50, 205, size=3)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction) + 1e-6
    base_color = np.clip(background_color + direction * rng.uniform(60, 90), 0, 255)

    image = background_color + _smooth_noise(rng, height, width, (6, 8), 35.0)
    image += _smooth_noise(rng, height, width, (24, 32), 12.0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    for (_, mask), center, radius in zip(regions, centers, radii):
        color = base_color + rng.normal(0, 10, size=3)
        # A gentle linear shading across the instance, so instances are not flat stickers.
        angle = rng.uniform(0, 2 * np.pi)
        shade = ((xx - center[0]) * np.cos(angle) + (yy - center[1]) * np.sin(angle)) / radius
        image[mask] = color + (12.0 * shade[mask])[:, None]
    image += rng.normal(0, 6, size=image.shape)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)

    instances = [
        {"category_id": c, "segmentation": polygons, "mask": mask}
        for c, (polygons, mask) in zip(categories, regions)
    ]
    return image, instances


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _atomic_write(path, write_fn, suffix):
    """Write via a temp file in the same directory, then rename: concurrent ranks generating the
    same (identical) files never expose a half-written one."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _split_info(seed, split, num_images, image_size):
    # No timestamps: the json must be byte-identical for the same arguments.
    return {
        "description": "IUQ quickstart: synthetic similar shapes (circle, square, triangle)",
        "generator": "iuq.data.quickstart",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "split": split,
        "num_images": num_images,
        "image_size": list(image_size),
    }


def _is_current(json_file, info, image_dir):
    try:
        with open(json_file) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    if data.get("info") != info:
        return False
    return all(os.path.isfile(os.path.join(image_dir, im["file_name"])) for im in data["images"])


def _generate_split(root, seed, split, num_images, image_size, tag=None):
    from PIL import Image
    from pycocotools import mask as mask_util

    tag = tag or split
    image_dir = os.path.join(root, tag)
    json_file = os.path.join(root, "annotations", f"quickstart_{tag}.json")
    info = _split_info(seed, split, num_images, image_size)
    if _is_current(json_file, info, image_dir):
        return json_file, image_dir

    logger.info(f"Generating the IUQ quickstart {split} split ({num_images} images) in {root} ...")
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.dirname(json_file), exist_ok=True)
    height, width = image_size
    images, annotations = [], []
    for index in range(num_images):
        image, instances = render_quickstart_image(seed, split, index, image_size)
        image_id = _IMAGE_ID_OFFSET[split] + index
        file_name = f"{index:06d}.png"
        _atomic_write(os.path.join(image_dir, file_name),
                      lambda f: Image.fromarray(image).save(f, format="PNG"), ".png")
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for inst in instances:
            rle = mask_util.encode(np.asfortranarray(inst["mask"].astype(np.uint8)))
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": inst["category_id"],
                "segmentation": inst["segmentation"],
                # Pixel count and tight box of the exact mask, [x, y, w, h] in pixel edges.
                "area": int(mask_util.area(rle)),
                "bbox": [float(v) for v in mask_util.toBbox(rle)],
                "iscrowd": 0,
            })
    data = {"info": info, "images": images, "annotations": annotations,
            "categories": QUICKSTART_CATEGORIES}
    # The json is written last: its presence (with matching info) marks a complete split.
    payload = json.dumps(data, separators=(",", ":")).encode("utf-8")
    _atomic_write(json_file, lambda f: f.write(payload), ".json")
    return json_file, image_dir


def generate_quickstart(root=None, seed=0, num_train=64, num_val=16, image_size=(192, 256)):
    """Generate the dataset under ``root`` unless an identical copy is already there.

    Idempotent: a split is skipped when its json carries the same generator version, seed, size
    and image count and all its images exist. Safe when several ranks call it at once (every
    file is written to a temp name, then renamed).

    Args:
        root (str or None): target directory; None -> ``default_quickstart_root()``.
        seed (int): everything is a deterministic function of the seed.
        image_size (tuple[int, int]): (height, width).

    Returns:
        dict: split ("train" / "val") -> (json_file, image_root).
    """
    root = root or default_quickstart_root()
    image_size = (int(image_size[0]), int(image_size[1]))
    counts = {"train": num_train, "val": num_val}
    return {split: _generate_split(root, seed, split, n, image_size) for split, n in counts.items()}


def is_quickstart_dataset(name):
    """Whether ``name`` is a quickstart split: ``iuq_quickstart_{train,val}`` (the default sizes,
    64 / 16 images) or ``iuq_quickstart_{train,val}_N`` (N images)."""
    return name in QUICKSTART_DATASETS or _SIZED_NAME.match(name) is not None


def _split_of(name):
    """(split, number of images, tag of its files) of a quickstart dataset name."""
    if name in QUICKSTART_DATASETS:
        split = QUICKSTART_DATASETS[name]
        return split, DEFAULT_SPLIT_SIZES[split], split
    match = _SIZED_NAME.match(name)
    if match is None:
        raise ValueError(f"{name!r} is not a quickstart dataset (iuq_quickstart_train, iuq_quickstart_val, "
                         "or iuq_quickstart_train_N / iuq_quickstart_val_N for N images)")
    split, n = match.group(1), int(match.group(2))
    return split, n, f"{split}_{n}"


def register_quickstart(root=None, names=None, seed=0):
    """Generate (if needed) and register quickstart datasets: ``iuq_quickstart_train`` /
    ``iuq_quickstart_val`` by default, or the given ``names`` (sized ones included, see
    :func:`is_quickstart_dataset`).

    Registered with detectron2's ``register_coco_instances``, so ``COCOEvaluator`` works on the
    val splits. Calling it again with the same root is a no-op; with another root, the names
    are re-registered to point there.

    Returns:
        list[str]: the registered dataset names.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    root = root or default_quickstart_root()
    names = list(names) if names is not None else list(QUICKSTART_DATASETS)
    metadata = {
        "thing_classes": [c["name"] for c in QUICKSTART_CATEGORIES],
        # Set here (load_coco_json would set the same on first load) so evaluators and
        # visualisers see it before the dataset is ever loaded.
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(QUICKSTART_CATEGORIES)},
    }
    for name in names:
        split, num_images, tag = _split_of(name)
        json_file, image_root = _generate_split(root, seed, split, num_images, (192, 256), tag=tag)
        if name in DatasetCatalog.list():
            if MetadataCatalog.get(name).get("json_file") == json_file:
                continue
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(name, metadata, json_file, image_root)
    return names
