"""Small synthetic instance-segmentation datasets the project generates itself, from one generator
with two appearance models.

They let ``configs/quickstart.yaml`` and the study (``docs/study.md``) train and evaluate on a
laptop CPU with nothing downloaded. Geometry, rasterisation, files and registration are shared;
only the painter differs (``appearance``):

- ``"lookalike"`` -- the quickstart (``iuq_quickstart_*``, 192x256): every image holds 2-6
  *similar* instances, filled circles/ellipses, squares and triangles (3 classes) of nearly the
  same colour (one base colour per image, jittered), some touching or overlapping one another, on
  a noisy textured background. Instances of one class look alike, so a query can only single out
  "its" instance by where it is. Across images, the only cue that tells a query's own instance
  from a look-alike at the same place in another image is that per-image colour: Eq. 5's premise
  fails by construction (docs/study.md, "The testbeds").
- ``"per_instance"`` -- the textures testbed (``iuq_textures_*``, 128x160, thousands of images):
  4 classes (+ a thin rhombus, "diamond"), 2-7 instances, each painted with its *own* colour pair
  and procedural texture (stripes, checks, blobs, gradient; random scale and orientation) drawn
  independently of the image, some same-class instances touching or overlapping, on a cluttered
  background (smooth noise, a low-contrast background texture, distractor lines, rings and dots
  that are not instances). An instance at the same place in another image is a different-looking
  instance: the premise of Eq. 5 holds, as on COCO.

Layout under the root (``default_quickstart_root()``)::

    train/000000.png ...                   RGB PNG images (lossless: pixels are exactly as drawn)
    val/000000.png ...
    annotations/quickstart_train.json      COCO instances json: polygons, bbox, area, iscrowd 0
    annotations/quickstart_val.json
    textures/{train,val}[_N]/ ...          the textures testbed, same layout
    textures/annotations/textures_{train,val}[_N].json

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
    "APPEARANCES",
    "QUICKSTART_CATEGORIES",
    "QUICKSTART_DATASETS",
    "TEXTURES_CATEGORIES",
    "TEXTURES_DATASETS",
    "is_quickstart_dataset",
    "is_textures_dataset",
    "default_quickstart_root",
    "render_quickstart_image",
    "generate_quickstart",
    "generate_textures",
    "register_quickstart",
    "register_textures",
]

logger = logging.getLogger(__name__)

# Bump when the rendering changes, so cached copies are regenerated (the look-alike quickstart's;
# the textures testbed has its own, so changing one never regenerates the other).
GENERATOR_VERSION = 1
TEXTURES_VERSION = 1
APPEARANCES = ("lookalike", "per_instance")

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

# The textures testbed (appearance "per_instance"): a 4th class, its own names, sizes and ids.
TEXTURES_CATEGORIES = QUICKSTART_CATEGORIES + [{"id": 4, "name": "diamond", "supercategory": "shape"}]
TEXTURES_DATASETS = {"iuq_textures_train": "train", "iuq_textures_val": "val"}

# Per appearance: dataset names, file names, sizes, image ids (disjoint between splits and from
# the other appearance's), layout parameters.
_FAMILIES = {
    "lookalike": {
        "prefix": "iuq_quickstart", "files": "quickstart", "subdir": "", "image_size": (192, 256),
        "sizes": DEFAULT_SPLIT_SIZES, "id_offset": _IMAGE_ID_OFFSET, "categories": QUICKSTART_CATEGORIES,
        "version": GENERATOR_VERSION, "datasets": QUICKSTART_DATASETS, "sized": _SIZED_NAME,
        "description": "IUQ quickstart: synthetic similar shapes (circle, square, triangle)",
    },
    "per_instance": {
        "prefix": "iuq_textures", "files": "textures", "subdir": "textures", "image_size": (128, 160),
        "sizes": {"train": 4000, "val": 256}, "id_offset": {"train": 1000001, "val": 2000001},
        "categories": TEXTURES_CATEGORIES, "version": TEXTURES_VERSION, "datasets": TEXTURES_DATASETS,
        "sized": re.compile(r"^iuq_textures_(train|val)_([1-9][0-9]*)$"),
        "description": "IUQ textures testbed: shapes (circle, square, triangle, diamond) with per-instance "
                       "colour and texture on cluttered backgrounds",
    },
}
# Layout per appearance at its image size: instances per image [lo, hi), radius range, classes, the
# probability that a shape pushed against an earlier one takes that one's class (0: not drawn).
_LAYOUT = {"lookalike": ((2, 7), (12, 34), 3, 0.0), "per_instance": ((2, 8), (9, 24), 4, 0.5)}

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
    # Fast paths (the layout loop's hot spot: a 40-gon cover means 40 clips per piece), giving
    # exactly what the loop below would: all vertices kept, or none.
    if (side >= 0).all():
        return poly
    if (side < 0).all():
        return poly[:0]
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
    elif category_id == 3:  # triangle, roughly equilateral
        t = np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.15, 0.15, 3)
        x, y = radius * np.cos(t), radius * np.sin(t)
    else:  # diamond: a thin rhombus (textures testbed only)
        minor = radius * rng.uniform(0.4, 0.55)
        x, y = np.array([radius, 0.0, -radius, 0.0]), np.array([0.0, minor, 0.0, -minor])
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


def _region(pieces, height, width):
    """Convex pieces -> (COCO polygons, mask): pieces that rasterise to no pixel are dropped, so
    every kept polygon is meaningful and the union of the kept ones still rasterises to the same
    mask."""
    polygons, mask = [], np.zeros((height, width), dtype=bool)
    for poly in _to_coco_polygons(pieces):
        m = _rasterize([poly], height, width)
        if m.any():
            polygons.append(poly)
            mask |= m
    return polygons, mask


def _visible_regions(shapes, height, width):
    """For shapes drawn in order (later on top): per shape, its visible COCO polygons and mask."""
    regions = []
    for i, shape in enumerate(shapes):
        pieces = [shape]
        for cover in shapes[i + 1:]:
            pieces = _subtract(pieces, cover)
        regions.append(_region(pieces, height, width))
    return regions


def _layout_ok(full_areas, regions, height, width):
    """Every instance keeps enough visible pixels (``full_areas``: each shape's unoccluded pixel
    count), and no pixel belongs to two instances (the rasterised boundaries of a clipped piece
    and of its cover can disagree by a pixel)."""
    total = np.zeros((height, width), dtype=np.int32)
    for full, (_, mask) in zip(full_areas, regions):
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


def _layout(rng, height, width, appearance):
    """Place shapes one by one; about half are pushed against an earlier shape so that they touch
    or overlap it. A placement that would hide too much of an earlier instance is retried
    elsewhere. Returns (categories, centers, radii, regions), regions as ``_visible_regions``."""
    counts, radius_range, num_classes, same_class = _LAYOUT[appearance]
    target = int(rng.integers(*counts))
    pieces, categories, centers, radii, regions, full_areas = [], [], [], [], [], []
    for _ in range(target):
        for _attempt in range(50):
            category_id = int(rng.integers(1, num_classes + 1))
            radius = float(rng.uniform(*radius_range))
            if centers and rng.random() < 0.5:
                j = int(rng.integers(len(centers)))
                phi = rng.uniform(0, 2 * np.pi)
                dist = (radius + radii[j]) * rng.uniform(0.55, 1.0)
                center = (centers[j][0] + dist * np.cos(phi), centers[j][1] + dist * np.sin(phi))
                if same_class and rng.random() < same_class:  # same-class neighbours, touching
                    category_id = categories[j]
            else:
                center = (rng.uniform(0, width), rng.uniform(0, height))
            # Keep the whole shape in the image (the polygon lies within `radius` of its centre).
            center = (float(np.clip(center[0], radius + 1, width - radius - 1)),
                      float(np.clip(center[1], radius + 1, height - radius - 1)))
            shape = _random_shape(rng, category_id, center, radius)
            # Incrementally what _visible_regions(shapes + [shape]) gives: each earlier shape's
            # visible pieces minus the new shape (the same operations in the same order), its
            # region re-rasterised only where the new shape overlaps it.
            candidate_pieces = [_subtract(p, shape) for p in pieces] + [[shape]]
            candidate_regions = [
                region if len(new) == len(old) and all(a is b for a, b in zip(new, old))
                else _region(new, height, width)
                for new, old, region in zip(candidate_pieces, pieces, regions)
            ] + [_region([shape], height, width)]
            candidate_areas = full_areas + [int(candidate_regions[-1][1].sum())]
            if _layout_ok(candidate_areas, candidate_regions, height, width):
                pieces, regions, full_areas = candidate_pieces, candidate_regions, candidate_areas
                categories.append(category_id)
                centers.append(center)
                radii.append(radius)
                break
    return categories, centers, radii, regions


def _paint_lookalike(rng, height, width, regions, centers, radii):
    """One base colour per image, every instance a small jitter of it (so colour does not tell
    instances or classes apart); the background differs from it by a moderate offset."""
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
    return image


_TEXTURES = ("stripes", "checks", "blobs", "gradient")


def _pattern(rng, kind, xx, yy, center, radius):
    """A procedural pattern in [0, 1] at the points (xx, yy): ``kind`` from ``_TEXTURES``, at a
    random scale and orientation around ``center`` (``radius``: the scale of the thing painted)."""
    angle = rng.uniform(0, np.pi)
    u = (xx - center[0]) * np.cos(angle) + (yy - center[1]) * np.sin(angle)
    v = -(xx - center[0]) * np.sin(angle) + (yy - center[1]) * np.cos(angle)
    if kind == "stripes":
        period = rng.uniform(3.0, 12.0)
        return (np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi)) > 0).astype(np.float64)
    if kind == "checks":
        size = rng.uniform(2.5, 8.0)
        return ((np.floor(u / size) + np.floor(v / size)) % 2).astype(np.float64)
    if kind == "blobs":
        field = np.zeros_like(u)
        for _ in range(int(rng.integers(3, 7))):
            bx, by = rng.uniform(-radius, radius, size=2)
            sigma = radius * rng.uniform(0.15, 0.4)
            field += np.exp(-((u - bx) ** 2 + (v - by) ** 2) / (2 * sigma ** 2))
        return np.clip(field, 0.0, 1.0)
    span = radius * rng.uniform(0.8, 2.0)  # gradient
    return np.clip(0.5 + u / span, 0.0, 1.0)


def _distinct_color(rng, avoid, min_distance, low=0, high=255):
    """A uniform random RGB colour at least ``min_distance`` from ``avoid`` (20 tries)."""
    for _ in range(20):
        color = rng.uniform(low, high, size=3)
        if np.linalg.norm(color - avoid) >= min_distance:
            break
    return color


def _paint_per_instance(rng, height, width, regions, centers, radii):
    """Every instance its own colour pair and texture, drawn independently of the image (only kept
    apart from the background colour); a cluttered background with distractors that are not
    instances: thin line segments, rings (outlines) and dots."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    background_color = rng.uniform(40, 215, size=3)
    image = background_color + _smooth_noise(rng, height, width, (4, 5), 35.0)
    image += _smooth_noise(rng, height, width, (16, 20), 12.0)
    # A low-contrast texture over the whole background, in a colour direction of its own.
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction) + 1e-6
    kind = _TEXTURES[int(rng.integers(len(_TEXTURES)))]
    pattern = _pattern(rng, kind, xx, yy, (width / 2, height / 2), max(height, width) / 4)
    image += (pattern - 0.5)[..., None] * (rng.uniform(15, 35) * direction)
    for _ in range(int(rng.integers(3, 10))):  # distractors
        color = rng.uniform(0, 255, size=3)
        which = rng.random()
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        if which < 0.45:  # a line segment
            phi, length = rng.uniform(0, np.pi), rng.uniform(10, 60)
            dx, dy = np.cos(phi), np.sin(phi)
            t = np.clip((xx - cx) * dx + (yy - cy) * dy, -length / 2, length / 2)
            hit = np.hypot(xx - cx - t * dx, yy - cy - t * dy) <= rng.uniform(0.6, 1.5)
        elif which < 0.8:  # a ring: a circle's outline, not a filled circle
            r = np.hypot(xx - cx, yy - cy)
            hit = np.abs(r - rng.uniform(4, 18)) <= rng.uniform(0.6, 1.5)
        else:  # a few dots
            hit = np.zeros((height, width), dtype=bool)
            for _dot in range(int(rng.integers(3, 8))):
                px, py = cx + rng.normal(0, 10), cy + rng.normal(0, 10)
                hit |= np.hypot(xx - px, yy - py) <= rng.uniform(1.0, 2.5)
        image[hit] = color
    for (_, mask), center, radius in zip(regions, centers, radii):
        color_a = _distinct_color(rng, background_color, 80.0)
        color_b = _distinct_color(rng, color_a, 60.0)
        kind = _TEXTURES[int(rng.integers(len(_TEXTURES)))]
        t = _pattern(rng, kind, xx[mask], yy[mask], center, radius)[:, None]
        image[mask] = color_a * (1 - t) + color_b * t
    return image


