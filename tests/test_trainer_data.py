"""What the trainer makes of its data, on hand-made dataset dicts: images without instances get an
empty mask field and a view of their own, a dataset without segmentation is named before training,
string image ids get 64-bit hashes. (Real models on such batches: ``test_empty_images.py``.)"""
import hashlib
import random
import zlib

import pytest
import torch

pytest.importorskip("detectron2", reason="detectron2 is not installed (not on PyPI; see README)")

from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks  # noqa: E402

from iuq.config import get_iuq_cfg  # noqa: E402
from iuq.data.batch import dataset_image_id, with_empty_masks  # noqa: E402
from iuq.data.loader import check_dataset_masks  # noqa: E402
from iuq.equi.views import make_view  # noqa: E402


def image(n, masks=True, size=(32, 48)):
    inst = Instances(size, gt_boxes=Boxes(torch.tensor([[4.0, 4.0, 20.0, 16.0]] * n)),
                     gt_classes=torch.zeros(n, dtype=torch.int64))
    if masks and n:
        m = torch.zeros(n, *size, dtype=torch.bool)
        m[:, 4:16, 4:20] = True
        inst.gt_masks = BitMasks(m)
    return {"image_id": 7, "file_name": "a/7.jpg", "image": torch.zeros(3, *size), "instances": inst}


def test_an_image_without_instances_gets_an_empty_mask_field():
    full, empty = image(2), image(0)
    out = with_empty_masks([full, empty])
    assert out[0] is full  # untouched
    masks = out[1]["instances"].gt_masks
    assert isinstance(masks, BitMasks) and tuple(masks.tensor.shape) == (0, 32, 48)
    assert not empty["instances"].has("gt_masks")  # the loader's dict is not modified


def test_an_image_with_instances_but_no_masks_is_named():
    with pytest.raises(ValueError, match=r"image 7 \(a/7\.jpg\) has 2 instances without masks"):
        with_empty_masks([image(2, masks=False)])
    assert not with_empty_masks([image(2, masks=False)], require=False)[0]["instances"].has("gt_masks")


def test_the_view_of_an_image_without_instances_is_a_view_like_any_other():
    cfg = get_iuq_cfg().MODEL.IUQ.EQUI
    d = with_empty_masks([image(0, size=(64, 96))])[0]
    rng, twin = random.Random(3), random.Random(3)
    view, g = make_view(d, 8, cfg, torch.zeros(3, 1, 1), rng)
    assert len(view["instances"]) == 0 and tuple(view["image"].shape[-2:]) == g.out_size
    # The first draw is kept: the same transform as a fresh draw from the same state.
    from iuq.equi.transforms import sample_transform

    first = sample_transform((64, 96), 8, tuple(cfg.TRANSFORMS), tuple(cfg.CROP_RANGE),
                             tuple(cfg.ROTATION_RANGE), tuple(cfg.SCALE_RANGE), twin)
    assert repr(first) == repr(g) and rng.random() == twin.random()


def dicts(annotations_per_image):
    return [{"image_id": i, "file_name": f"img/{i}.jpg", "annotations": annos}
            for i, annos in enumerate(annotations_per_image)]


def test_a_dataset_without_segmentation_is_named_with_an_image():
    box = {"bbox": [0, 0, 4, 4], "category_id": 0}
    seg = {**box, "segmentation": [[0, 0, 4, 0, 4, 4]]}
    with pytest.raises(ValueError, match=r"3 of the 3 instance annotations of dataset 'boxes'.*image 1 \(img/1\.jpg\)"):
        check_dataset_masks(dicts([[], [box, box], [box]]), ["boxes"])
    with pytest.raises(ValueError, match=r"1 of the 3 instance annotations of dataset 'mixed'.*image 2"):
        check_dataset_masks(dicts([[], [seg, seg], [box]]), ["mixed"])


def test_images_without_annotations_and_crowd_regions_pass_the_check():
    crowd = {"bbox": [0, 0, 4, 4], "category_id": 0, "iscrowd": 1}  # no segmentation: dropped anyway
    seg = {"bbox": [0, 0, 4, 4], "category_id": 0, "segmentation": [[0, 0, 4, 0, 4, 4]]}
    check_dataset_masks(dicts([[], [crowd], [seg, crowd], []]), ["fine"])
    check_dataset_masks(dicts([[], []]), ["only_background"])


def test_string_image_ids_get_a_64_bit_hash():
    assert dataset_image_id({"image_id": 508}) == 508
    assert dataset_image_id({"image_id": torch.tensor(9).item()}) == 9
    expected = int.from_bytes(hashlib.blake2b(b"000000000508", digest_size=8).digest(), "little", signed=True)
    assert dataset_image_id({"image_id": "000000000508"}) == expected
    assert -(2**63) <= expected < 2**63 and abs(expected) >= 2**32  # stored as int64, wider than 32 bits
    # 2 x 10^5 ids (UUID-like, as some datasets have): a 32-bit hash (the old crc32) collides
    # there (~4.7 pairs expected), a 64-bit one does not (~1e-9).
    rng = random.Random(0)
    names = [f"{rng.getrandbits(128):032x}" for _ in range(200_000)]
    assert len({zlib.crc32(n.encode()) for n in names}) < len(names)
    assert len({dataset_image_id({"image_id": n}) for n in names}) == len(names)
    torch.tensor([dataset_image_id({"image_id": n}) for n in names[:10]], dtype=torch.int64)  # fits


def test_an_image_without_an_id_is_named():
    with pytest.raises(ValueError, match=r"'image_id'.*x\.jpg has none"):
        dataset_image_id({"file_name": "x.jpg"})
