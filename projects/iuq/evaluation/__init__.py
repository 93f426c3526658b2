"""Evaluation: the evaluator for each test dataset (COCO segm AP, LVIS AP, panoptic PQ, or a COCO
test-dev submission file) and the IUQ measures of what each loss optimises.

- ``evaluators``: ``build_evaluator``, ``BoxesFromMasks``;
- ``submission``: ``COCOSubmissionWriter`` for splits without annotations;
- ``measures``: ``IUQMeasures`` (cross-scene false activation, equivariance error; its functions
  need no detectron2).

Its names resolve lazily (PEP 562): ``import iuq.evaluation`` needs no detectron2.
"""
_NAMES = {
    "build_evaluator": "evaluators",
    "BoxesFromMasks": "evaluators",
    "COCOSubmissionWriter": "submission",
    "dataset_has_annotations": "submission",
    "submission_split_name": "submission",
    "IUQMeasures": "measures",
}

__all__ = list(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
