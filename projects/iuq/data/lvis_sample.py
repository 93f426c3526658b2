"""A small LVIS v1 dataset made from COCO-format data: LVIS's format, categories and federated
annotations, runnable where LVIS itself is not downloaded.

It lets the LVIS recipe (``configs/IUQ/SOLOv2/R50_3x_lvis.yaml``) train and evaluate end to end —
detectron2's LVIS loader, the repeat-factor sampler, 1203 classes, ``LVISEvaluator`` with
APr / APc / APf — on images you already have (the default source is COCO val2017 under
``$DETECTRON2_DATASETS/coco``). Only annotation JSON is written; the images are read where they
are.

What is written, under the root (``default_lvis_sample_root()``)::

    lvis_v1_sample_train.json   LVIS v1 instances json (images of the source whose index % val_every != val_every - 1)
    lvis_v1_sample_val.json     the other images (every ``val_every``-th)

Each file is what LVIS's API and ``detectron2.data.datasets.load_lvis_json`` read:

- ``categories``: LVIS v1's 1203 categories (ids 1..1203, ``name``, ``synonyms``, ``synset``,
  ``def`` from detectron2's copy of LVIS's list) with ``image_count`` / ``instance_count`` of
  this file and a ``frequency`` (see below).
- ``images``: the source's ids, ``height``, ``width``, a ``coco_url`` ending in
  ``<image folder name>/<file name>`` (detectron2 resolves the file as ``image_root + folder``
  + name; the source's own ``coco_url`` may name another split), ``neg_category_ids`` and
  ``not_exhaustive_category_ids``.
- ``annotations``: the source's non-crowd instances of the COCO classes that have an LVIS
  category (``COCO_TO_LVIS``; instances of the others are dropped), with their ids, polygons,
  ``bbox``, ``area`` and the LVIS ``category_id``.

Federated annotations, made true to the source: COCO annotates all of its 80 classes in every
image, so a mapped class absent from an image is verified absent — ``neg_category_ids`` is a
seeded sample of up to ``max_negatives`` of them (LVIS also verifies a sample). A COCO crowd
region (``iscrowd`` 1; LVIS has none) means the instances of its class are not individually
annotated there: the region is dropped and its class goes into ``not_exhaustive_category_ids``.

``frequency``: LVIS's tiers are by training images per category (rare: 1-10, common: 11-100,
frequent: > 100, of ~100K images); every COCO class is "frequent" on LVIS, which would leave
APr and APc undefined here. The sample's categories are therefore tiered by LVIS's rule on the
sample's own train split, with thresholds for its size (``rare_max_images`` = 1,
``common_max_images`` = 4 for the 96 training images of the 128-image COCO sample); the same
label is written in both files, as in LVIS. Categories with no instance in the sample keep
LVIS v1's own label (no AP reads them). ``frequency="lvis"`` keeps LVIS's labels throughout.
"""
import json
import logging
import os
import random
from collections import defaultdict

from .quickstart import _atomic_write

__all__ = [
    "COCO_TO_LVIS",
    "LVIS_SAMPLE_DATASETS",
    "default_lvis_sample_root",
    "default_lvis_sample_source",
    "is_lvis_sample_dataset",
    "make_lvis_sample",
    "generate_lvis_sample",
    "register_lvis_sample",
]

logger = logging.getLogger(__name__)

# Bump when what is written changes, so cached copies are regenerated.
GENERATOR_VERSION = 1

# name -> split. The names contain "lvis" (iuq.evaluation.evaluators routes them to LVISEvaluator) and
# "v1" (detectron2's load_lvis_json gives them LVIS v1's metadata: 1203 thing_classes).
LVIS_SAMPLE_DATASETS = {"lvis_v1_sample_train": "train", "lvis_v1_sample_val": "val"}