def render_quickstart_image(seed, split, index, image_size=(192, 256), appearance="lookalike"):
    """Draw one image of the dataset, deterministically from ``(seed, split, index)``.

    ``appearance``: ``"lookalike"`` (the quickstart: one jittered colour per image) or
    ``"per_instance"`` (the textures testbed: colour and texture drawn per instance, 4 classes,
    cluttered background; another random stream, so its layouts are not the quickstart's).

    Returns:
        image (np.ndarray): [H, W, 3] uint8, RGB.
        instances (list[dict]): in drawing order, each with ``category_id`` (1..3, see
            ``QUICKSTART_CATEGORIES``; 1..4 per instance, ``TEXTURES_CATEGORIES``),
            ``segmentation`` (COCO polygons of the visible region) and ``mask`` (bool [H, W], the
            painted pixels; equal to the polygons' rasterisation).
    """
    if appearance not in APPEARANCES:
        raise ValueError(f"appearance {appearance!r}: expected one of {APPEARANCES}")
    height, width = image_size
    stream = [seed, _SPLIT_STREAM[split], index] + ([] if appearance == "lookalike" else [11])
    rng = np.random.default_rng(stream)
    categories, centers, radii, regions = _layout(rng, height, width, appearance)
    paint = _paint_lookalike if appearance == "lookalike" else _paint_per_instance
    image = paint(rng, height, width, regions, centers, radii)
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


