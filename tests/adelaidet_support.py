"""Helpers for the tests that run the real AdelaiDet models, or SOTR (imported only where they
exist). AdelaiDet and SOTR are both the package `adet`: an environment has one or the other."""
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

COCO = Path(os.environ.get("DETECTRON2_DATASETS", "")) / "coco"
REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "CondInst": REPO / "configs/IUQ/CondInst/MS_R_50_1x.yaml",
    "SOLOv2": REPO / "configs/IUQ/SOLOv2/R50_1x.yaml",
    "SOTR": REPO / "configs/IUQ/SOTR/R50.yaml",
    "SparseInst": REPO / "configs/IUQ/SparseInst/R50_GIAM.yaml",
    "Mask2Former": REPO / "configs/IUQ/Mask2Former/R50.yaml",
    "SOLQ": REPO / "configs/IUQ/SOLQ/R50.yaml",
}

# Small and quick on a CPU: short side 256, 2 images per step, small memory, random init.
SMALL = [
    "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu",
    "INPUT.MIN_SIZE_TRAIN", "(256,)", "INPUT.MAX_SIZE_TRAIN", "400",
    "INPUT.MIN_SIZE_TEST", "256", "INPUT.MAX_SIZE_TEST", "400",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.001", "DATALOADER.NUM_WORKERS", "0",
    "MODEL.IUQ.MEMORY.SIZE", "2000", "TEST.EVAL_PERIOD", "0", "SEED", "7",
    "MODEL.IUQ.WARMUP_ITERS", "0",  # IUQ's losses at the paper's full weight from the first step
]