# COCO class name -> LVIS v1 category name (same name, a synonym, or the LVIS name of the same
# thing). None: LVIS v1 has no category for the whole COCO object ("hot dog": LVIS has the
# sausage, not the bun; "potted plant": LVIS has the flowerpot, not the plant).
COCO_TO_LVIS = {
    "person": "person", "bicycle": "bicycle", "car": "car_(automobile)", "motorcycle": "motorcycle",
    "airplane": "airplane", "bus": "bus_(vehicle)", "train": "train_(railroad_vehicle)", "truck": "truck",
    "boat": "boat", "traffic light": "traffic_light", "fire hydrant": "fireplug", "stop sign": "stop_sign",
    "parking meter": "parking_meter", "bench": "bench", "bird": "bird", "cat": "cat", "dog": "dog",
    "horse": "horse", "sheep": "sheep", "cow": "cow", "elephant": "elephant", "bear": "bear",
    "zebra": "zebra", "giraffe": "giraffe", "backpack": "backpack", "umbrella": "umbrella",
    "handbag": "handbag", "tie": "necktie", "suitcase": "suitcase", "frisbee": "frisbee", "skis": "ski",
    "snowboard": "snowboard", "sports ball": "ball", "kite": "kite", "baseball bat": "baseball_bat",
    "baseball glove": "baseball_glove", "skateboard": "skateboard", "surfboard": "surfboard",
    "tennis racket": "tennis_racket", "bottle": "bottle", "wine glass": "wineglass", "cup": "cup",
    "fork": "fork", "knife": "knife", "spoon": "spoon", "bowl": "bowl", "banana": "banana",
    "apple": "apple", "sandwich": "sandwich", "orange": "orange_(fruit)", "broccoli": "broccoli",
    "carrot": "carrot", "hot dog": None, "pizza": "pizza", "donut": "doughnut", "cake": "cake",
    "chair": "chair", "couch": "sofa", "potted plant": None, "bed": "bed", "dining table": "dining_table",
    "toilet": "toilet", "tv": "television_set", "laptop": "laptop_computer",
    "mouse": "mouse_(computer_equipment)", "remote": "remote_control", "keyboard": "computer_keyboard",
    "cell phone": "cellular_telephone", "microwave": "microwave_oven", "oven": "oven", "toaster": "toaster",
    "sink": "sink", "refrigerator": "refrigerator", "book": "book", "clock": "clock", "vase": "vase",
    "scissors": "scissors", "teddy bear": "teddy_bear", "hair drier": "hair_dryer", "toothbrush": "toothbrush",
}


def default_lvis_sample_root():
    """``$IUQ_LVIS_SAMPLE_ROOT``, else ``./datasets/lvis_v1_sample``. Not under
    ``$DETECTRON2_DATASETS``, which often points at a shared, read-only copy of COCO / LVIS."""
    return os.path.expanduser(os.environ.get("IUQ_LVIS_SAMPLE_ROOT", os.path.join("datasets", "lvis_v1_sample")))


def default_lvis_sample_source():
    """(COCO instances json, its image folder): COCO val2017 under ``$DETECTRON2_DATASETS``
    (default ``./datasets``), where detectron2 looks for ``coco_2017_val``."""
    coco = os.path.join(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), "coco")
    return os.path.join(coco, "annotations", "instances_val2017.json"), os.path.join(coco, "val2017")


def lvis_v1_categories():
    """LVIS v1's 1203 categories (id, name, synonyms, synset, def, frequency), sorted by id, from
    the copy detectron2 ships (``detectron2.data.datasets.lvis_v1_categories``)."""
    from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

    return [dict(c) for c in sorted(LVIS_CATEGORIES, key=lambda c: c["id"])]


def _valid_polygons(segmentation):
    """The polygons LVIS's loader accepts (detectron2 asserts >= 3 points each); [] for RLE."""
    if not isinstance(segmentation, list):
        return []
    return [[float(v) for v in p] for p in segmentation if len(p) % 2 == 0 and len(p) >= 6]