def _split_info(seed, split, num_images, image_size, appearance="lookalike"):
    # No timestamps: the json must be byte-identical for the same arguments.
    family = _FAMILIES[appearance]
    info = {
        "description": family["description"],
        "generator": "iuq.data.quickstart",
        "version": family["version"],
        "seed": seed,
        "split": split,
        "num_images": num_images,
        "image_size": list(image_size),
    }
    if appearance != "lookalike":  # the quickstart's info (hence its json bytes) as before
        info["appearance"] = appearance
    return info


def _is_current(json_file, info, image_dir):
    try:
        with open(json_file) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    if data.get("info") != info:
        return False
    return all(os.path.isfile(os.path.join(image_dir, im["file_name"])) for im in data["images"])


def _generate_split(root, seed, split, num_images, image_size, tag=None, appearance="lookalike"):
    from PIL import Image
    from pycocotools import mask as mask_util

    family = _FAMILIES[appearance]
    tag = tag or split
    base = os.path.join(root, family["subdir"]) if family["subdir"] else root
    image_dir = os.path.join(base, tag)
    json_file = os.path.join(base, "annotations", f"{family['files']}_{tag}.json")
    info = _split_info(seed, split, num_images, image_size, appearance)
    if _is_current(json_file, info, image_dir):
        return json_file, image_dir

    what = "quickstart" if appearance == "lookalike" else "textures testbed"
    logger.info(f"Generating the IUQ {what} {split} split ({num_images} images) in {base} ...")
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.dirname(json_file), exist_ok=True)
    height, width = image_size
    images, annotations = [], []
    for index in range(num_images):
        image, instances = render_quickstart_image(seed, split, index, image_size, appearance)
        image_id = family["id_offset"][split] + index
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
            "categories": family["categories"]}
    # The json is written last: its presence (with matching info) marks a complete split.
    payload = json.dumps(data, separators=(",", ":")).encode("utf-8")
    _atomic_write(json_file, lambda f: f.write(payload), ".json")
    return json_file, image_dir


