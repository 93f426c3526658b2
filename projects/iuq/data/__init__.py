"""Data for IUQ: a synthetic quickstart dataset and COCO test-dev submission files.

``quickstart`` needs detectron2 only to register its datasets; ``submission`` needs it to
import, so its names are resolved lazily here and ``import iuq.data`` works without detectron2.
"""
from .quickstart import (
    QUICKSTART_CATEGORIES,
    QUICKSTART_DATASETS,
    default_quickstart_root,
    generate_quickstart,
    is_quickstart_dataset,
    register_quickstart,
    render_quickstart_image,
)

_SUBMISSION_NAMES = ("COCOSubmissionWriter", "dataset_has_annotations", "submission_split_name")

__all__ = [
    "QUICKSTART_CATEGORIES",
    "QUICKSTART_DATASETS",
    "default_quickstart_root",
    "generate_quickstart",
    "is_quickstart_dataset",
    "register_quickstart",
    "render_quickstart_image",
    *_SUBMISSION_NAMES,
]


def __getattr__(name):
    # PEP 562: import detectron2 only when a submission name is first used.
    if name in _SUBMISSION_NAMES:
        from . import submission

        return getattr(submission, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
