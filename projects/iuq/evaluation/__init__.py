"""Evaluation: the evaluator for each test dataset (COCO segm AP, LVIS AP, panoptic PQ, or a COCO
test-dev submission file) and the IUQ measures of what each loss optimises.

- ``evaluators``: ``build_evaluator``, ``BoxesFromMasks``;
- ``submission``: ``COCOSubmissionWriter`` for splits without annotations;
- ``measures``: ``IUQMeasures`` (cross-scene false activation, equivariance error; its functions
  need no detectron2).

Its names resolve lazily (PEP 562): ``import iuq.evaluation`` needs no detectron2.
"""
from .._lazy import lazy_getattr

_NAMES = {
    "build_evaluator": "evaluators",
    "BoxesFromMasks": "evaluators",
    "COCOSubmissionWriter": "submission",
    "dataset_has_annotations": "submission",
    "submission_split_name": "submission",
    "IUQMeasures": "measures",
}

__all__ = list(_NAMES)


__getattr__ = lazy_getattr(__name__, _NAMES)
