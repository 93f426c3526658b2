"""The evaluator for a test dataset: COCO segm AP, LVIS AP, or, for a split without annotations
(COCO test-dev), a submission file for the evaluation server."""
import os

from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, LVISEvaluator


def build_evaluator(cfg, dataset_name, output_folder=None):
    from .data.submission import COCOSubmissionWriter, dataset_has_annotations

    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
    if "lvis" in dataset_name:
        return LVISEvaluator(dataset_name, output_dir=output_folder)
    if not dataset_has_annotations(dataset_name):
        name = os.path.basename(os.path.normpath(cfg.OUTPUT_DIR)) or "iuq"
        return COCOSubmissionWriter(dataset_name, output_folder, name)
    if "json_file" not in MetadataCatalog.get(dataset_name).as_dict():
        raise ValueError(f"DATASETS.TEST: dataset {dataset_name!r} is neither COCO- nor LVIS-style")
    return COCOEvaluator(dataset_name, tasks=("segm",), output_dir=output_folder)