def make_lvis_sample(coco, image_folder, val_every=4, max_negatives=8, seed=0,
                     frequency="sample", rare_max_images=1, common_max_images=4, mapping=None):
    """The two LVIS v1 files' contents, as dicts, from a COCO instances dict.

    Args:
        coco (dict): a COCO instances json (``images``, ``annotations``, ``categories``).
        image_folder (str): the name of the folder its images are in (e.g. ``val2017``): the
            second-to-last part of every ``coco_url``.
        val_every (int): every ``val_every``-th image (source order) goes to val, the rest to train.
        max_negatives (int): per image, how many absent mapped classes ``neg_category_ids`` holds
            at most (a seeded sample).
        seed (int): the negatives' sample is a deterministic function of it.
        frequency (str): "sample" (tiers by LVIS's rule on the train split, see the module
            docstring) or "lvis" (LVIS v1's own labels).
        rare_max_images, common_max_images (int): the "sample" tiers: a category in at most this
            many training images is rare / common; above ``common_max_images``, frequent.
        mapping (dict or None): source class name -> LVIS v1 category name, or None to drop the
            class; None -> ``COCO_TO_LVIS`` (the source has COCO's classes).

    Returns:
        dict: "train" / "val" -> an LVIS v1 json dict.
    """
    if frequency not in ("sample", "lvis"):
        raise ValueError(f"frequency must be 'sample' or 'lvis', got {frequency!r}")
    if val_every < 2:
        raise ValueError(f"val_every must be >= 2 (every val_every-th image is val), got {val_every}")
    mapping = COCO_TO_LVIS if mapping is None else mapping
    categories = lvis_v1_categories()
    lvis_id = {c["name"]: c["id"] for c in categories}
    coco_names = {c["id"]: c["name"] for c in coco["categories"]}
    unknown = [n for n in coco_names.values() if n not in mapping]
    if unknown:
        raise ValueError(f"source classes {unknown} have no entry in the mapping to LVIS v1 (COCO_TO_LVIS maps "
                         "COCO's 80 classes; pass mapping={name: LVIS v1 name or None} for others)")
    not_lvis = [v for v in mapping.values() if v is not None and v not in lvis_id]
    if not_lvis:
        raise ValueError(f"{not_lvis} are not LVIS v1 category names")
    to_lvis = {cid: lvis_id[mapping[n]] for cid, n in coco_names.items() if mapping[n]}
    mapped = sorted(set(to_lvis.values()))

    split_of = {im["id"]: ("val" if i % val_every == val_every - 1 else "train")
                for i, im in enumerate(coco["images"])}
    anns, crowd = defaultdict(list), defaultdict(set)
    for a in sorted(coco["annotations"], key=lambda a: a["id"]):
        if a["category_id"] not in to_lvis or a["image_id"] not in split_of:
            continue
        cat = to_lvis[a["category_id"]]
        if a.get("iscrowd", 0):
            crowd[a["image_id"]].add(cat)
            continue
        polygons = _valid_polygons(a["segmentation"])
        if not polygons:
            continue
        anns[a["image_id"]].append({
            "id": a["id"], "image_id": a["image_id"], "category_id": cat, "segmentation": polygons,
            "bbox": [float(v) for v in a["bbox"]], "area": float(a["area"]),
        })

    rng = random.Random(seed)
    out = {s: {"images": [], "annotations": []} for s in ("train", "val")}
    for im in coco["images"]:
        present = {a["category_id"] for a in anns[im["id"]]}
        absent = [c for c in mapped if c not in present and c not in crowd[im["id"]]]
        image = {
            "id": im["id"], "height": im["height"], "width": im["width"],
            "coco_url": f"http://images.cocodataset.org/{image_folder}/{im['file_name']}",
            "neg_category_ids": sorted(rng.sample(absent, min(max_negatives, len(absent)))),
            "not_exhaustive_category_ids": sorted(crowd[im["id"]]),
        }
        for key in ("license", "flickr_url", "date_captured"):
            if key in im:
                image[key] = im[key]
        split = out[split_of[im["id"]]]
        split["images"].append(image)
        split["annotations"].extend(anns[im["id"]])

    def counts(split):
        images, instances = defaultdict(set), defaultdict(int)
        for a in split["annotations"]:
            images[a["category_id"]].add(a["image_id"])
            instances[a["category_id"]] += 1
        return {c: len(v) for c, v in images.items()}, instances

    train_images, _ = counts(out["train"])
    in_sample = {a["category_id"] for s in out.values() for a in s["annotations"]}

    def tier(cat):
        if frequency == "lvis" or cat["id"] not in in_sample:
            return cat["frequency"]
        n = train_images.get(cat["id"], 0)
        return "r" if n <= rare_max_images else "c" if n <= common_max_images else "f"

    info = {"description": "LVIS v1 sample made by iuq.data.lvis_sample from a COCO-format source",
            "version": GENERATOR_VERSION}
    for name, split in out.items():
        image_count, instance_count = counts(split)
        split["categories"] = [
            {**c, "frequency": tier(c), "image_count": image_count.get(c["id"], 0),
             "instance_count": instance_count.get(c["id"], 0)}
            for c in categories
        ]
        split["info"] = {**info, "split": name}
        split["licenses"] = coco.get("licenses", [])
    return out


