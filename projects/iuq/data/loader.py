"""The training loader's data as IUQ needs it: every instance with a mask, checked before the
first step (``check_dataset_masks``), and the images a step reads (``loader_config``: half of
SOLVER.IMS_PER_BATCH when the views count toward it)."""
from detectron2.data import DatasetCatalog
from detectron2.utils import comm


def lacks_mask(annotation):
    """Whether an instance annotation (not a crowd region, which the mapper drops) has no
    ``segmentation``: IUQ needs every instance's mask."""
    return not annotation.get("iscrowd", 0) and not annotation.get("segmentation")


def check_dataset_masks(dataset_dicts, names):
    """Fail before training, naming the dataset and an image, if an instance annotation (not a crowd
    region, which the mapper drops) carries no ``segmentation``: IUQ needs every instance's mask.
    Images without annotations are fine (``DATALOADER.FILTER_EMPTY_ANNOTATIONS False`` keeps them).
    ``names``: the DATASETS.TRAIN the dicts were read from."""
    missing, total, first = 0, 0, None
    for d in dataset_dicts:
        for a in d.get("annotations", ()):
            if a.get("iscrowd", 0):
                continue
            total += 1
            if lacks_mask(a):
                missing += 1
                first = first or d
    if not missing:
        return
    name = next((n for n in names if any(d.get("file_name") == first.get("file_name") for d in DatasetCatalog.get(n))),
                " / ".join(names)) if len(names) > 1 else names[0]
    raise ValueError(
        f"MODEL.IUQ needs instance masks, but {missing} of the {total} instance annotations of dataset "
        f"{name!r} (DATASETS.TRAIN) have no segmentation, e.g. in image {first.get('image_id', '?')} "
        f"({first.get('file_name', 'no file name')}): train on a dataset with segmentation annotations"
    )


def loader_config(cfg):
    """``cfg`` with the images the loader reads per step: SOLVER.IMS_PER_BATCH, or half of it when
    the views count toward it (``MODEL.IUQ.EQUI.VIEWS_IN_BATCH``: a step then holds the loaded
    images and their views, IMS_PER_BATCH in all)."""
    iuq = cfg.MODEL.IUQ
    if not (iuq.ENABLED and iuq.EQUI.ENABLED and iuq.EQUI.VIEWS_IN_BATCH):
        return cfg
    total, world = cfg.SOLVER.IMS_PER_BATCH, comm.get_world_size()
    if total % (2 * world):
        raise ValueError(
            f"MODEL.IUQ.EQUI.VIEWS_IN_BATCH True needs SOLVER.IMS_PER_BATCH ({total}) divisible by 2 x "
            f"the number of processes ({world}): each process reads half its share and adds a view of each"
        )
    cfg = cfg.clone()
    cfg.defrost()
    cfg.SOLVER.IMS_PER_BATCH = total // 2
    cfg.freeze()
    return cfg