def generate_quickstart(root=None, seed=0, num_train=64, num_val=16, image_size=(192, 256), appearance="lookalike"):
    """Generate the dataset under ``root`` unless an identical copy is already there.

    Idempotent: a split is skipped when its json carries the same generator version, seed, size
    and image count and all its images exist. Safe when several ranks call it at once (every
    file is written to a temp name, then renamed).

    Args:
        root (str or None): target directory; None -> ``default_quickstart_root()``.
        seed (int): everything is a deterministic function of the seed.
        image_size (tuple[int, int]): (height, width).
        appearance (str): ``"lookalike"`` (the quickstart) or ``"per_instance"`` (the textures
            testbed, under ``root/textures``; :func:`generate_textures` has its defaults).

    Returns:
        dict: split ("train" / "val") -> (json_file, image_root).
    """
    root = root or default_quickstart_root()
    image_size = (int(image_size[0]), int(image_size[1]))
    counts = {"train": num_train, "val": num_val}
    return {split: _generate_split(root, seed, split, n, image_size, appearance=appearance)
            for split, n in counts.items()}


def generate_textures(root=None, seed=0, num_train=4000, num_val=256, image_size=(128, 160)):
    """The textures testbed (appearance ``"per_instance"``) under ``root/textures``: see
    :func:`generate_quickstart`."""
    return generate_quickstart(root, seed, num_train, num_val, image_size, appearance="per_instance")


