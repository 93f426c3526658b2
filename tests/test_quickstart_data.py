"""The quickstart dataset: deterministic, idempotent, exact masks, registered for detectron2."""
import json
import os

import numpy as np
import pytest

pytest.importorskip("detectron2", reason="registering the quickstart dataset needs detectron2")
pytest.importorskip("pycocotools", reason="the COCO json is checked with pycocotools")

from PIL import Image  # noqa: E402
from pycocotools import mask as mask_util  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402

from iuq.data import (  # noqa: E402
    QUICKSTART_CATEGORIES,
    default_quickstart_root,
    generate_quickstart,
    register_quickstart,
    render_quickstart_image,
)

SMALL = dict(seed=0, num_train=12, num_val=4)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("quickstart"))
    return root, generate_quickstart(root, **SMALL)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def test_deterministic_from_seed(generated, tmp_path):
    root, paths = generated
    again = generate_quickstart(str(tmp_path / "a"), **SMALL)
    for split in ("train", "val"):
        assert read(paths[split][0]) == read(again[split][0])
        first = sorted(os.listdir(paths[split][1]))
        assert first == sorted(os.listdir(again[split][1]))
        assert read(os.path.join(paths[split][1], first[0])) == read(os.path.join(again[split][1], first[0]))
    other = generate_quickstart(str(tmp_path / "b"), **dict(SMALL, seed=1))
    assert read(paths["train"][0]) != read(other["train"][0])


def test_idempotent(generated):
    root, paths = generated
    before = {split: os.stat(json_file).st_mtime_ns for split, (json_file, _) in paths.items()}
    image = os.path.join(paths["train"][1], "000000.png")
    image_mtime = os.stat(image).st_mtime_ns
    assert generate_quickstart(root, **SMALL) == paths
    assert {split: os.stat(j).st_mtime_ns for split, (j, _) in paths.items()} == before
    assert os.stat(image).st_mtime_ns == image_mtime
    # No temp files left behind.
    for _, image_root in paths.values():
        assert not [f for f in os.listdir(image_root) if f.startswith(".tmp-")]


def test_regenerates_on_other_seed(tmp_path):
    root = str(tmp_path)
    first = read(generate_quickstart(root, **SMALL)["val"][0])
    second = read(generate_quickstart(root, **dict(SMALL, seed=3))["val"][0])
    assert first != second and json.loads(second)["info"]["seed"] == 3


def test_coco_json_and_exact_masks(generated):
    _, paths = generated
    for split, (json_file, image_root) in paths.items():
        coco = COCO(json_file)
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["circle", "square", "triangle"]
        img_ids = coco.getImgIds()
        assert len(img_ids) == SMALL[f"num_{split}"]
        counts = [len(coco.getAnnIds(imgIds=[i])) for i in img_ids]
        assert min(counts) >= 2 and max(counts) <= 6 and np.mean(counts) >= 3
        for index, img_id in enumerate(sorted(img_ids)):
            info = coco.loadImgs(img_id)[0]
            pixels = np.asarray(Image.open(os.path.join(image_root, info["file_name"])).convert("RGB"))
            assert pixels.shape == (info["height"], info["width"], 3) == (192, 256, 3)
            image, instances = render_quickstart_image(SMALL["seed"], split, index)
            assert np.array_equal(pixels, image)  # PNG: the file holds exactly what was drawn

            anns = coco.loadAnns(coco.getAnnIds(imgIds=[img_id]))
            assert len(anns) == len(instances)
            seen = np.zeros(pixels.shape[:2], dtype=bool)
            for ann, inst in zip(anns, instances):
                assert ann["iscrowd"] == 0 and isinstance(ann["segmentation"], list)
                mask = coco.annToMask(ann).astype(bool)
                # The json's polygons rasterise to exactly the painted pixels of the instance.
                assert mask.any() and np.array_equal(mask, inst["mask"])
                assert ann["area"] == mask.sum()
                ys, xs = np.nonzero(mask)
                x0, y0 = xs.min(), ys.min()
                expected = [x0, y0, xs.max() - x0 + 1, ys.max() - y0 + 1]
                assert ann["bbox"] == pytest.approx(expected)
                assert not (seen & mask).any()  # instances never share a pixel
                seen |= mask


def test_instances_touch_or_overlap_somewhere(generated):
    """Some instances are adjacent (masks within 2 px): telling them apart must matter."""
    import torch
    import torch.nn.functional as F

    def grow(m):  # dilate by 2 px (a 5x5 square)
        return F.max_pool2d(torch.from_numpy(m).float()[None, None], 5, 1, 2)[0, 0].numpy() > 0

    _, paths = generated
    coco = COCO(paths["train"][0])
    close_pairs = 0
    for img_id in coco.getImgIds():
        masks = [coco.annToMask(a).astype(bool) for a in coco.loadAnns(coco.getAnnIds(imgIds=[img_id]))]
        grown = [grow(m) for m in masks]
        close_pairs += sum((grown[i] & masks[j]).any()
                           for i in range(len(masks)) for j in range(i + 1, len(masks)))
    assert close_pairs >= 3


