"""The copy-paste testbed (iuq.data.copy_paste, tools/make_copy_paste.py) built from the real COCO
sample: masks, boxes and areas consistent, every instance's source recorded and none from a
held-out image in a training scene (nor a held-out background), deterministic for a seed, and
the json read by detectron2 (and its mapper, with the masks as bitmasks or polygons)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pycocotools")

from iuq.data.copy_paste import (  # noqa: E402
    generate_copy_paste_split,
    is_copy_paste_dataset,
    make_copy_paste,
    objects_json,
    register_copy_paste,
    split_image_ids,
)

REPO = Path(__file__).resolve().parents[1]
COCO = Path(os.environ.get("DETECTRON2_DATASETS", "")) / "coco"
SOURCE = COCO / "annotations" / "instances_val2017.json"
if not SOURCE.is_file():
    pytest.skip(f"the real COCO sample is not at {COCO} (set DETECTRON2_DATASETS)", allow_module_level=True)
IMAGES = str(COCO / "val2017")
SMALL = dict(image_size=(192, 256))


@pytest.fixture(scope="module")
def coco():
    return json.loads(SOURCE.read_text())


@pytest.fixture(scope="module")
def built(coco, tmp_path_factory):
    out = tmp_path_factory.mktemp("copy_paste")
    return out, {split: make_copy_paste(coco, IMAGES, split, n, str(out), **SMALL)
                 for split, n in (("train", 12), ("val", 6))}


def decoded(ann, h, w):
    from pycocotools import mask as mask_util

    seg = ann["segmentation"]
    rle = mask_util.merge(mask_util.frPyObjects(seg, h, w)) if isinstance(seg, list) else seg
    return mask_util.decode(rle).astype(bool)


def test_the_split_is_by_image_id_disjoint_seeded_and_complete():
    ids = list(range(100, 228))
    train, held = split_image_ids(ids, 0.25, seed=0)
    assert len(held) == 32 and not set(train) & set(held) and sorted(train + held) == ids
    assert (train, held) == split_image_ids(reversed(ids), 0.25, seed=0)  # by id, not by order
    assert held != split_image_ids(ids, 0.25, seed=1)[1]


def test_masks_boxes_and_areas_are_consistent_and_instances_do_not_overlap(built):
    _, data = built
    for split in ("train", "val"):
        d = data[split]
        assert len(d["images"]) and len(d["annotations"]) >= 2 * len(d["images"])
        for im in d["images"]:
            anns = [a for a in d["annotations"] if a["image_id"] == im["id"]]
            masks = []
            for a in anns:
                m = decoded(a, im["height"], im["width"])
                ys, xs = np.nonzero(m)
                assert a["area"] == m.sum() >= 64
                assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
                assert a["iscrowd"] == 0
                masks.append(m)
            total = np.sum(masks, axis=0)
            # A later paste took its pixels from every earlier mask: a pasted instance overlaps
            # nothing (the background's own COCO masks may overlap each other, as in COCO).
            for a, m in zip(anns, masks):
                if a["source_image_id"] != im["background_image_id"]:
                    assert (total[m] == 1).all()


def test_every_instance_is_traced_to_its_part_and_no_held_out_image_reaches_training(built, coco):
    _, data = built
    info = data["train"]["info"]["iuq_copy_paste"]
    train_ids, held_ids = set(info["train_image_ids"]), set(info["held_out_image_ids"])
    assert not train_ids & held_ids and len(train_ids | held_ids) == len(coco["images"])
    source_image = {a["id"]: a["image_id"] for a in coco["annotations"]}
    for split, part in (("train", train_ids), ("val", held_ids)):
        d = data[split]
        for a in d["annotations"]:
            assert a["source_image_id"] in part
            assert source_image[a["source_annotation_id"]] == a["source_image_id"]
        for im in d["images"]:
            assert im["background_image_id"] in part
            assert set(im["source_image_ids"]) == {a["source_image_id"] for a in d["annotations"]
                                                   if a["image_id"] == im["id"]}
    train_sources = {a["source_image_id"] for a in data["train"]["annotations"]}
    assert not train_sources & held_ids and len(train_sources) > 5  # many source images, none held out
    pasted = [a for a in data["train"]["annotations"]
              if a["source_image_id"] != data["train"]["images"][a["image_id"] - 1]["background_image_id"]]
    assert len(pasted) > len(data["train"]["images"])  # most are pasted, not the background's own


def test_the_same_seed_gives_the_same_scenes_and_scene_k_does_not_depend_on_how_many(built, coco, tmp_path):
    out, data = built
    again = make_copy_paste(coco, IMAGES, "val", 4, str(tmp_path), **SMALL)
    first4 = [im for im in data["val"]["images"] if im["id"] <= 4]
    assert again["images"] == first4
    assert again["annotations"] == [a for a in data["val"]["annotations"] if a["image_id"] <= 4]
    for im in first4:
        assert (tmp_path / "val" / im["file_name"]).read_bytes() == (out / "val" / im["file_name"]).read_bytes()
    other = make_copy_paste(coco, IMAGES, "val", 4, str(tmp_path / "seed1"), seed=1, **SMALL)
    assert other["annotations"] != again["annotations"]


@pytest.mark.parametrize("mask_format", ["rle", "polygon"])
def test_the_json_loads_and_maps_with_detectron2(coco, tmp_path, mask_format):
    pytest.importorskip("detectron2")
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog, DatasetMapper
    from detectron2.data.datasets import register_coco_instances

    d = make_copy_paste(coco, IMAGES, "train", 3, str(tmp_path), mask_format=mask_format, **SMALL)
    path = tmp_path / "train.json"
    path.write_text(json.dumps(d))
    name = f"test_copy_paste_{mask_format}"
    register_coco_instances(name, {}, str(path), str(tmp_path / "train"))
    try:
        dicts = DatasetCatalog.get(name)
        assert len(dicts) == 3 and sum(len(r["annotations"]) for r in dicts) == len(d["annotations"])
        cfg = get_cfg()
        cfg.INPUT.MASK_FORMAT = "bitmask" if mask_format == "rle" else "polygon"
        mapper = DatasetMapper(**{**DatasetMapper.from_config(cfg, is_train=True), "use_instance_mask": True})
        mapped = mapper(dicts[0])
        assert len(mapped["instances"]) == len(dicts[0]["annotations"]) > 0
        assert mapped["instances"].has("gt_masks")
    finally:
        DatasetCatalog.remove(name)


def test_named_datasets_are_built_once_and_registered(tmp_path):
    pytest.importorskip("detectron2")
    from detectron2.data import DatasetCatalog, MetadataCatalog

    assert is_copy_paste_dataset("iuq_copy_paste_train") and is_copy_paste_dataset("iuq_copy_paste_val_40")
    assert not is_copy_paste_dataset("iuq_copy_paste_test") and not is_copy_paste_dataset("coco_2017_val")
    names = ["iuq_copy_paste_train_3", "iuq_copy_paste_val_2"]
    try:
        register_copy_paste(names, root=str(tmp_path), **SMALL)
        json_file = MetadataCatalog.get("iuq_copy_paste_train_3").json_file
        stamp = os.stat(json_file).st_mtime_ns
        assert len(DatasetCatalog.get("iuq_copy_paste_val_2")) == 2
        assert generate_copy_paste_split("train", 3, str(tmp_path), **SMALL)[0] == json_file
        assert os.stat(json_file).st_mtime_ns == stamp  # found, not rebuilt
    finally:
        for n in names:
            if n in DatasetCatalog.list():
                DatasetCatalog.remove(n)
                MetadataCatalog.remove(n)


def test_the_objects_twin_is_the_same_scenes_in_one_category(built, tmp_path):
    _, data = built
    path = tmp_path / "val.json"
    path.write_text(json.dumps(data["val"]))
    out = objects_json(str(path))
    assert out == str(tmp_path / "val_objects.json")
    twin = json.loads(Path(out).read_text())
    assert twin["categories"] == [{"id": 1, "name": "object", "supercategory": "object"}]
    assert twin["images"] == data["val"]["images"]
    assert len(twin["annotations"]) == len(data["val"]["annotations"]) > 0
    for a, b in zip(twin["annotations"], data["val"]["annotations"]):
        assert a["category_id"] == 1 and a["source_category_id"] == b["category_id"]
        assert {k: v for k, v in a.items() if k not in ("category_id", "source_category_id")} == \
            {k: v for k, v in b.items() if k != "category_id"}
    assert len({b["category_id"] for b in data["val"]["annotations"]}) > 1  # the twin did merge classes
    mtime = os.stat(out).st_mtime_ns
    assert objects_json(str(path)) == out and os.stat(out).st_mtime_ns == mtime  # found, not rewritten
    path.write_text(json.dumps({**data["val"], "annotations": data["val"]["annotations"][:1]}))  # the source changed
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))
    assert len(json.loads(Path(objects_json(str(path))).read_text())["annotations"]) == 1


def test_the_objects_datasets_register_with_one_class(tmp_path):
    pytest.importorskip("detectron2")
    from detectron2.data import DatasetCatalog, MetadataCatalog

    assert is_copy_paste_dataset("iuq_copy_paste_objects_train") and is_copy_paste_dataset("iuq_copy_paste_objects_val_4")
    name = "iuq_copy_paste_objects_val_2"
    try:
        register_copy_paste([name], root=str(tmp_path), **SMALL)
        assert MetadataCatalog.get(name).json_file.endswith("val_objects.json")  # the evaluator's ground truth
        dicts = DatasetCatalog.get(name)
        assert len(dicts) == 2 and {a["category_id"] for r in dicts for a in r["annotations"]} == {0}
        assert MetadataCatalog.get(name).thing_classes == ["object"]  # set by detectron2's loader
    finally:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_the_tool_writes_both_splits(tmp_path):
    out = tmp_path / "cp"
    r = subprocess.run([sys.executable, str(REPO / "tools/make_copy_paste.py"), "--out", str(out), "--train", "2",
                        "--val", "1", "--size", "96", "128", "--json", str(SOURCE), "--images", IMAGES],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "train: 2 scenes" in r.stdout and "val: 1 scenes" in r.stdout
    for split, n in (("train", 2), ("val", 1)):
        d = json.loads((out / f"{split}.json").read_text())
        assert len(d["images"]) == n and all((out / split / im["file_name"]).is_file() for im in d["images"])
