"""COCO submission files for splits without ground truth (COCO test-dev).

``COCOEvaluator`` needs annotations to score predictions; on ``coco_2017_test-dev`` there are
none, and the predictions must instead go to the evaluation server as a zipped json named
``detections_test-dev2017_<name>_results.json``. ``COCOSubmissionWriter`` collects predictions
exactly as ``COCOEvaluator`` does and writes that file; ``dataset_has_annotations`` tells which
of the two a dataset needs.
"""
import json
import logging
import os
import re
import zipfile

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

__all__ = ["COCOSubmissionWriter", "dataset_has_annotations", "submission_split_name"]

logger = logging.getLogger(__name__)


def dataset_has_annotations(dataset_name):
    """Whether a registered dataset has ground-truth instance annotations.

    For a COCO-json dataset (metadata ``json_file``): whether the json's ``"annotations"`` list
    is non-empty -- COCO's test-dev json is ``image_info`` only. For any other dataset: whether
    some record from ``DatasetCatalog`` has a non-empty ``"annotations"`` list.
    """
    json_file = MetadataCatalog.get(dataset_name).get("json_file")
    if json_file is None:
        return any(record.get("annotations") for record in DatasetCatalog.get(dataset_name))
    with PathManager.open(json_file, "r") as f:
        data = json.load(f)
    return bool(data.get("annotations"))


def submission_split_name(dataset_name):
    """The split as the COCO server spells it: ``coco_2017_test-dev`` -> ``test-dev2017``.

    Names of the form ``*_<year>_<split>`` (detectron2's builtin COCO names) give
    ``<split><year>``; otherwise the json file's stem without ``image_info_`` / ``instances_``
    (``image_info_test-dev2017.json`` -> ``test-dev2017``); otherwise the dataset name.
    """
    match = re.search(r"(\d{4})_([A-Za-z-]+)$", dataset_name)
    if match:
        return f"{match.group(2)}{match.group(1)}"
    json_file = MetadataCatalog.get(dataset_name).get("json_file")
    if json_file:
        stem = os.path.splitext(os.path.basename(json_file))[0]
        for prefix in ("image_info_", "instances_"):
            if stem.startswith(prefix):
                return stem[len(prefix):]
        return stem
    return dataset_name


class COCOSubmissionWriter(DatasetEvaluator):
    """Writes ``<output_dir>/detections_<split>_<name>_results.{json,zip}`` for the COCO server.

    Predictions are collected per image with detectron2's ``instances_to_coco_json`` (boxes
    XYWH, masks as RLE with string counts), gathered to the main process, and category ids are
    mapped back from contiguous ids to the dataset's (COCO's) ids. ``evaluate()`` returns ``{}``:
    there is nothing to score without ground truth.
    """

    def __init__(self, dataset_name, output_dir, name="iuq", split=None, distributed=True):
        """
        Args:
            dataset_name (str): a registered dataset, e.g. ``coco_2017_test-dev``.
            output_dir (str): where the json and the zip go.
            name (str): the algorithm name in the file name. The server splits the file name at
                underscores, so any character other than letters, digits and ``-`` becomes ``-``.
            split (str or None): the split as the server names it; None ->
                ``submission_split_name(dataset_name)``.
            distributed (bool): gather predictions from all ranks (as COCOEvaluator does).
        """
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._name = re.sub(r"[^A-Za-z0-9-]", "-", name)
        self._split = split or submission_split_name(dataset_name)
        self._distributed = distributed
        self._predictions = []

    @property
    def json_name(self):
        return f"detections_{self._split}_{self._name}_results.json"

    @property
    def zip_path(self):
        return os.path.join(self._output_dir, self.json_name[: -len(".json")] + ".zip")

    def reset(self):
        self._predictions = []

    def process(self, inputs, outputs):
        """``inputs``: dataset dicts with ``image_id``; ``outputs``: dicts with ``instances``."""
        for input, output in zip(inputs, outputs):
            if "instances" in output:
                instances = output["instances"].to("cpu")
                self._predictions.extend(instances_to_coco_json(instances, input["image_id"]))

    def _to_dataset_category_ids(self, results):
        metadata = MetadataCatalog.get(self._dataset_name)
        mapping = metadata.get("thing_dataset_id_to_contiguous_id")
        if mapping is None:
            logger.warning(
                f"{self._dataset_name} has no thing_dataset_id_to_contiguous_id; writing the "
                "model's contiguous category ids unchanged."
            )
            return results
        reverse = {contiguous: dataset_id for dataset_id, contiguous in mapping.items()}
        for result in results:
            category_id = result["category_id"]
            assert category_id in reverse, (
                f"A prediction has category {category_id}, but {self._dataset_name} has only "
                f"{len(reverse)} classes."
            )
            result["category_id"] = reverse[category_id]
        return results

    def evaluate(self):
        if self._distributed:
            comm.synchronize()
            gathered = comm.gather(self._predictions, dst=0)
            if not comm.is_main_process():
                return {}
            predictions = [p for per_rank in gathered for p in per_rank]
        else:
            predictions = self._predictions

        if not predictions:
            logger.warning("COCOSubmissionWriter received no predictions; nothing written.")
            return {}
        predictions = self._to_dataset_category_ids(predictions)

        PathManager.mkdirs(self._output_dir)
        json_path = os.path.join(self._output_dir, self.json_name)
        with PathManager.open(json_path, "w") as f:
            json.dump(predictions, f)
        # The server wants the json at the root of the zip, under its own name.
        with zipfile.ZipFile(self.zip_path, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.write(json_path, arcname=self.json_name)
        logger.info(
            f"Submission file written to {self.zip_path} ({len(predictions)} detections on "
            f"{self._dataset_name}); upload it to the COCO evaluation server."
        )
        return {}
