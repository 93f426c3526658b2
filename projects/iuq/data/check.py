"""The dataset check: every image of a dataset read (decoded) in parallel and every annotation
checked, each kind of bad record counted and its first records named (file, image id, annotation
id), and what IUQ's memory and sampling will see. ``tools/check_dataset.py`` and
``train_net.py --check-data`` print :func:`format_reports` of :func:`check_datasets`.

A dataset registered from a COCO JSON (``register_coco_instances``, ``--dataset``: its metadata
names ``json_file`` and ``image_root``) is read from the JSON itself, so that what detectron2's
``load_coco_json`` drops silently (polygons of fewer than 3 points) or stops at without naming a
record (an unknown category id) is reported per record; any other dataset from its
``DatasetCatalog`` dicts (contiguous category ids, checked against ``thing_classes``).

A record here is a detectron2-style dict: ``file_name`` (path), ``image_id``, ``height``,
``width``, ``annotations``: list of dicts with ``id`` (or None), ``category_id``, ``iscrowd``,
``segmentation`` (polygons ``[[x0, y0, x1, y1, ...], ...]`` in pixels, or an RLE dict
``{"size": [h, w], "counts": str | list}``).
"""
import itertools
import json
import os
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .loader import lacks_mask

# Each kind of problem: (severity, what it means and what to do). Errors make the check fail
# (exit status 1); warnings and information do not.
KINDS = {
    "dataset does not load": ("error", "its JSON or DatasetCatalog function fails: the error says why"),
    "unreadable image": ("error", "missing, truncated or not an image (detectron2 stops at it): fix or drop the file"),
    "size mismatch": ("error", "decoded size (after EXIF rotation) is not the JSON's width x height "
                               "(detectron2's mapper stops at it): fix the JSON"),
    "duplicate image id": ("error", "images sharing an id share annotations in pycocotools, and IUQ keeps a "
                                    "query's own image out of its negatives by id: give each image its own"),
    "duplicate annotation id": ("error", "detectron2's loader refuses the JSON: give each annotation its own id"),
    "unknown category id": ("error", "not among the JSON's categories (detectron2's loader stops at it)"),
    "degenerate polygon": ("error", "fewer than 3 points or an odd number of coordinates: detectron2 drops the "
                                    "polygon, and the instance with it if it has no other"),
    "bad RLE": ("error", "an RLE whose size is not the image's [height, width], or that does not decode"),
    "empty mask": ("error", "a mask with no pixel in the image (zero area or wholly outside): no target, "
                            "no pixel sample"),
    "instance without mask": ("error", "no segmentation: IUQ needs every instance's mask (crowd regions aside)"),
    "polygon outside image": ("warning", "points more than 1 px outside the image: the mask is clipped"),
    "annotation of no image": ("warning", "its image_id is not among the images: detectron2 drops it"),
    "same file, two image ids": ("warning", "one file under two ids: IUQ treats them as two images"),
    "image without instances": ("info", "kept with DATALOADER.FILTER_EMPTY_ANNOTATIONS False, dropped with True"),
}
SEVERITIES = ("error", "warning", "info")

# Points of a polygon may lie this far outside the image before it is reported as outside.
OUTSIDE_TOLERANCE = 1.0

# The stride of the pixel-embedding map IUQ samples, per META_ARCHITECTURE (the adapters read it
# off the built model: CondInst's mask branch, P3; SOLOv2 / SOTR's mask feature, P2; SparseInst's
# encoder, P3; Mask2Former's mask features, MODEL.SEM_SEG_HEAD.COMMON_STRIDE).
EMBEDDING_STRIDES = {"CondInst": 8, "SOLOv2": 4, "SOTR": 4, "SparseInst": 8}


@dataclass
class Problem:
    kind: str
    file_name: str
    image_id: object
    annotation_id: object = None
    detail: str = ""

    def line(self):
        """``<severity> <kind>: <file> image <id> [annotation <id>]: <detail>``."""
        ann = "" if self.annotation_id is None else f" annotation {self.annotation_id}"
        detail = f": {self.detail}" if self.detail else ""
        return f"{KINDS[self.kind][0]} {self.kind}: {self.file_name} image {self.image_id}{ann}{detail}"


