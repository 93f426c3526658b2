"""Your own COCO-format dataset from the command line: ``--dataset NAME=JSON:IMAGE_ROOT``
(repeatable) registers ``NAME`` with detectron2's ``register_coco_instances``, so that
``DATASETS.TRAIN "('NAME',)"`` (or TEST) names it. ``train_net.py`` registers in every process it
launches (``load_config`` runs in each), before the config is read."""
import os

FLAG = "--dataset"

# name -> (json_file, image_root) of what this process registered from ``--dataset``.
_REGISTERED = {}


class DatasetSpecError(ValueError):
    """A ``--dataset`` value that cannot be registered; the message names the flag and the fix."""


def parse_dataset_spec(spec):
    """``NAME=JSON:IMAGE_ROOT`` -> (name, json_file, image_root). The JSON path is the part up to
    ``.json:`` where there is one (so an image root may contain ':'), else up to the last ':'."""
    name, eq, rest = spec.partition("=")
    i = rest.find(".json:")
    json_file, colon, image_root = (rest[: i + 5], ":", rest[i + 6 :]) if i >= 0 else rest.rpartition(":")
    if not (eq and colon and name and json_file and image_root):
        raise DatasetSpecError(f"{FLAG} {spec!r}: expected {FLAG} NAME=JSON:IMAGE_ROOT, e.g. "
                               f"{FLAG} mine_train=data/annotations/train.json:data/images/train")
    return name, json_file, image_root


def _made_by_the_project(name):
    """Whether ``name`` is a dataset train_net registers itself when a config names it
    (``iuq.data.project_datasets``), registered or not yet."""
    from . import project_datasets

    return any(is_ours(name) for is_ours, _ in project_datasets())


def register_datasets(specs):
    """Register each ``NAME=JSON:IMAGE_ROOT`` of ``specs`` as a COCO instances dataset. Raises
    :class:`DatasetSpecError` naming the flag when the JSON or the image folder does not exist, or
    NAME is already registered otherwise or is one the project makes (a detectron2 builtin such as
    ``coco_2017_train``, ``iuq_quickstart_train``: choose another name). Registering the same NAME again from ``--dataset`` (another call of
    ``train_net.main`` in this process) re-points it. Returns the names."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    names = []
    for spec in specs or ():
        name, json_file, image_root = parse_dataset_spec(spec)
        if not os.path.isfile(json_file):
            raise DatasetSpecError(f"{FLAG} {spec!r}: the JSON {json_file!r} does not exist")
        if not os.path.isdir(image_root):
            raise DatasetSpecError(f"{FLAG} {spec!r}: the image folder {image_root!r} does not exist")
        if name in DatasetCatalog or _made_by_the_project(name):
            if name not in _REGISTERED:
                raise DatasetSpecError(f"{FLAG} {spec!r}: the name {name!r} is already registered (a detectron2 "
                                       f"builtin or a dataset of the project): choose another name")
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(name, {}, json_file, image_root)
        _REGISTERED[name] = (json_file, image_root)
        names.append(name)
    return names