def test_polygons_are_valid_for_detectron2(generated):
    _, paths = generated
    data = json.loads(read(paths["train"][0]))
    for ann in data["annotations"]:
        assert ann["segmentation"] and all(len(p) >= 6 and len(p) % 2 == 0 for p in ann["segmentation"])
        rle = mask_util.merge(mask_util.frPyObjects(ann["segmentation"], 192, 256))
        assert mask_util.area(rle) == ann["area"]


def test_default_root_follows_env(monkeypatch):
    monkeypatch.delenv("IUQ_QUICKSTART_ROOT", raising=False)
    monkeypatch.setenv("DETECTRON2_DATASETS", "/some/read-only/datasets")  # not written into
    assert default_quickstart_root() == os.path.join("datasets", "iuq_quickstart")
    monkeypatch.setenv("IUQ_QUICKSTART_ROOT", "/elsewhere/qs")
    assert default_quickstart_root() == "/elsewhere/qs"
    monkeypatch.delenv("IUQ_QUICKSTART_ROOT")
    assert default_quickstart_root() == os.path.join("datasets", "iuq_quickstart")


def test_register_twice(tmp_path, monkeypatch):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    monkeypatch.setenv("IUQ_QUICKSTART_ROOT", str(tmp_path))
    names = register_quickstart()
    assert names == ["iuq_quickstart_train", "iuq_quickstart_val"]
    assert register_quickstart() == names  # second call: a no-op, no error
    train = DatasetCatalog.get("iuq_quickstart_train")
    val = DatasetCatalog.get("iuq_quickstart_val")
    assert (len(train), len(val)) == (64, 16)
    assert all(len(d["annotations"]) >= 2 for d in train)
    assert os.path.isfile(train[0]["file_name"])
    assert train[0]["annotations"][0]["category_id"] in (0, 1, 2)  # contiguous, as detectron2 expects
    for name in names:
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == [c["name"] for c in QUICKSTART_CATEGORIES]
        assert meta.evaluator_type == "coco" and meta.json_file.startswith(str(tmp_path))
    assert not {d["image_id"] for d in train} & {d["image_id"] for d in val}



def polygons_to_mask(polygons, height, width):
    return mask_util.decode(mask_util.merge(mask_util.frPyObjects(polygons, height, width))).astype(bool)


@pytest.mark.parametrize("mask_format", ["polygon", "bitmask"])
def test_detectron2_mapper_reads_it(tmp_path, mask_format):
    """Both of detectron2's INPUT.MASK_FORMATs load the masks (CondInst: polygon, SOLOv2: bitmask)."""
    import detectron2.data.transforms as T
    from detectron2.data import DatasetMapper
    from detectron2.data.datasets import load_coco_json

    paths = generate_quickstart(str(tmp_path), seed=0, num_train=2, num_val=1)
    record = load_coco_json(*paths["train"])[0]
    mapper = DatasetMapper(is_train=True, augmentations=[T.ResizeShortestEdge(384, 1000), T.RandomFlip()],
                           image_format="BGR", use_instance_mask=True, instance_mask_format=mask_format)
    out = mapper(record)
    assert tuple(out["image"].shape) == (3, 384, 512)
    masks = out["instances"].gt_masks
    assert len(masks) == len(record["annotations"])
    if mask_format == "polygon":
        dense = [polygons_to_mask(p, 384, 512) for p in masks.polygons]
    else:
        dense = masks.tensor.numpy()
    assert all(m.sum() > 0 for m in dense)


def test_coco_evaluator_scores_ground_truth_perfectly(tmp_path, monkeypatch):
    """register_quickstart's val split works with COCOEvaluator: its own masks score AP 100."""
    import torch
    from detectron2.data import DatasetCatalog
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import Boxes, BoxMode, Instances

    monkeypatch.setenv("IUQ_QUICKSTART_ROOT", str(tmp_path))
    register_quickstart()
    evaluator = COCOEvaluator("iuq_quickstart_val", tasks=("segm",), distributed=False,
                              output_dir=str(tmp_path / "eval"))
    evaluator.reset()
    for record in DatasetCatalog.get("iuq_quickstart_val"):
        h, w, anns = record["height"], record["width"], record["annotations"]
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]
        instances = Instances((h, w))
        instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        instances.scores = torch.ones(len(anns))
        instances.pred_classes = torch.tensor([a["category_id"] for a in anns])
        instances.pred_masks = torch.from_numpy(
            np.stack([polygons_to_mask(a["segmentation"], h, w) for a in anns]))
        evaluator.process([{"image_id": record["image_id"]}], [{"instances": instances}])
    assert evaluator.evaluate()["segm"]["AP"] == pytest.approx(100.0)
