"""Images without instances (background images kept by ``DATALOADER.FILTER_EMPTY_ANNOTATIONS
False``, crowd-only images) train with IUQ on the real CondInst and SOLOv2; a dataset without
segmentation fails before training. SOTR's counterpart is in ``test_integration_sotr.py``.

Skipped (with the reason) where detectron2 / AdelaiDet or ../shared/datasets are missing."""
import json

import pytest
import torch

from adelaidet_support import (COCO, CONFIGS, MODEL_SMALL, SMALL, check_trains_through_empty_images,
                               empty_image_batches, register_crowd_only, require_adelaidet, small_cfg)

require_adelaidet()

import train_net  # noqa: E402
from iuq.engine.trainer import IUQTrainer  # noqa: E402

# Per model: its base mask loss and its classification loss.
KEYS = {"CondInst": ("loss_mask", "loss_fcos_cls"), "SOLOv2": ("loss_ins", "loss_cate")}


def trainer_for(name, tmp_path, dataset="coco_2017_val", *opts):
    cfg = small_cfg(name, "OUTPUT_DIR", str(tmp_path), "DATASETS.TRAIN", f"('{dataset}',)", "DATASETS.TEST", "()",
                    "DATALOADER.FILTER_EMPTY_ANNOTATIONS", "False", *opts)
    return IUQTrainer(cfg)


@pytest.mark.parametrize("name", ["CondInst", "SOLOv2"])
def test_batches_with_images_without_instances_train(name, tmp_path):
    trainer = trainer_for(name, tmp_path)
    seen = check_trains_through_empty_images(trainer, "coco_2017_val", *KEYS[name])
    assert seen == {"none empty", "some empty", "all empty"}


@pytest.mark.parametrize("name", ["CondInst", "SOLOv2"])
def test_crowd_only_images_train_as_images_without_instances(name, tmp_path):
    register_crowd_only("iuq_test_crowd_only", tmp_path)
    trainer = trainer_for(name, tmp_path, "iuq_test_crowd_only")
    seen = check_trains_through_empty_images(trainer, "iuq_test_crowd_only", *KEYS[name])
    assert seen == {"crowd-only and empty", "crowd-only and full"}


def test_solov2_loss_on_a_batch_without_instances_is_its_all_background_loss(tmp_path):
    """AdelaiDet's SOLOv2 fails on such a batch; the adapter's stand-in must leave ``loss_cate``
    exactly the focal loss of every cell against background, over (0 instances + 1)."""
    from fvcore.nn import sigmoid_focal_loss_jit

    trainer = trainer_for("SOLOv2", tmp_path, "coco_2017_val", "MODEL.IUQ.ENABLED", "False")
    model, seen = trainer.model, {}
    wrapped = model.loss

    def spy(cate_preds, kernel_preds, ins_pred, targets):
        seen["cate_preds"] = cate_preds
        return wrapped(cate_preds, kernel_preds, ins_pred, targets)

    model.loss = spy
    batch = next(b for name, b, _, _ in empty_image_batches(trainer, "coco_2017_val") if name == "all empty")
    losses = trainer.forward_losses(batch)[0]
    preds = torch.cat([p.permute(0, 2, 3, 1).reshape(-1, model.num_classes) for p in seen["cate_preds"]])
    expected = model.focal_loss_weight * sigmoid_focal_loss_jit(
        preds, torch.zeros_like(preds), gamma=model.focal_loss_gamma, alpha=model.focal_loss_alpha, reduction="sum")
    assert losses["loss_cate"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert losses["loss_ins"].item() == 0 and losses["loss_ins"].requires_grad
    assert set(losses) == {"loss_ins", "loss_cate"}  # IUQ off: the twin trains through it too


@pytest.mark.parametrize("name", ["CondInst", "SOLOv2"])
def test_training_keeps_background_images_to_the_end(name, tmp_path):
    """As a user runs it: FILTER_EMPTY_ANNOTATIONS False on a dataset whose images are half without
    instances (the sample's two, and two with), 4 steps of 2 images: every image is drawn."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    data = json.loads((COCO / "annotations" / "instances_val2017.json").read_text())
    annotated = {a["image_id"] for a in data["annotations"]}
    images = [im for im in data["images"] if im["id"] not in annotated][:2] + data["images"][:2]
    ids = {im["id"] for im in images}
    subset = {"images": images, "categories": data["categories"],
              "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}
    name_ds = f"iuq_test_half_background_{name}"
    (tmp_path / "half.json").write_text(json.dumps(subset))
    if name_ds not in DatasetCatalog.list():
        register_coco_instances(name_ds, {}, str(tmp_path / "half.json"), str(COCO / "val2017"))
    out = tmp_path / "out"
    args = train_net.default_argument_parser().parse_args(["--config-file", str(CONFIGS[name])])
    args.opts = SMALL + MODEL_SMALL.get(name, []) + [
        "OUTPUT_DIR", str(out), "DATASETS.TRAIN", f"('{name_ds}',)", "DATASETS.TEST", "()",
        "DATALOADER.FILTER_EMPTY_ANNOTATIONS", "False", "SOLVER.MAX_ITER", "4"]
    train_net.main(args)
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert metrics[-1]["iteration"] == 3
    for key in ("loss_inter", "loss_equi", KEYS[name][0]):
        assert all(key in m and 0 <= m[key] < float("inf") for m in metrics), key


def test_dataset_without_segmentation_fails_before_training(tmp_path):
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    data = json.loads((COCO / "annotations" / "instances_val2017.json").read_text())
    for a in data["annotations"]:
        a.pop("segmentation")
    (tmp_path / "boxes_only.json").write_text(json.dumps(data))
    if "iuq_test_boxes_only" not in DatasetCatalog.list():
        register_coco_instances("iuq_test_boxes_only", {}, str(tmp_path / "boxes_only.json"), str(COCO / "val2017"))
    with pytest.raises(ValueError, match=r"(?s)instance masks, but 9\d\d of the 9\d\d instance annotations of "
                                         r"dataset 'iuq_test_boxes_only'.*image \d+ \(.*\.jpg\)"):
        trainer_for("CondInst", tmp_path, "iuq_test_boxes_only")
    trainer_for("CondInst", tmp_path, "iuq_test_boxes_only", "MODEL.IUQ.ENABLED", "False")  # IUQ off: not IUQ's call
