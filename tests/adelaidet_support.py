"""Helpers for the tests that run the real AdelaiDet models, or SOTR (imported only where they
exist). AdelaiDet and SOTR are both the package `adet`: an environment has one or the other."""
import importlib.util
import json
import os
from pathlib import Path

import pytest

COCO = Path(os.environ.get("DETECTRON2_DATASETS", "")) / "coco"
REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "CondInst": REPO / "configs/IUQ/CondInst/MS_R_50_1x.yaml",
    "SOLOv2": REPO / "configs/IUQ/SOLOv2/R50_1x.yaml",
    "SOTR": REPO / "configs/IUQ/SOTR/R50.yaml",
}

# Small and quick on a CPU: short side 256, 2 images per step, small memory, random init.
SMALL = [
    "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu",
    "INPUT.MIN_SIZE_TRAIN", "(256,)", "INPUT.MAX_SIZE_TRAIN", "400",
    "INPUT.MIN_SIZE_TEST", "256", "INPUT.MAX_SIZE_TEST", "400",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.001", "DATALOADER.NUM_WORKERS", "0",
    "MODEL.IUQ.MEMORY.SIZE", "2000", "TEST.EVAL_PERIOD", "0", "SEED", "7",
]


# Per model, on top of SMALL. SOTR from random initialisation diverges with FrozenBN and lr 1e-3
# (its classification loss reaches ~1e6 at the first step): train BN from the stem, lr 1e-4.
MODEL_SMALL = {
    "SOTR": ["MODEL.RESNETS.NORM", "BN", "MODEL.BACKBONE.FREEZE_AT", "0", "SOLVER.BASE_LR", "0.0001"],
}


def adet_provides(model_dir):
    """Whether the installed `adet` has ``adet/modeling/<model_dir>`` (condinst: AdelaiDet; sotr:
    SOTR), read from the file system so nothing is imported."""
    try:
        spec = importlib.util.find_spec("adet")
    except (ImportError, ValueError):
        return False
    locations = (spec and spec.submodule_search_locations) or []
    return any((Path(p) / "modeling" / model_dir).is_dir() for p in locations)


def _require_coco():
    if not (COCO / "annotations" / "instances_val2017.json").is_file():
        pytest.skip(f"the real COCO sample is not at {COCO} (set DETECTRON2_DATASETS)", allow_module_level=True)


def require_adelaidet():
    pytest.importorskip("detectron2", reason="detectron2 is not installed (not on PyPI; see README)")
    pytest.importorskip("adet", reason="AdelaiDet (package adet) is not installed (not on PyPI; see README)")
    if not adet_provides("condinst"):
        pytest.skip("the `adet` installed here is not AdelaiDet (SOTR's package is also named adet)",
                    allow_module_level=True)
    _require_coco()


def require_sotr():
    pytest.importorskip("detectron2", reason="detectron2 is not installed (not on PyPI; see README)")
    if not adet_provides("sotr"):
        pytest.skip("SOTR (github.com/easton-cau/SOTR, package adet) is not installed here; it needs "
                    "its own environment (README: SOTR)", allow_module_level=True)
    _require_coco()


def small_cfg(model, *overrides):
    from iuq.config import get_iuq_cfg
    from iuq.models import register_base_models

    register_base_models()
    cfg = get_iuq_cfg()
    cfg.merge_from_file(str(CONFIGS[model]))
    cfg.merge_from_list(SMALL + MODEL_SMALL.get(model, []) + list(overrides))
    return cfg


def register_subset(name, n, out_dir, with_annotations=True):
    """Register the first ``n`` COCO val images as a dataset (with or without annotations)."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    if name in DatasetCatalog.list():
        return
    data = json.loads((COCO / "annotations" / "instances_val2017.json").read_text())
    images = data["images"][:n]
    keep = {im["id"] for im in images}
    subset = {"images": images, "categories": data["categories"]}
    if with_annotations:
        subset["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    path = Path(out_dir) / f"{name}.json"
    path.write_text(json.dumps(subset))
    register_coco_instances(name, {}, str(path), str(COCO / "val2017"))
