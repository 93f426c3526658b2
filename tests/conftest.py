"""Shared test setup: point detectron2's builtin datasets at the real COCO sample in
../shared/datasets (before detectron2.data is imported, which reads the variable once)."""
import os
from pathlib import Path

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
if SHARED_DATASETS.is_dir():
    os.environ.setdefault("DETECTRON2_DATASETS", str(SHARED_DATASETS))


import logging  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def iuq_logs_reach_caplog():
    """train_net's ``setup_logger(name="iuq")`` stops the project's loggers from propagating to the
    root logger, where ``caplog`` listens: once any earlier test has run train_net, a test reading
    an ``iuq.*`` log line would see nothing. Each test starts with propagation on."""
    logger = logging.getLogger("iuq")
    before = logger.propagate
    logger.propagate = True
    yield
    logger.propagate = before