def _family_of(name):
    for appearance, family in _FAMILIES.items():
        if name in family["datasets"] or family["sized"].match(name) is not None:
            return appearance
    return None


def is_quickstart_dataset(name):
    """Whether ``name`` is a quickstart split: ``iuq_quickstart_{train,val}`` (the default sizes,
    64 / 16 images) or ``iuq_quickstart_{train,val}_N`` (N images)."""
    return _family_of(name) == "lookalike"


def is_textures_dataset(name):
    """Whether ``name`` is a split of the textures testbed: ``iuq_textures_{train,val}`` (4000 /
    256 images) or ``iuq_textures_{train,val}_N`` (N images; image k the same in every size)."""
    return _family_of(name) == "per_instance"


def _split_of(name, appearance="lookalike"):
    """(split, number of images, tag of its files) of a quickstart / textures dataset name."""
    family = _FAMILIES[appearance]
    if name in family["datasets"]:
        split = family["datasets"][name]
        return split, family["sizes"][split], split
    match = family["sized"].match(name)
    if match is None:
        p = family["prefix"]
        raise ValueError(f"{name!r} is not a {'quickstart' if appearance == 'lookalike' else 'textures'} dataset "
                         f"({p}_train, {p}_val, or {p}_train_N / {p}_val_N for N images)")
    split, n = match.group(1), int(match.group(2))
    return split, n, f"{split}_{n}"


def _register(appearance, root, names, seed):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    family = _FAMILIES[appearance]
    root = root or default_quickstart_root()
    names = list(names) if names is not None else list(family["datasets"])
    metadata = {
        "thing_classes": [c["name"] for c in family["categories"]],
        # Set here (load_coco_json would set the same on first load) so evaluators and
        # visualisers see it before the dataset is ever loaded.
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(family["categories"])},
    }
    for name in names:
        split, num_images, tag = _split_of(name, appearance)
        json_file, image_root = _generate_split(root, seed, split, num_images, family["image_size"], tag=tag,
                                                appearance=appearance)
        if name in DatasetCatalog.list():
            if MetadataCatalog.get(name).get("json_file") == json_file:
                continue
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(name, metadata, json_file, image_root)
    return names


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
    return _register("lookalike", root, names, seed)


def register_textures(root=None, names=None, seed=0):
    """Generate (if needed) and register the textures testbed: ``iuq_textures_train`` (4000
    images) / ``iuq_textures_val`` (256) by default, or the given ``names`` (``_N`` sizes too, see
    :func:`is_textures_dataset`), under ``root/textures``; as :func:`register_quickstart`."""
    return _register("per_instance", root, names, seed)
