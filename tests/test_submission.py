"""COCO test-dev submission writing, on a fake test-dev-like dataset built from real COCO images."""
import json
import os
import subprocess
import sys
import zipfile

import pytest

pytest.importorskip("detectron2", reason="the submission writer is a detectron2 DatasetEvaluator")
pytest.importorskip("pycocotools", reason="the submission is checked with pycocotools")

import torch  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.data.datasets import register_coco_instances  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402

from iuq.evaluation import COCOSubmissionWriter, dataset_has_annotations, submission_split_name  # noqa: E402

SHARED = "/work/shared/datasets"
COCO_VAL_JSON = os.path.join(SHARED, "coco", "annotations", "instances_val2017.json")
NUM_IMAGES = 3

pytestmark = pytest.mark.skipif(not os.path.isfile(COCO_VAL_JSON), reason=f"needs {COCO_VAL_JSON}")


@pytest.fixture(scope="module")
def fake_test_dev(tmp_path_factory):
    """An image_info json (no annotations, like image_info_test-dev2017.json) of a few real
    COCO images, registered as ``iuq_fake_coco_2017_test-dev``; plus a gt json for loadRes."""
    with open(COCO_VAL_JSON) as f:
        coco = json.load(f)
    images = coco["images"][:NUM_IMAGES]
    root = tmp_path_factory.mktemp("fake_test_dev")
    info_json = str(root / "image_info_test-dev2017.json")
    with open(info_json, "w") as f:
        json.dump({"info": coco["info"], "licenses": coco["licenses"], "images": images,
                   "categories": coco["categories"]}, f)
    gt_json = str(root / "gt.json")
    with open(gt_json, "w") as f:
        json.dump({"images": images, "categories": coco["categories"], "annotations": []}, f)

    name = "iuq_fake_coco_2017_test-dev"
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, info_json, os.path.join(SHARED, "coco", "val2017"))
    DatasetCatalog.get(name)  # as the test loader would: fills the category mapping
    return name, images, gt_json


def fake_predictions(image, classes):
    """``len(classes)`` detections on one image: a box and a filled rectangle mask each."""
    h, w = image["height"], image["width"]
    n = len(classes)
    instances = Instances((h, w))
    boxes, masks = [], torch.zeros(n, h, w, dtype=torch.bool)
    for k in range(n):
        x0, y0 = 10 + 20 * k, 15 + 10 * k
        x1, y1 = x0 + 40, y0 + 30
        boxes.append([x0, y0, x1, y1])
        masks[k, y0:y1, x0:x1] = True
    instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    instances.scores = torch.linspace(0.9, 0.5, n)
    instances.pred_classes = torch.tensor(classes, dtype=torch.int64)
    instances.pred_masks = masks
    return instances


def test_split_names():
    assert submission_split_name("coco_2017_test-dev") == "test-dev2017"
    assert submission_split_name("coco_2017_val") == "val2017"
    assert submission_split_name("iuq_fake_coco_2017_test-dev") == "test-dev2017"


def test_writes_zipped_submission(fake_test_dev, tmp_path, caplog):
    name, images, gt_json = fake_test_dev
    # Contiguous ids 0, 79, 11 are COCO ids 1 (person), 90 (toothbrush), 13 (stop sign).
    contiguous_to_coco = {0: 1, 79: 90, 11: 13}
    writer = COCOSubmissionWriter(name, str(tmp_path), name="iuq_condinst R50")
    writer.reset()
    for image in images:
        inputs = [{"image_id": image["id"], "height": image["height"], "width": image["width"]}]
        writer.process(inputs, [{"instances": fake_predictions(image, [0, 79, 11])}])
    with caplog.at_level("INFO"):
        assert writer.evaluate() == {}

    # Underscores and spaces in the algorithm name would break the server's file-name parsing.
    json_name = "detections_test-dev2017_iuq-condinst-R50_results.json"
    zip_path = tmp_path / "detections_test-dev2017_iuq-condinst-R50_results.zip"
    assert zip_path.is_file()
    assert f"Submission file written to {zip_path}" in caplog.text
    with zipfile.ZipFile(zip_path) as z:
        assert z.namelist() == [json_name]
        results = json.loads(z.read(json_name))

    assert isinstance(results, list) and len(results) == 3 * NUM_IMAGES
    for r in results:
        assert {"image_id", "category_id", "segmentation", "score", "bbox"} <= set(r)
        assert isinstance(r["segmentation"]["counts"], str) and len(r["bbox"]) == 4
    assert {r["category_id"] for r in results} == set(contiguous_to_coco.values())
    first = [r for r in results if r["image_id"] == images[0]["id"]]
    assert [r["category_id"] for r in first] == [1, 90, 13]
    assert first[0]["bbox"] == pytest.approx([10, 15, 40, 30])

    gt = COCO(gt_json)
    dt = gt.loadRes(str(tmp_path / json_name))
    assert len(dt.getAnnIds()) == len(results)
    ann = dt.loadAnns(dt.getAnnIds(imgIds=[images[0]["id"]], catIds=[90]))[0]
    mask = dt.annToMask(ann)
    assert mask.sum() == 40 * 30 and mask[15 + 10:15 + 10 + 30, 10 + 20:10 + 20 + 40].all()


def test_no_predictions_writes_nothing(fake_test_dev, tmp_path):
    writer = COCOSubmissionWriter(fake_test_dev[0], str(tmp_path))
    writer.reset()
    assert writer.evaluate() == {}
    assert not os.listdir(tmp_path)


def test_dataset_has_annotations(fake_test_dev, tmp_path):
    assert dataset_has_annotations(fake_test_dev[0]) is False
    name = "iuq_test_real_coco_val"
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, COCO_VAL_JSON, os.path.join(SHARED, "coco", "val2017"))
    assert dataset_has_annotations(name) is True


def test_builtin_coco_val_has_annotations():
    """detectron2 registers its builtin datasets when detectron2.data is first imported, reading
    $DETECTRON2_DATASETS at that moment; a fresh interpreter makes sure the variable is seen."""
    env = dict(os.environ, DETECTRON2_DATASETS=SHARED)
    code = "from iuq.evaluation import dataset_has_annotations; print(dataset_has_annotations('coco_2017_val'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