@dataclass
class DatasetReport:
    """What the check found in one dataset. ``instance_cells``: per image, the area of each
    instance mask in cells of the embedding grid at the training scale (float array)."""

    name: str
    splits: tuple
    source: str
    num_images: int = 0
    num_annotations: int = 0
    problems: list = field(default_factory=list)
    instance_cells: list = field(default_factory=list)
    seconds: float = 0.0
    workers: int = 1
    scale_note: str = ""

    def count(self, severity):
        return sum(KINDS[p.kind][0] == severity for p in self.problems)

    @property
    def errors(self):
        return self.count("error")


# ---------------------------------------------------------------------------------------------
# Records


def dataset_records(name):
    """(records, known category ids or None, source, problems found at load) of a registered
    dataset: from its COCO JSON where its metadata names one, else from its DatasetCatalog dicts."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    meta = MetadataCatalog.get(name)
    json_file, image_root = meta.get("json_file"), meta.get("image_root")
    if json_file and image_root is not None and meta.get("evaluator_type", "coco") == "coco":
        records, categories, problems = coco_json_records(json_file, image_root)
        return records, categories, f"{json_file} (images in {image_root})", problems
    records = DatasetCatalog.get(name)
    classes = meta.get("thing_classes")
    return records, (set(range(len(classes))) if classes is not None else None), "DatasetCatalog", []


def coco_json_records(json_file, image_root):
    """(records, category ids, problems) of a COCO instances JSON, as written (nothing dropped).
    Annotations go to every image record with their ``image_id``, as pycocotools would index them;
    ``duplicate annotation id`` and ``annotation of no image`` are found here."""
    with open(json_file) as f:
        data = json.load(f)
    categories = {c["id"] for c in data.get("categories", [])}
    by_image = defaultdict(list)
    for a in data.get("annotations", []):
        by_image[a.get("image_id")].append(a)
    records, problems = [], []
    image_ids = set()
    for im in data.get("images", []):
        image_ids.add(im["id"])
        records.append({
            "file_name": os.path.join(image_root, im["file_name"]), "image_id": im["id"],
            "height": im.get("height"), "width": im.get("width"),
            "annotations": [{"id": a.get("id"), "category_id": a.get("category_id"), "iscrowd": a.get("iscrowd", 0),
                             "segmentation": a.get("segmentation")} for a in by_image.get(im["id"], ())],
        })
    seen = Counter(a.get("id") for a in data.get("annotations", []))
    files = {r["image_id"]: r["file_name"] for r in records}
    for a in data.get("annotations", []):
        if a.get("id") is not None and seen[a.get("id")] > 1:
            problems.append(Problem("duplicate annotation id", files.get(a.get("image_id"), "-"), a.get("image_id"),
                                    a.get("id"), f"{seen[a['id']]} annotations have this id"))
        if a.get("image_id") not in image_ids:
            problems.append(Problem("annotation of no image", "-", a.get("image_id"), a.get("id")))
    return records, categories, problems


def dataset_problems(records, categories):
    """Problems across records: duplicate image ids, one file under two ids, unknown category ids."""
    problems = []
    ids = Counter(r["image_id"] for r in records)
    files = defaultdict(set)
    for r in records:
        files[r["file_name"]].add(r["image_id"])
        if ids[r["image_id"]] > 1:
            problems.append(Problem("duplicate image id", r["file_name"], r["image_id"],
                                    detail=f"{ids[r['image_id']]} images have this id"))
        for a in r.get("annotations", ()):
            if categories is not None and a.get("category_id") not in categories:
                problems.append(Problem("unknown category id", r["file_name"], r["image_id"], a.get("id"),
                                        f"category_id {a.get('category_id')!r}"))
    for file_name, image_ids in files.items():
        if len(image_ids) > 1:
            problems.append(Problem("same file, two image ids", file_name, sorted(image_ids, key=str)[0],
                                    detail=f"image ids {sorted(image_ids, key=str)}"))
    return problems


# ---------------------------------------------------------------------------------------------
# One image (runs in the worker processes)


def read_image_size(file_name, full_decode=False):
    """(width, height) of the image file after EXIF rotation, detectron2's ``read_image``'s view
    of it, every byte of its compressed data decoded. Raises what PIL raises on a missing,
    truncated or corrupt file (``LOAD_TRUNCATED_IMAGES`` is not consulted: off here).

    A JPEG is decoded at 1/8 scale (PIL's ``draft``: libjpeg still entropy-decodes all of the
    data, so truncation and corrupt data are found; only the inverse DCT is reduced), about twice
    as fast as a full decode; ``full_decode`` decodes at full size."""
    from PIL import Image, ImageFile

    if ImageFile.LOAD_TRUNCATED_IMAGES:  # a process that set it would accept truncated files
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    with Image.open(file_name) as im:
        width, height = im.size
        orientation = im.getexif().get(0x0112, 1)
        if im.format == "JPEG" and not full_decode:
            im.draft(im.mode, (max(1, width // 8), max(1, height // 8)))
        im.load()
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def mask_area(segmentation, height, width):
    """(area in pixels, problem kind or None, detail) of an annotation's ``segmentation``:
    polygons ``[[x0, y0, ...], ...]`` (pixels) or an RLE dict, rasterised by pycocotools on the
    image's [height, width] grid."""
    from pycocotools import mask as mask_util

    if isinstance(segmentation, dict):
        size = segmentation.get("size")
        if list(size or ()) != [height, width]:
            return 0.0, "bad RLE", f"RLE size {size}, the image is [{height}, {width}]"
        try:
            rle = segmentation
            if isinstance(rle.get("counts"), list):
                rle = mask_util.frPyObjects(rle, height, width)
            area = float(mask_util.area(rle))
        except Exception as e:  # pycocotools raises TypeError / ValueError on bad counts
            return 0.0, "bad RLE", f"{type(e).__name__}: {e}"
        return area, ("empty mask" if area == 0 else None), ("RLE of 0 pixels" if area == 0 else "")
    polygons = [np.asarray(p, dtype=np.float64).ravel() for p in segmentation]
    for p in polygons:
        if len(p) < 6 or len(p) % 2:
            return 0.0, "degenerate polygon", f"polygon of {len(p)} coordinates ({len(p) / 2:g} points; a polygon needs 3)"
    rles = mask_util.frPyObjects([p.tolist() for p in polygons], height, width)
    area = float(mask_util.area(mask_util.merge(rles)))
    if area == 0:
        return 0.0, "empty mask", "polygons of 0 pixels in the image (collinear, or wholly outside)"
    points = np.concatenate([p.reshape(-1, 2) for p in polygons])
    outside = max(-points[:, 0].min(), -points[:, 1].min(), points[:, 0].max() - width, points[:, 1].max() - height)
    if outside > OUTSIDE_TOLERANCE:
        return area, "polygon outside image", f"a point {outside:.1f} px outside the {width}x{height} image"
    return area, None, ""