def generate_lvis_sample(root=None, coco_json=None, image_dir=None, **options):
    """Write ``lvis_v1_sample_{train,val}.json`` under ``root`` unless the same files (same
    source, options and generator version) are already there. Safe when several ranks call it at
    once (each file is written to a temp name, then renamed).

    Args:
        root (str or None): where the json files go; None -> ``default_lvis_sample_root()``.
        coco_json, image_dir (str or None): the COCO-format source and its image folder; None ->
            ``default_lvis_sample_source()``.
        options: passed to :func:`make_lvis_sample`.

    Returns:
        dict: split ("train" / "val") -> (json_file, image_root). ``image_root`` is the folder
        *holding* ``image_dir``, with a trailing separator, as detectron2's LVIS loader joins it.
    """
    default_json, default_dir = default_lvis_sample_source()
    coco_json = os.path.abspath(coco_json or default_json)
    image_dir = os.path.normpath(os.path.abspath(image_dir or default_dir))
    if not os.path.isfile(coco_json):
        raise FileNotFoundError(
            f"The LVIS v1 sample is made from a COCO instances json, and {coco_json} does not exist: "
            "set DETECTRON2_DATASETS to the folder holding coco/ (coco/annotations/instances_val2017.json, "
            "coco/val2017/), or pass coco_json / image_dir"
        )
    root = root or default_lvis_sample_root()
    image_root = os.path.dirname(image_dir) + os.sep
    files = {s: os.path.join(root, f"lvis_v1_sample_{s}.json") for s in ("train", "val")}
    source = os.stat(coco_json)
    stamp = json.loads(json.dumps({  # as it reads back from the json
        "source": coco_json, "source_size": source.st_size, "source_mtime_ns": source.st_mtime_ns,
        "image_dir": image_dir, "options": sorted(options.items()), "version": GENERATOR_VERSION}))
    if all(_stamp_of(f) == stamp for f in files.values()):
        return {s: (f, image_root) for s, f in files.items()}

    logger.info(f"Writing the LVIS v1 sample from {coco_json} to {root} ...")
    with open(coco_json) as f:
        coco = json.load(f)
    data = make_lvis_sample(coco, os.path.basename(image_dir), **options)
    os.makedirs(root, exist_ok=True)
    for split, path in files.items():
        payload = json.dumps({**data[split], "info": {**data[split]["info"], "iuq_stamp": stamp}},
                             separators=(",", ":")).encode("utf-8")
        _atomic_write(path, lambda f, payload=payload: f.write(payload), ".json")
    return {s: (f, image_root) for s, f in files.items()}


def _stamp_of(json_file):
    try:
        with open(json_file) as f:
            return json.load(f)["info"].get("iuq_stamp")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_lvis_sample_dataset(name):
    """Whether ``name`` is ``lvis_v1_sample_train`` or ``lvis_v1_sample_val``."""
    return name in LVIS_SAMPLE_DATASETS


def register_lvis_sample(root=None, names=None, coco_json=None, image_dir=None, **options):
    """Write (if needed) and register the LVIS v1 sample's splits with detectron2's
    ``register_lvis_instances`` and LVIS v1's metadata (1203 ``thing_classes``), as detectron2
    registers ``lvis_v1_train`` / ``lvis_v1_val``. Calling it again with the same files is a
    no-op; with other files, the names are re-registered to point there.

    Returns:
        list[str]: the registered dataset names.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import get_lvis_instances_meta, register_lvis_instances

    names = list(names) if names is not None else list(LVIS_SAMPLE_DATASETS)
    bad = [n for n in names if not is_lvis_sample_dataset(n)]
    if bad:
        raise ValueError(f"{bad} are not LVIS sample splits ({', '.join(LVIS_SAMPLE_DATASETS)})")
    files = generate_lvis_sample(root, coco_json, image_dir, **options)
    for name in names:
        json_file, image_root = files[LVIS_SAMPLE_DATASETS[name]]
        if name in DatasetCatalog.list():
            if MetadataCatalog.get(name).get("json_file") == json_file:
                continue
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_lvis_instances(name, get_lvis_instances_meta("lvis_v1"), json_file, image_root)
    return names
