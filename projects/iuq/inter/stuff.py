"""Thing or stuff, per contiguous class id, from a dataset's metadata (panoptic segmentation).

Stuff is instance-agnostic: a query matched to a stuff segment of class c has, on another image,
that image's pixels of class c as positives (``iuq.inter.losses``). Which classes are stuff is read from
the metadata detectron2 registers with a dataset, never assumed (COCO's 80 things / 53 stuff are
one case): a class is a thing if it is in ``thing_dataset_id_to_contiguous_id``'s values; in a
dataset that also names stuff (``stuff_dataset_id_to_contiguous_id`` or ``stuff_classes``, as
detectron2 and Mask2Former register COCO panoptic) every other class is stuff; an instance
segmentation dataset has things only.
"""
import torch


def stuff_flags(metadata, num_classes=None):
    """[num_classes] bool: whether each contiguous class id is stuff, from ``metadata`` (a
    detectron2 ``Metadata`` or a dict). ``num_classes`` defaults to the metadata's: the length of
    ``stuff_classes`` (detectron2 lists every panoptic class there), else the largest contiguous
    id + 1."""
    get = metadata.get if isinstance(metadata, dict) else (lambda k, d=None: getattr(metadata, k, d))
    things = set((get("thing_dataset_id_to_contiguous_id") or {}).values())
    stuff_ids = set((get("stuff_dataset_id_to_contiguous_id") or {}).values())
    if num_classes is None:
        num_classes = len(get("stuff_classes") or ()) or max(things | stuff_ids, default=-1) + 1
    flags = torch.zeros(num_classes, dtype=torch.bool)
    if get("stuff_dataset_id_to_contiguous_id") is None and get("stuff_classes") is None:
        return flags  # instance segmentation: things only
    outside = sorted(c for c in things if not 0 <= c < num_classes)
    if outside:
        raise ValueError(f"thing classes {outside} of the metadata lie outside the model's {num_classes} classes")
    flags[:] = True
    flags[sorted(things)] = False
    return flags


def stuff_classes_of(classes, flags):
    """``classes`` [N] int64 (contiguous ids, -1 unknown) -> [N] int64: the class where it is
    stuff, -1 elsewhere (what the inter-scene loss compares a query's class with)."""
    classes = torch.as_tensor(classes, dtype=torch.int64)
    known = (classes >= 0) & (classes < len(flags))
    stuff = torch.zeros_like(known)
    stuff[known] = flags.to(classes.device)[classes[known]]
    return torch.where(stuff, classes, torch.full_like(classes, -1))
