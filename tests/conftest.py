"""Shared test setup: point detectron2's builtin datasets at the real COCO sample in
../shared/datasets (before detectron2.data is imported, which reads the variable once)."""
import os
from pathlib import Path

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
if SHARED_DATASETS.is_dir():
    os.environ.setdefault("DETECTRON2_DATASETS", str(SHARED_DATASETS))
