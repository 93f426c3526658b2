"""Panoptic segmentation with IUQ: the panoptic quickstart data (COCO panoptic format, things and
stuff from the dataset's metadata), and the real Mask2Former trained on it (stuff queries and
stuff samples reach the inter-scene loss; --eval-only prints PQ, PQ^th, PQ^st). The data tests
need no detectron2 to render; the rest skip with the reason where Mask2Former, detectron2 or
panopticapi is missing."""
import json
import sys

import numpy as np
import pytest
import torch

from adelaidet_support import REPO

pytest.importorskip("pycocotools", reason="pycocotools is not installed")


def test_a_panoptic_image_is_covered_by_disjoint_thing_and_stuff_segments():
    from iuq.data import render_panoptic_image, render_quickstart_image

    for index in range(6):
        image, segments = render_panoptic_image(0, "train", index)
        plain, instances = render_quickstart_image(0, "train", index)
        cover = sum(s["mask"].astype(int) for s in segments)
        assert image.shape == (192, 256, 3) and cover.min() == 1 and cover.max() == 1  # a partition
        things = [s for s in segments if s["isthing"]]
        stuff = [s for s in segments if not s["isthing"]]
        assert [s["category_id"] for s in things] == [i["category_id"] for i in instances]  # the same shapes
        assert all(np.array_equal(s["mask"], i["mask"]) for s, i in zip(things, instances))
        assert 1 <= len(stuff) <= 3 and len({s["category_id"] for s in stuff}) == len(stuff)
        assert {s["category_id"] for s in stuff} <= {4, 5, 6}
        foreground = sum(i["mask"] for i in instances).astype(bool)
        assert np.array_equal(image[foreground], plain[foreground])  # things are painted as before


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    pytest.importorskip("detectron2", reason="detectron2 is not installed (not on PyPI; see README)")
    from iuq.data import register_panoptic_quickstart

    root = tmp_path_factory.mktemp("panoptic_quickstart")
    register_panoptic_quickstart(root=str(root))
    return root


def test_registered_as_coco_panoptic_with_things_and_stuff_from_its_metadata(registered):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from PIL import Image

    from iuq.inter.stuff import stuff_flags

    meta = MetadataCatalog.get("iuq_quickstart_panoptic_val")
    assert meta.evaluator_type == "coco_panoptic_seg"
    assert stuff_flags(meta).tolist() == [False, False, False, True, True, True]
    data = json.loads(open(meta.panoptic_json).read())
    assert {c["id"]: c["isthing"] for c in data["categories"]} == {1: 1, 2: 1, 3: 1, 4: 0, 5: 0, 6: 0}
    dicts = DatasetCatalog.get("iuq_quickstart_panoptic_val")
    assert len(dicts) == 16
    d = dicts[0]
    rgb = np.asarray(Image.open(d["pan_seg_file_name"]), dtype=np.int64)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
    assert sorted(np.unique(ids).tolist()) == sorted(s["id"] for s in d["segments_info"])
    for s in d["segments_info"]:  # contiguous classes: things 0-2, stuff 3-5
        assert s["isthing"] == (s["category_id"] < 3) and int((ids == s["id"]).sum()) == s["area"]


def _require_mask2former():
    """Mask2Former and panopticapi, which its panoptic mapper and evaluator import (not on PyPI)."""
    from adelaidet_support import require_mask2former

    require_mask2former()
    pytest.importorskip("panopticapi", reason="panopticapi is not installed (Mask2Former's panoptic mapper imports "
                                              "it; not on PyPI: pip install the folder of "
                                              "github.com/cocodataset/panopticapi, docs/install.md#offline)")


def args_for(out, *opts, eval_only=False):
    sys.path.insert(0, str(REPO))
    import train_net

    argv = ["--config-file", str(REPO / "configs" / "quickstart_panoptic.yaml")] + ["--eval-only"] * eval_only
    return train_net.default_argument_parser().parse_args(argv + ["OUTPUT_DIR", str(out), "SEED", "3"] + list(opts))


def test_stuff_queries_and_stuff_samples_reach_the_inter_scene_loss(registered, tmp_path):
    """A real Mask2Former step on the panoptic quickstart: queries matched to stuff segments carry
    their class, the batch's samples their class and stuff flag, both IUQ losses are finite and
    > 0, and the stuff targets change loss_inter (the same step with every target 0 differs)."""
    _require_mask2former()
    import train_net

    import iuq.engine.trainer as trainer_module
    from iuq.engine.trainer import IUQTrainer

    trainer = IUQTrainer(train_net.setup(args_for(tmp_path)))
    batch = next(trainer._trainer._data_loader_iter)
    with trainer.adapter.capture() as cap:
        trainer.model(batch)
    classes = cap.query_classes.tolist()
    assert any(c >= 3 for c in classes) and any(c < 3 for c in classes), classes  # stuff and thing queries
    def step():  # the same views, the same random points of the matcher
        trainer.view_rng.seed(1)
        torch.manual_seed(0)
        return trainer.forward_losses(batch)

    loss_dict, samples = step()
    assert step()[0]["loss_inter"].item() == loss_dict["loss_inter"].item()  # deterministic
    assert len(trainer.memory) == 0  # forward_losses does not enqueue: the same negatives each time
    for key in ("loss_inter", "loss_equi"):
        assert torch.isfinite(loss_dict[key]) and loss_dict[key].item() > 0, key
    assert samples.stuff.any() and (~samples.stuff).any()
    assert bool(((samples.classes >= 3) == samples.stuff).all())  # stuff exactly for classes 3-5

    calls = []
    original = trainer_module.inter_scene_loss

    def all_negative(*args, **kwargs):
        calls.append(kwargs["query_stuff_classes"])
        return original(*args, **{**kwargs, "query_stuff_classes": None})

    trainer_module.inter_scene_loss = all_negative
    try:
        zeros, _ = step()
    finally:
        trainer_module.inter_scene_loss = original
    assert (calls[0] >= 0).any()  # the trainer passed stuff classes for the stuff queries
    assert zeros["loss_inter"].item() != pytest.approx(loss_dict["loss_inter"].item(), rel=1e-4)


def test_eval_only_prints_pq_pq_things_and_pq_stuff(registered, tmp_path):
    _require_mask2former()
    import train_net

    results = train_net.main(args_for(tmp_path, "MODEL.WEIGHTS", "", eval_only=True))
    pq = results["panoptic_seg"]
    assert {"PQ", "PQ_th", "PQ_st", "SQ", "RQ"} <= set(pq) and all(0 <= pq[k] <= 100 for k in ("PQ", "PQ_th", "PQ_st"))