def check_record(record, full_decode=False):
    """(problems, instance areas in pixels) of one record: its image read, its masks checked.
    The areas are those of its non-crowd instances with a usable mask (what IUQ samples)."""
    file_name, image_id = record["file_name"], record["image_id"]
    height, width = record.get("height"), record.get("width")
    problems, areas = [], []
    try:
        size = read_image_size(file_name, full_decode)
    except Exception as e:  # FileNotFoundError, PIL.UnidentifiedImageError, OSError (truncated), ...
        problems.append(Problem("unreadable image", file_name, image_id, detail=f"{type(e).__name__}: {e}"))
    else:
        if width is not None and height is not None and (width, height) != size:  # as detectron2 checks
            problems.append(Problem("size mismatch", file_name, image_id,
                                    detail=f"decoded {size[0]}x{size[1]} (w x h), the JSON says {width}x{height}"))
        height, width = height or size[1], width or size[0]
    instances = 0
    for a in record.get("annotations", ()):
        if a.get("iscrowd", 0):
            continue
        instances += 1
        if lacks_mask(a):
            problems.append(Problem("instance without mask", file_name, image_id, a.get("id")))
            continue
        if not (height and width):
            continue  # size unknown (unreadable image without width / height): nothing to check against
        area, kind, detail = mask_area(a["segmentation"], height, width)
        if kind is not None:
            problems.append(Problem(kind, file_name, image_id, a.get("id"), detail))
        if kind is None or KINDS[kind][0] != "error":
            areas.append(area)
    if instances == 0:
        problems.append(Problem("image without instances", file_name, image_id))
    return problems, areas


def _check_chunk(records, full_decode):
    return [check_record(r, full_decode) for r in records]


def _chunks(items, size):
    return [items[i : i + size] for i in range(0, len(items), size)]


