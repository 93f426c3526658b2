"""The textures testbed (``appearance="per_instance"``): instance appearance drawn per instance,
independent of the image, unlike the look-alike quickstart's; exact masks; disjoint ids;
deterministic; registered by name. And the quickstart's look-alike images are unchanged by the
generator's second painter (pinned hashes of images drawn before it existed)."""
import hashlib
import json

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools", reason="the masks are rasterised with pycocotools")

from pycocotools.coco import COCO  # noqa: E402

from iuq.data.quickstart import (  # noqa: E402
    TEXTURES_CATEGORIES,
    generate_quickstart,
    generate_textures,
    is_quickstart_dataset,
    is_textures_dataset,
    render_quickstart_image,
)
from iuq.evaluation.measures import between_image_share  # noqa: E402

SIZE = (128, 160)


def _colour_statistics(appearance, image_size, images=16):
    """(between-image share of the instances' mean-colour variance, median over images of the
    mean colour distance between two instances of the same image)."""
    colours, groups, within = [], [], []
    for index in range(images):
        image, instances = render_quickstart_image(0, "train", index, image_size, appearance)
        c = [image[inst["mask"]].reshape(-1, 3).mean(0) for inst in instances]
        colours += c
        groups += [index] * len(c)
        if len(c) > 1:
            within.append(np.mean([np.linalg.norm(c[a] - c[b]) for a in range(len(c)) for b in range(a + 1, len(c))]))
    share = between_image_share(torch.tensor(np.array(colours)), torch.tensor(groups))
    return share, float(np.median(within))


def test_appearance_is_per_instance_not_per_image():
    # Look-alike: instance colours are one per image (share 0.985 on these 16 images; instances
    # of an image ~19 apart). Per instance: the share is at the chance level of independent
    # draws (~(images - 1) / (instances - 1) = 0.25; 0.20 here) and instances of one image differ
    # (~120 apart in RGB).
    share, within = _colour_statistics("lookalike", (192, 256))
    assert share > 0.9 and within < 35
    share, within = _colour_statistics("per_instance", SIZE)
    assert share < 0.45 and within > 60


def test_layout_and_classes():
    counts, classes, same_class_touching = [], set(), 0
    for index in range(24):
        _, instances = render_quickstart_image(0, "train", index, SIZE, "per_instance")
        counts.append(len(instances))
        classes |= {inst["category_id"] for inst in instances}
        masks = [inst["mask"] for inst in instances]
        for a in range(len(masks)):
            grown = masks[a].copy()  # 4-neighbour dilation: touching or overlapping neighbours
            grown[1:] |= masks[a][:-1]
            grown[:-1] |= masks[a][1:]
            grown[:, 1:] |= masks[a][:, :-1]
            grown[:, :-1] |= masks[a][:, 1:]
            same_class_touching += sum(1 for b in range(a + 1, len(masks))
                                       if instances[a]["category_id"] == instances[b]["category_id"]
                                       and (grown & masks[b]).any())
        for inst in instances:  # masks disjoint and non-trivial
            assert inst["mask"].sum() >= 60
        assert sum(inst["mask"].astype(int) for inst in instances).max() <= 1
    assert classes == {c["id"] for c in TEXTURES_CATEGORIES}
    assert min(counts) >= 2 and max(counts) <= 7
    assert same_class_touching >= 3


def test_deterministic_and_distinct_from_the_quickstart():
    a, ia = render_quickstart_image(0, "train", 3, SIZE, "per_instance")
    b, ib = render_quickstart_image(0, "train", 3, SIZE, "per_instance")
    assert (a == b).all() and all((x["mask"] == y["mask"]).all() for x, y in zip(ia, ib))
    assert not (render_quickstart_image(1, "train", 3, SIZE, "per_instance")[0] == a).all()
    assert not (render_quickstart_image(0, "val", 3, SIZE, "per_instance")[0] == a).all()
    with pytest.raises(ValueError, match="appearance"):
        render_quickstart_image(0, "train", 0, SIZE, "per_image")


@pytest.mark.parametrize("split,index,digest", [("train", 0, "3374077690ed5301"), ("train", 5, "703bf19eca2db577"),
                                                ("val", 3, "0a27f98ad2af7d7a")])
def test_lookalike_images_unchanged(split, index, digest):
    image, instances = render_quickstart_image(0, split, index)
    h = hashlib.sha256(image.tobytes() + b"".join(inst["mask"].tobytes() for inst in instances)).hexdigest()
    assert h[:16] == digest


def test_files_masks_exact_ids_disjoint(tmp_path):
    root = str(tmp_path)
    paths = generate_textures(root, num_train=6, num_val=3)
    quick = generate_quickstart(root, num_train=2, num_val=2)
    ids = {}
    for split, (json_file, image_dir) in paths.items():
        assert json_file.startswith(str(tmp_path / "textures"))
        coco = COCO(json_file)
        ids[split] = set(coco.getImgIds())
        with open(json_file) as f:
            data = json.load(f)
        assert data["info"]["appearance"] == "per_instance" and [c["id"] for c in data["categories"]] == [1, 2, 3, 4]
        for k, image_id in enumerate(sorted(ids[split])):
            _, instances = render_quickstart_image(0, split, k, SIZE, "per_instance")
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
            assert len(anns) == len(instances)
            for ann, inst in zip(anns, instances):
                assert (coco.annToMask(ann).astype(bool) == inst["mask"]).all()
                assert ann["area"] == int(inst["mask"].sum())
    assert not ids["train"] & ids["val"]
    quick_ids = set().union(*(set(COCO(j).getImgIds()) for j, _ in quick.values()))
    assert not quick_ids & (ids["train"] | ids["val"])
    # Idempotent: a second call finds the split current and rewrites nothing.
    before = open(paths["train"][0], "rb").read()
    assert generate_textures(root, num_train=6, num_val=3) == paths
    assert open(paths["train"][0], "rb").read() == before


def test_names():
    for name in ("iuq_textures_train", "iuq_textures_val", "iuq_textures_train_500", "iuq_textures_val_64"):
        assert is_textures_dataset(name) and not is_quickstart_dataset(name)
    for name in ("iuq_quickstart_train", "iuq_quickstart_val_128", "iuq_textures_test", "iuq_textures_train_0"):
        assert not is_textures_dataset(name)
    assert is_quickstart_dataset("iuq_quickstart_val_128")


def test_register(tmp_path):
    pytest.importorskip("detectron2")
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from iuq.data import register_textures

    names = register_textures(str(tmp_path), names=["iuq_textures_train_4", "iuq_textures_val_2"])
    dicts = DatasetCatalog.get("iuq_textures_train_4")
    assert len(dicts) == 4 and all(d["annotations"] for d in dicts)
    assert dicts[0]["height"] == 128 and dicts[0]["width"] == 160
    assert MetadataCatalog.get("iuq_textures_val_2").thing_classes == ["circle", "square", "triangle", "diamond"]
    assert names == ["iuq_textures_train_4", "iuq_textures_val_2"]
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