# Per model, on top of SMALL. SOTR from random initialisation diverges with FrozenBN and lr 1e-3
# (its classification loss reaches ~1e6 at the first step): train BN from the stem, lr 1e-4.
MODEL_SMALL = {
    "SOTR": ["MODEL.RESNETS.NORM", "BN", "MODEL.BACKBONE.FREEZE_AT", "0", "SOLVER.BASE_LR", "0.0001"],
    # SparseInst from random init with FrozenBN: loss_ce ~3e3 and loss_mask ~1e3 at the first step.
    "SparseInst": ["MODEL.RESNETS.NORM", "BN", "SOLVER.BASE_LR", "0.00005"],
    # Mask2Former: its LSJ crop at 256 px (INPUT.IMAGE_SIZE, not MIN_SIZE_TRAIN), float32 on the
    # CPU, its lr, and fewer transformer layers (its pixel decoder's 6 and decoder's 9 -> 2 and 3).
    "Mask2Former": ["INPUT.IMAGE_SIZE", "256", "SOLVER.AMP.ENABLED", "False", "SOLVER.BASE_LR", "0.0001",
                    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "2", "MODEL.MASK_FORMER.DEC_LAYERS", "4"],
    # SOLQ: short side 160 (its crop branch resizes to 400-600 first, then to this), fewer encoder /
    # decoder layers (6 / 6 -> 1 / 2), 50 queries, a 4-image memory, its lr.
    "SOLQ": ["INPUT.MIN_SIZE_TRAIN", "(160,)", "INPUT.MAX_SIZE_TRAIN", "200", "INPUT.MIN_SIZE_TEST", "160",
             "INPUT.MAX_SIZE_TEST", "200", "MODEL.SOLQ.ENC_LAYERS", "1", "MODEL.SOLQ.DEC_LAYERS", "2",
             "MODEL.SOLQ.NUM_QUERIES", "50", "MODEL.IUQ.MEMORY.SIZE", "4", "SOLVER.BASE_LR", "0.0002"],
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


def require_mask2former():
    pytest.importorskip("detectron2", reason="detectron2 is not installed (not on PyPI; see README)")
    pytest.importorskip("mask2former", reason="Mask2Former is not importable (python tools/install_frameworks.py "
                                              "mask2former; README: Install)")
    _require_coco()


def require_sparseinst():
    pytest.importorskip("detectron2", reason="detectron2 is not installed (not on PyPI; see README)")
    pytest.importorskip("sparseinst", reason="SparseInst is not installed (python tools/install_frameworks.py "
                                              "sparseinst; README: Install)")
    _require_coco()


def require_solq():
    pytest.importorskip("detectron2", reason="detectron2 is not installed (not on PyPI; see README)")
    pytest.importorskip("solq.models.solq", reason="SOLQ (package solq) is not importable (python "
                        "tools/install_frameworks.py solq --source SOLQ-97f537c.tar.gz; docs/install.md, SOLQ)")
    _require_coco()


# Issue 30's setting: the real SOLOv2 R50 recipe (configs/IUQ/SOLOv2/R50_1x.yaml, its lr and
# warm-ups) from random initialisation on the COCO sample, 2 images a step, short side 320, a
# memory of 5,000 (studies/solov2_r50_instability/probe.py trains it too).
R50_COCO_SAMPLE = [
    "MODEL.WEIGHTS", "", "SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(320,)", "INPUT.MAX_SIZE_TRAIN", "533",
    "MODEL.IUQ.MEMORY.SIZE", "5000", "DATASETS.TRAIN", "('coco_2017_train',)", "DATASETS.TEST", "()",
    "MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0",
]


def own_mask_p_per_step(trainer, steps):
    """Train ``trainer`` (an IUQTrainer, IUQ's losses on) ``steps`` steps; per step, the largest
    own-instance probability among the matched queries the dead-mask monitor watches (a step is
    dead, for the monitor, when it is below ``iuq.engine.hooks.DEAD_MASK_P``)."""
    from detectron2.utils.events import EventStorage

    seen = []
    monitor = trainer.watch_dead_masks

    def watch(cap, n):
        seen.append(float(trainer.own_mask_probability(cap, n).max()))
        monitor(cap, n)

    trainer.watch_dead_masks = watch
    # The trajectory is chaotic, and a sum splits differently over another number of threads: one
    # thread, whatever the machine's cores or OMP_NUM_THREADS, gives the same trajectory every run
    # on one machine. Another CPU (its vector width) still rounds differently, and the trajectory
    # drifts: the tests assert the monitor's dead/alive, not a level of the probability.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with EventStorage(0):
            for it in range(steps):
                trainer.iter = it
                loss_dict, samples = trainer.forward_losses(next(trainer._trainer._data_loader_iter))
                trainer.optimizer.zero_grad()
                sum(loss_dict.values()).backward()
                trainer.memory.enqueue(samples.detach())
                trainer.optimizer.step()
                trainer.scheduler.step()
    finally:
        torch.set_num_threads(threads)
    return seen


def small_cfg(model, *overrides):
    from iuq.config import get_iuq_cfg
    from iuq.engine.models import register_base_models

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


# The COCO sample's two images without annotations (ids 250 and 508), by index in its val json.
EMPTY_IMAGES = (42, 92)


def register_crowd_only(name, out_dir):
    """The COCO sample with image 0's annotations all turned into crowd regions (``iscrowd`` 1):
    detectron2's mapper drops crowd regions, so image 0 reaches the model with no instance."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    if name in DatasetCatalog.list():
        return
    data = json.loads((COCO / "annotations" / "instances_val2017.json").read_text())
    first = data["images"][0]["id"]
    for a in data["annotations"]:
        if a["image_id"] == first:
            a["iscrowd"] = 1
    path = Path(out_dir) / f"{name}.json"
    path.write_text(json.dumps(data))
    register_coco_instances(name, {}, str(path), str(COCO / "val2017"))


def empty_image_batches(trainer, dataset):
    """Mapped batches of ``dataset`` (the COCO sample or its crowd-only copy) as the trainer's loader
    maps them: (name, batch, ids of its images without instances, how many there should be)."""
    from detectron2.data import DatasetCatalog, DatasetMapper

    cfg = trainer.cfg
    dicts = DatasetCatalog.get(dataset)
    mapper = DatasetMapper(**{**DatasetMapper.from_config(cfg, is_train=True), "use_instance_mask": True})
    a, b = EMPTY_IMAGES
    crowd = dataset.endswith("crowd_only")
    cases = [("crowd-only and empty", (0, b), 2), ("crowd-only and full", (0, 1), 1)] if crowd else [
        ("none empty", (1, 2), 0), ("some empty", (1, a), 1), ("all empty", (a, b), 2)]
    for name, idx, expected in cases:
        batch = [mapper(dicts[i]) for i in idx]
        yield name, batch, {d["image_id"] for d in batch if len(d["instances"]) == 0}, expected


def check_trains_through_empty_images(trainer, dataset, mask_key, cls_key):
    """IUQ's step on batches with 0, some and all images without instances: finite losses that all
    stay on the graph, no query or pixel sample from an empty image, all-zero mask losses when no
    image has an instance (and a classification loss that still trains), a backward that works."""
    seen = set()
    for name, batch, empty_ids, expected in empty_image_batches(trainer, dataset):
        assert len(empty_ids) == expected, name
        loss_dict, samples = trainer.forward_losses(batch)
        for key, value in loss_dict.items():
            assert torch.isfinite(value) and value.requires_grad, (name, key, value)
        assert not empty_ids & set(samples.image_ids.tolist()), name
        if len(empty_ids) == len(batch):
            assert len(samples) == 0, name
            for key in (mask_key, "loss_inter", "loss_equi"):
                assert loss_dict[key].item() == 0, (name, key)
            assert loss_dict[cls_key].item() > 0, name
        else:
            assert len(samples) > 0 and loss_dict[mask_key].item() > 0 and loss_dict["loss_equi"].item() > 0, name
        trainer.optimizer.zero_grad()
        sum(loss_dict.values()).backward()
        assert all(torch.isfinite(p.grad).all() for p in trainer.model.parameters() if p.grad is not None), name
        trainer.memory.enqueue(samples.detach())
        seen.add(name)
    return seen


def run_hiding(package, code_after):
    """Run ``code_after`` in a child Python (in the repository) where ``package`` cannot be
    imported, installed here or not: (returncode, stderr)."""
    import subprocess
    import sys

    code = f"""
import importlib.abc, runpy, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == {package!r}:
            raise ModuleNotFoundError("No module named %r" % name, name=name)
sys.meta_path.insert(0, Hide())
{code_after}
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    return result.returncode, result.stderr


def train_net_hiding(package, *argv):
    """``python train_net.py ARGV`` where ``package`` cannot be imported: (returncode, stderr)."""
    return run_hiding(package, f"sys.argv = ['train_net.py', *{list(argv)!r}]\n"
                               "runpy.run_path('train_net.py', run_name='__main__')")


def assert_resume_restores_the_memory(args_for, run):
    """A 2-iteration ``train_net`` run in ``run``, resumed as ``--resume`` does (the last
    checkpoint, memory included): the trainer starts at iteration 2 with the saved memory.
    ``args_for(out, *opts, resume=...)``: the test file's argument builder."""
    _train_net_importable()
    import train_net
    from iuq.engine.trainer import IUQTrainer

    saved = torch.load(run / "model_final.pth", map_location="cpu", weights_only=False)["iuq_memory"]
    trainer = IUQTrainer(train_net.setup(args_for(run, "SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()", resume=True)))
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 2
    restored = trainer.memory.samples()
    assert len(restored) == len(saved["embeddings"]) > 0
    torch.testing.assert_close(restored.embeddings, saved["embeddings"].to(restored.embeddings.dtype))


def assert_final_weights_load_into_the_stock_model(args_for, run, meta_architecture):
    """``run``'s ``model_final.pth`` loads into the stock model (built from the same config, no IUQ
    in it) with ``strict=True`` and no missing or unexpected keys."""
    _train_net_importable()
    import train_net
    from detectron2.modeling import build_model

    stock = build_model(train_net.setup(args_for(run)))
    assert type(stock).__name__ == meta_architecture
    state = torch.load(run / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    result = stock.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def _train_net_importable():
    import sys

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
