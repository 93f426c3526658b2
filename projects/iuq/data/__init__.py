"""Data for IUQ: a synthetic quickstart dataset (instance and panoptic), an LVIS v1 sample made from COCO-format data,
and COCO test-dev submission files.

``quickstart`` and ``lvis_sample`` need detectron2 only to make / register their datasets;
``submission`` needs it to import, so its names are resolved lazily here and ``import iuq.data``
works without detectron2.
"""
from .lvis_sample import (
    COCO_TO_LVIS,
    LVIS_SAMPLE_DATASETS,
    default_lvis_sample_root,
    default_lvis_sample_source,
    generate_lvis_sample,
    is_lvis_sample_dataset,
    make_lvis_sample,
    register_lvis_sample,
)
from .quickstart_panoptic import (
    PANOPTIC_QUICKSTART_DATASETS,
    is_panoptic_quickstart_dataset,
    register_panoptic_quickstart,
    render_panoptic_image,
)
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
    "COCO_TO_LVIS",
    "LVIS_SAMPLE_DATASETS",
    "default_lvis_sample_root",
    "default_lvis_sample_source",
    "generate_lvis_sample",
    "is_lvis_sample_dataset",
    "make_lvis_sample",
    "register_lvis_sample",
    "PANOPTIC_QUICKSTART_DATASETS",
    "is_panoptic_quickstart_dataset",
    "register_panoptic_quickstart",
    "render_panoptic_image",
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
