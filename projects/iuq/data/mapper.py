"""A training record that fails is named: the dataset mapper (detectron2's ``DatasetMapper`` or the
base model's own, whichever the trainer chose) wrapped so that an exception while it reads or
maps an image is re-raised naming the file and the image id and saying what to do, the
original exception chained; with ``DATALOADER.SKIP_BAD_IMAGES True`` the image is skipped with a
logged warning instead (detectron2's ``MapDataset`` takes another image when a mapper returns
None). Loading the dataset's JSON fails the same way (:func:`named_dataset_errors`)."""
import logging
from contextlib import contextmanager

logger = logging.getLogger(__name__)

CHECK_COMMAND = "python tools/check_dataset.py --config-file YOUR_CONFIG [--dataset ...] [overrides]"


class BadRecordError(RuntimeError):
    """A dataset record (an image and its annotations) that could not be read or mapped. Its
    message names the record and the remedies; ``__cause__`` is the mapper's exception. Takes a
    message only, so that PyTorch's DataLoader can re-raise it from a worker process."""


def remedies(skip_key=True):
    """What to do about a bad record, as one sentence."""
    skip = "; or skip such images with a warning: DATALOADER.SKIP_BAD_IMAGES True" if skip_key else ""
    return (f"list every bad record at once with `{CHECK_COMMAND}`; fix or drop the file (images without "
            f"annotations: DATALOADER.FILTER_EMPTY_ANNOTATIONS True drops them){skip}")


def describe_record(dataset_dict):
    """``<file_name> (image <image_id>)`` of a detectron2 dataset dict."""
    return f"{dataset_dict.get('file_name', '(no file_name)')} (image {dataset_dict.get('image_id', '?')})"


class NamedRecordErrors:
    """``mapper`` (a callable: detectron2 dataset dict -> mapped dict) whose failures name the
    record: any exception becomes a :class:`BadRecordError` (``from`` it) saying which file and
    image id, the exception's type and message, and the remedies. With ``skip``, the record is
    logged as a warning and None returned, which detectron2's ``MapDataset`` replaces by another
    image (nothing is skipped silently: every skip is a warning naming the file)."""

    def __init__(self, mapper, skip=False):
        self.mapper = mapper
        self.skip = skip

    def __call__(self, dataset_dict):
        record = describe_record(dataset_dict)  # before the mapper, which may change the dict
        try:
            return self.mapper(dataset_dict)
        except Exception as e:
            cause = f"{type(e).__name__}: {e}"
            if self.skip:
                logger.warning(f"Skipped training image {record}: {cause} (DATALOADER.SKIP_BAD_IMAGES True; "
                               f"list every bad record with `{CHECK_COMMAND}`)")
                return None
            raise BadRecordError(f"Training image {record} could not be read or mapped: {cause}. To do: "
                                 f"{remedies()}") from e

    def __repr__(self):
        return f"NamedRecordErrors({self.mapper!r}, skip={self.skip})"


@contextmanager
def named_dataset_errors(names, key="DATASETS.TRAIN"):
    """Re-raise a failure while loading the datasets ``names`` (e.g. detectron2's KeyError for a
    category id not in the JSON's categories, which names no record) as a :class:`BadRecordError`
    naming the datasets and the check to run. A dataset that is not registered is not wrapped
    (detectron2's message lists the registered ones)."""
    from detectron2.data import DatasetCatalog

    try:
        yield
    except Exception as e:
        if not all(n in DatasetCatalog for n in names):
            raise
        raise BadRecordError(f"Loading {key} {tuple(names)} failed: {type(e).__name__}: {e}. To do: "
                             f"{remedies(skip_key=False)}") from e
