"""Data for IUQ: a synthetic quickstart dataset (instance and panoptic), the textures testbed
(per-instance appearance: ``iuq_textures_*``), an LVIS v1 sample made from
COCO-format data, and what IUQ reads of and checks in a training batch.

``quickstart`` and ``lvis_sample`` need detectron2 only to make / register their datasets, so
``import iuq.data`` works without detectron2. ``batch`` (image ids, instance masks rasterised once
per batch, empty mask fields) and ``loader`` (the dataset's masks checked before the first step,
the images a step reads) need it and are imported by name (``iuq.data.batch``). COCO test-dev
submission files: ``iuq.evaluation.submission``.
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
    TEXTURES_CATEGORIES,
    TEXTURES_DATASETS,
    default_quickstart_root,
    generate_quickstart,
    generate_textures,
    is_quickstart_dataset,
    is_textures_dataset,
    register_quickstart,
    register_textures,
    render_quickstart_image,
)

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
    "TEXTURES_CATEGORIES",
    "TEXTURES_DATASETS",
    "default_quickstart_root",
    "generate_quickstart",
    "generate_textures",
    "is_quickstart_dataset",
    "is_textures_dataset",
    "register_quickstart",
    "register_textures",
    "render_quickstart_image",
    "project_datasets",
]


def project_datasets():
    """The datasets the project makes itself, drawn / written on first use, as (is_ours(name),
    register(names=...)) pairs: the quickstart and the textures testbed (under
    $IUQ_QUICKSTART_ROOT or ./datasets), the panoptic quickstart, the LVIS sample and the
    copy-paste testbed (from $DETECTRON2_DATASETS/coco, under their own roots or ./datasets).
    ``train_net.setup`` registers the ones a config names; ``--dataset`` refuses their names."""
    from .copy_paste import is_copy_paste_dataset, register_copy_paste

    return ((is_quickstart_dataset, register_quickstart), (is_textures_dataset, register_textures),
            (is_panoptic_quickstart_dataset, register_panoptic_quickstart),
            (is_lvis_sample_dataset, register_lvis_sample), (is_copy_paste_dataset, register_copy_paste))
