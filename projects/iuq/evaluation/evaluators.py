"""The evaluator for a test dataset: COCO segm AP, LVIS AP, COCO panoptic PQ, or, for a split
without annotations (COCO test-dev), a submission file for the evaluation server."""
import os

from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, LVISEvaluator
from detectron2.structures import BitMasks


def build_evaluator(cfg, dataset_name, output_folder=None):
    from .submission import COCOSubmissionWriter, dataset_has_annotations

    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
    if MetadataCatalog.get(dataset_name).get("evaluator_type") == "coco_panoptic_seg":
        return panoptic_evaluator(dataset_name, output_folder)
    if "lvis" in dataset_name:  # segm AP (with APr / APc / APf) at LVIS's 300 detections per image
        lvis_numpy_compat()
        return BoxesFromMasks(LVISEvaluator(dataset_name, tasks=("segm",), output_dir=output_folder))
    if not dataset_has_annotations(dataset_name):
        name = os.path.basename(os.path.normpath(cfg.OUTPUT_DIR)) or "iuq"
        return BoxesFromMasks(COCOSubmissionWriter(dataset_name, output_folder, name))
    if "json_file" not in MetadataCatalog.get(dataset_name).as_dict():
        raise ValueError(f"DATASETS.TEST: dataset {dataset_name!r} is neither COCO- nor LVIS-style")
    return BoxesFromMasks(COCOEvaluator(dataset_name, tasks=("segm",), output_dir=output_folder))


def panoptic_evaluator(dataset_name, output_folder):
    """PQ, PQ^th and PQ^st through detectron2's ``COCOPanopticEvaluator`` (it needs panopticapi,
    which is on no package index: the error says how to install it)."""
    try:
        import panopticapi  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"DATASETS.TEST {dataset_name!r} is panoptic: PQ needs panopticapi (`pip install "
            "git+https://github.com/cocodataset/panopticapi.git`, or `pip install <a local checkout>`)"
        ) from e
    from detectron2.evaluation import COCOPanopticEvaluator

    return COCOPanopticEvaluator(dataset_name, output_folder)


def lvis_numpy_compat():
    """Let the LVIS API's evaluation run with numpy >= 1.24. ``lvis`` 0.5.3 (the last release on
    PyPI) accumulates with ``np.float``, an alias numpy removed in 1.24 (AttributeError at the end
    of every LVIS evaluation; fixed in lvis-api's main branch, lvis-dataset/lvis-api#37, never
    released). Where numpy lacks it, ``lvis.eval`` alone gets a numpy that has it (the builtin
    ``float``, what the alias always was); numpy itself and every other module are left alone."""
    import numpy as np

    if hasattr(np, "float"):
        return
    import lvis.eval

    if not isinstance(lvis.eval.np, _NumpyWithFloat):
        lvis.eval.np = _NumpyWithFloat(np)


class _NumpyWithFloat:
    """``numpy``, plus the ``float`` alias it had before 1.24."""

    float = float

    def __init__(self, numpy):
        self._numpy = numpy

    def __getattr__(self, name):
        return getattr(self._numpy, name)


class BoxesFromMasks(DatasetEvaluator):
    """``evaluator``, fed predictions that have ``pred_boxes``: models that predict masks only
    (SparseInst) get the tight box of each mask (detectron2's evaluators write a box per result;
    segm AP does not use it)."""

    def __init__(self, evaluator):
        self.evaluator = evaluator

    def reset(self):
        self.evaluator.reset()

    def process(self, inputs, outputs):
        for out in outputs:
            inst = out.get("instances")
            if inst is not None and not inst.has("pred_boxes") and inst.has("pred_masks"):
                inst.pred_boxes = BitMasks(inst.pred_masks).get_bounding_boxes()
        self.evaluator.process(inputs, outputs)

    def evaluate(self):
        return self.evaluator.evaluate()