def check_records(records, workers=1, full_decode=False, progress=True, desc=None):
    """[(problems, areas)] of each record (:func:`check_record`), in order, read by ``workers``
    processes (1: in this one) with a tqdm progress bar (shown where stderr is a terminal)."""
    from tqdm import tqdm

    bar = tqdm(total=len(records), desc=desc, unit="img", disable=None if progress else True, smoothing=0.1)
    results = []
    if workers <= 1:
        for r in records:
            results.append(check_record(r, full_decode))
            bar.update()
    else:
        chunk = max(1, min(64, len(records) // (workers * 8) or 1))
        with ProcessPoolExecutor(workers) as pool:
            for part in pool.map(_check_chunk, _chunks(records, chunk), itertools.repeat(full_decode)):
                results.extend(part)
                bar.update(len(part))
    bar.close()
    return results


# ---------------------------------------------------------------------------------------------
# Datasets of a config


def embedding_stride(cfg):
    """The stride of the map IUQ samples pixels from, for ``cfg``'s META_ARCHITECTURE (8 if unknown)."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "MaskFormer":
        return int(cfg.MODEL.SEM_SEG_HEAD.COMMON_STRIDE)
    return EMBEDDING_STRIDES.get(arch, 8)


def training_scale(height, width, min_size, max_size):
    """detectron2's ResizeShortestEdge factor: short side to ``min_size``, long side at most ``max_size``."""
    return min(min_size / min(height, width), max_size / max(height, width) if max_size else float("inf"))


def check_dataset(name, cfg, splits=("DATASETS.TRAIN",), workers=1, full_decode=False, progress=True):
    """:class:`DatasetReport` of the registered dataset ``name`` for training with ``cfg``: its
    instance sizes at the smallest training scale (INPUT.MIN_SIZE_TRAIN, MAX_SIZE_TRAIN) on the
    embedding grid (:func:`embedding_stride`)."""
    start = time.perf_counter()
    try:
        records, categories, source, problems = dataset_records(name)
    except Exception as e:  # the JSON or the dataset function itself fails: say so, as an error
        report = DatasetReport(name, tuple(splits), "not loadable", workers=workers)
        report.problems.append(Problem("dataset does not load", "-", "-", detail=f"{type(e).__name__}: {e}"))
        return report
    report = DatasetReport(name, tuple(splits), source, num_images=len(records), workers=workers,
                           num_annotations=sum(len(r.get("annotations", ())) for r in records))
    report.problems = problems + dataset_problems(records, categories)
    results = check_records(records, workers, full_decode, progress, desc=name)
    stride = embedding_stride(cfg)
    min_size, max_size = min(cfg.INPUT.MIN_SIZE_TRAIN), cfg.INPUT.MAX_SIZE_TRAIN
    for r, (found, areas) in zip(records, results):
        report.problems.extend(found)
        h, w = r.get("height"), r.get("width")
        scale = training_scale(h, w, min_size, max_size) if h and w else 1.0
        report.instance_cells.append(np.asarray(areas, dtype=np.float64) * scale**2 / stride**2)
    report.problems.sort(key=lambda p: list(KINDS).index(p.kind))
    report.scale_note = f"short side {min_size} (max {max_size}), stride {stride}"
    report.seconds = time.perf_counter() - start
    return report


def config_datasets(cfg):
    """{dataset name: the config keys naming it}, DATASETS.TRAIN first."""
    out = {}
    for key, names in (("DATASETS.TRAIN", cfg.DATASETS.TRAIN), ("DATASETS.TEST", cfg.DATASETS.TEST)):
        for n in names:
            out.setdefault(n, []).append(key)
    return out


def check_datasets(cfg, workers=None, full_decode=False, progress=True):
    """[:class:`DatasetReport`] of every dataset of DATASETS.TRAIN and DATASETS.TEST (each once).
    ``workers``: processes reading images (default: the CPUs this process may use)."""
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return [check_dataset(name, cfg, tuple(splits), workers, full_decode, progress)
            for name, splits in config_datasets(cfg).items()]


# ---------------------------------------------------------------------------------------------
# The report


def iuq_view(report, cfg):
    """Rows (what, value) of what IUQ's memory and sampling will see in ``report``'s images."""
    per_image = [len(c) for c in report.instance_cells]
    if not per_image:
        return []
    cells = np.concatenate(report.instance_cells) if any(per_image) else np.zeros(0)
    mem = cfg.MODEL.IUQ.MEMORY
    k, p = mem.PIXELS_PER_INSTANCE, mem.PIXELS_PER_IMAGE
    if mem.SAMPLING == "instance":
        samples = [np.minimum(c, k).sum() for c in report.instance_cells]
    elif mem.SAMPLING == "image":
        samples = [min(c.sum(), p) for c in report.instance_cells]
    else:
        samples = [c.sum() for c in report.instance_cells]
    mean_samples = float(np.mean(samples))
    rows = [
        ("instances per image", f"mean {np.mean(per_image):.1f}, median {np.median(per_image):g}, max {max(per_image)}"),
    ]
    if len(cells):
        small = int((cells < 1).sum())
        rows += [
            (f"instance size, cells ({report.scale_note})",
             f"median {np.median(cells):.1f}, 10th percentile {np.percentile(cells, 10):.1f}, max {cells.max():.0f}"),
            ("instances smaller than one cell", f"{small} of {len(cells)} ({100 * small / len(cells):.1f}%): "
                                                "often no cell centre inside, so no pixel sample"),
        ]
    if mem.SIZE > 0 and mean_samples > 0:
        held = mem.SIZE / mean_samples
        fits = ("the whole dataset: a query meets its own image again, kept out of its negatives by image id"
                if held >= report.num_images else f"{100 * held / max(report.num_images, 1):.1f}% of the images")
        rows.append((f"memory (MEMORY.SIZE {mem.SIZE}, {mem.SAMPLING} sampling)",
                     f"~{mean_samples:.0f} samples per image: holds the last ~{held:.0f} images, {fits}"))
    return rows


def format_report(report, cfg=None, first=5):
    """The report of one dataset as text: a summary, a table (severity, problem, count, meaning),
    the first ``first`` records of each problem, one line each (:meth:`Problem.line`), and what
    IUQ will see (with ``cfg``)."""
    from tabulate import tabulate

    lines = [f"Dataset {report.name!r} ({', '.join(report.splits)}): {report.num_images} images, "
             f"{report.num_annotations} annotations, from {report.source}; read in {report.seconds:.1f} s "
             f"with {report.workers} worker{'s' * (report.workers != 1)}"]
    by_kind = defaultdict(list)
    for p in report.problems:
        by_kind[p.kind].append(p)
    if by_kind:
        table = [(KINDS[k][0], k, len(by_kind[k]), KINDS[k][1]) for k in KINDS if k in by_kind]
        lines += ["", tabulate(table, headers=("severity", "problem", "count", "meaning"), tablefmt="simple",
                                  maxcolwidths=[None, None, None, 72]), ""]
        for k in KINDS:
            for p in by_kind.get(k, [])[:first]:
                lines.append("  " + p.line())
            if len(by_kind.get(k, ())) > first:
                lines.append(f"  ... {len(by_kind[k]) - first} more {k}")
    else:
        lines.append("no problem found")
    if cfg is not None:
        rows = iuq_view(report, cfg)
        if rows:
            lines += ["", "What IUQ will see:", tabulate(rows, tablefmt="plain")]
    return "\n".join(lines)


def format_reports(reports, cfg=None, first=5):
    """All reports, then one verdict line: ``check: N errors, M warnings in K datasets`` and the
    remedies when there are errors."""
    errors = sum(r.errors for r in reports)
    warnings = sum(r.count("warning") for r in reports)
    verdict = f"check: {errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)} " \
              f"in {len(reports)} dataset{'s' * (len(reports) != 1)}"
    if errors:
        verdict += ": fix or drop the records named above (DATALOADER.FILTER_EMPTY_ANNOTATIONS True drops " \
                   "images without instances only)"
    return "\n\n".join([format_report(r, cfg, first) for r in reports] + [verdict])


def run_check(cfg, workers=None, full_decode=False, first=5, file=None):
    """Check ``cfg``'s datasets and print the report (to ``file``, default stdout). Returns the
    number of errors (``tools/check_dataset.py`` exits 1 on any; ``train_net.py --check-data``
    does not train)."""
    reports = check_datasets(cfg, workers, full_decode)
    print(format_reports(reports, cfg, first), file=file or sys.stdout, flush=True)
    return sum(r.errors for r in reports)
