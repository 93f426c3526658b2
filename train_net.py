#!/usr/bin/env python3
"""Train or evaluate a detectron2 / AdelaiDet instance segmenter with IUQ.

    python train_net.py --config-file configs/IUQ/CondInst/MS_R_50_1x.yaml --num-gpus 8
    python train_net.py --config-file configs/quickstart.yaml MODEL.DEVICE cpu
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS model_final.pth
    python train_net.py --dataset mine=data/train.json:data/images --check-data --config-file ... \
        DATASETS.TRAIN "('mine',)"
Overrides may be given as ``KEY VALUE`` pairs or as ``KEY=VALUE``; flags come before them.
"""
import re
import sys

try:
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.engine import default_argument_parser, default_setup, launch  # noqa: F401 (scripts, tests)
    from detectron2.utils import comm
    from detectron2.utils.logger import setup_logger
except ImportError as e:
    if (e.name or "").split(".")[0] != "detectron2":
        raise
    sys.exit(
        f"train_net.py needs detectron2, which is not installed in this Python ({sys.executable}): {e}.\n"
        "Install it with the base framework you train (neither is on PyPI):\n"
        "    python tools/install_frameworks.py adelaidet      # CondInst, SOLOv2 (or: sotr, mask2former, sparseinst)\n"
        "README: Install."
    )

from iuq.config import get_iuq_cfg, validate_iuq_config
from iuq.data.custom import DatasetSpecError, register_datasets
from iuq.data import project_datasets
from iuq.engine.models import BaseModelUnavailable, base_model_config_errors, register_base_models, require_config_base_model
from iuq.engine.cli import argument_parser, parse_args
from iuq.engine.trainer import IUQTrainer

# A ``KEY=VALUE`` override: an upper-case config key (``SEED``, ``MODEL.IUQ.ENABLED``), "=", its value.
_KEY_EQUALS = re.compile(r"^([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)=(.*)$", re.S)


def split_overrides(opts):
    """detectron2's ``KEY VALUE`` list, with any ``KEY=VALUE`` item in a key's place split in two
    (a value containing "=" after its key stays a value)."""
    out = []
    for item in opts:
        match = _KEY_EQUALS.match(item) if len(out) % 2 == 0 else None
        out.extend(match.groups() if match else [item])
    return out


def load_config(args):
    """The config of ``args`` (file, then overrides), its base model registered and its
    ``MODEL.IUQ`` validated, the ``--dataset`` datasets registered first (in every process: each
    runs this). Raises :class:`BaseModelUnavailable` naming the package to install,
    :class:`DatasetSpecError` naming a ``--dataset`` that cannot be registered."""
    register_datasets(getattr(args, "dataset", None))
    require_config_base_model(args.config_file)  # e.g. a Mask2Former YAML where it is missing: say so
    cfg = get_iuq_cfg()
    with base_model_config_errors(cfg):  # e.g. a SOTR YAML where SOTR is not installed: say so
        cfg.merge_from_file(args.config_file)
        cfg.merge_from_list(split_overrides(args.opts))
    register_base_models(cfg)  # names the package if cfg's META_ARCHITECTURE is not installed
    validate_iuq_config(cfg)
    return cfg


def setup(args):
    cfg = load_config(args)
    cfg.freeze()
    default_setup(cfg, args)  # logs, and writes OUTPUT_DIR/config.yaml with the overrides
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="iuq")
    # The datasets the project makes itself, drawn / written on first use (iuq.data.project_datasets).
    for is_ours, register in project_datasets():
        names = [n for n in cfg.DATASETS.TRAIN + cfg.DATASETS.TEST if is_ours(n)]
        if names:
            register(names=names)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = IUQTrainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return IUQTrainer.test(cfg, model)
    trainer = IUQTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = parse_args(argument_parser())  # a flag among the overrides: one line saying where it goes
    try:  # before launching workers: a missing framework is one message, not a traceback per process
        cfg = load_config(args)
    except (BaseModelUnavailable, DatasetSpecError) as e:
        sys.exit(str(e))
    if args.check_data:  # once, before any worker: every image read, every annotation checked
        from iuq.data.check import run_check

        if run_check(cfg):
            sys.exit("train_net.py --check-data: the datasets have errors (above); not training")
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
