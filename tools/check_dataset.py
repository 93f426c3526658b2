#!/usr/bin/env python3
"""Check the datasets of a config before training on them: every image of DATASETS.TRAIN and
DATASETS.TEST read (decoded) in parallel, every annotation checked; each kind of bad record
counted with its first records named (file, image id, annotation id), and what IUQ's memory and
sampling will see. Exit status 1 when there are errors, 0 otherwise (warnings, information).

    python tools/check_dataset.py --config-file configs/IUQ/CondInst/MS_R_50_1x.yaml \\
        --dataset mine=data/annotations/train.json:data/images/train DATASETS.TRAIN "('mine',)"

The checks: iuq/data/check.py; what each problem means: docs/training.md, "Your own dataset".
"""
import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import train_net  # noqa: E402  (exits naming what to install where detectron2 is missing)
from iuq.data.check import run_check  # noqa: E402
from iuq.data.custom import DatasetSpecError  # noqa: E402
from iuq.engine.cli import add_dataset_argument, parse_args  # noqa: E402
from iuq.engine.models import BaseModelUnavailable  # noqa: E402


def argument_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="the training config")
    add_dataset_argument(parser)
    parser.add_argument("--workers", type=int, default=None,
                        help="processes reading images (default: every CPU this process may use)")
    parser.add_argument("--full-decode", action="store_true",
                        help="decode JPEGs at full size (default: 1/8 scale, every byte still decoded; 2x faster)")
    parser.add_argument("--first", type=int, default=5, help="records listed per problem (default 5)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE or KEY=VALUE")
    return parser


def main(argv=None):
    args = parse_args(argument_parser(), argv, prog="tools/check_dataset.py")
    try:
        cfg = train_net.load_config(args)
    except (BaseModelUnavailable, DatasetSpecError) as e:
        sys.exit(str(e))
    return 1 if run_check(cfg, args.workers, args.full_decode, args.first) else 0


if __name__ == "__main__":
    sys.exit(main())
