#!/usr/bin/env python3
"""Build a copy-paste testbed (Ghiasi et al., CVPR 2021) from any COCO-format instances dataset:
the source images split by id into a training part and a held-out part (seeded), training scenes
composed only of the training part's instances and backgrounds, held-out scenes only of the
held-out part's (``iuq.data.copy_paste`` says how a scene is made).

    python tools/make_copy_paste.py --json data/annotations/instances.json --images data/images \\
        --out datasets/my_copy_paste --train 5000 --val 500
    # then, e.g.:
    python train_net.py --config-file CFG \\
        --dataset cp_train=datasets/my_copy_paste/train.json:datasets/my_copy_paste/train \\
        --dataset cp_val=datasets/my_copy_paste/val.json:datasets/my_copy_paste/val \\
        DATASETS.TRAIN "('cp_train',)" DATASETS.TEST "('cp_val',)" INPUT.MASK_FORMAT bitmask

Writes ``OUT/train.json``, ``OUT/val.json`` (COCO instances, RLE masks unless ``--mask-format
polygon``) and the scenes' JPEGs under ``OUT/train/`` and ``OUT/val/``. Without ``--json`` the
source is COCO val2017 under ``$DETECTRON2_DATASETS/coco``; train_net.py builds that default set
itself for the dataset names ``iuq_copy_paste_train[_N]`` / ``iuq_copy_paste_val[_N]``.
"""
import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "projects"))  # `iuq` without installing

from iuq.data.copy_paste import COPY_PASTE_DEFAULTS, make_copy_paste  # noqa: E402
from iuq.data.lvis_sample import default_lvis_sample_source  # noqa: E402


def parse_args(argv=None):
    d = COPY_PASTE_DEFAULTS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--json", help="COCO instances json of the source (default: COCO val2017 under $DETECTRON2_DATASETS)")
    p.add_argument("--images", help="the source's image folder (default: next to the default json)")
    p.add_argument("--out", required=True, help="output folder (not inside a git checkout's tracked files)")
    p.add_argument("--train", type=int, default=1000, help="training scenes (default 1000)")
    p.add_argument("--val", type=int, default=200, help="held-out scenes (default 200)")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--held-out", type=float, default=d["held_out"], help="fraction of source images held out")
    p.add_argument("--size", type=int, nargs=2, default=list(d["image_size"]), metavar=("H", "W"))
    p.add_argument("--instances", type=int, nargs=2, default=list(d["instances_per_scene"]), metavar=("MIN", "MAX"),
                   help="instances pasted per scene")
    p.add_argument("--scale", type=float, nargs=2, default=list(d["scale_range"]), metavar=("LO", "HI"))
    p.add_argument("--no-background-instances", action="store_true",
                   help="do not annotate the background crop's own instances")
    p.add_argument("--min-area", type=int, default=d["min_area"])
    p.add_argument("--mask-format", choices=("rle", "polygon"), default=d["mask_format"])
    args = p.parse_args(argv)
    if args.json and not args.images:
        p.error("--json needs --images (the source's image folder)")
    return args


def main(argv=None):
    args = parse_args(argv)
    default_json, default_dir = default_lvis_sample_source()
    coco_json, image_dir = args.json or default_json, args.images or default_dir
    if not os.path.isfile(coco_json):
        sys.exit(f"make_copy_paste.py: no COCO json at {coco_json} (--json, or set DETECTRON2_DATASETS)")
    with open(coco_json) as f:
        coco = json.load(f)
    options = dict(seed=args.seed, held_out=args.held_out, image_size=tuple(args.size),
                   instances_per_scene=tuple(args.instances), scale_range=tuple(args.scale),
                   background_instances=not args.no_background_instances, min_area=args.min_area,
                   mask_format=args.mask_format)
    os.makedirs(args.out, exist_ok=True)
    for split, n in (("train", args.train), ("val", args.val)):
        start = time.time()
        data = make_copy_paste(coco, image_dir, split, n, args.out, **options)
        path = os.path.join(args.out, f"{split}.json")
        with open(path, "w") as f:
            json.dump(data, f, separators=(",", ":"))
        part = data["info"]["iuq_copy_paste"]["part_image_ids"]
        print(f"{split}: {len(data['images'])} scenes, {len(data['annotations'])} instances from {len(part)} source "
              f"images -> {path} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
