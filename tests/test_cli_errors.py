"""train_net.py's command line as a new user meets it: without detectron2 it says what to install
(one message, no traceback), and every override works as ``KEY VALUE`` and as ``KEY=VALUE``,
top-level keys included."""
import sys
from pathlib import Path

import pytest

from adelaidet_support import train_net_hiding

REPO = Path(__file__).resolve().parents[1]

def test_without_detectron2_train_net_says_what_to_install():
    code, stderr = train_net_hiding("detectron2", "--config-file", "configs/quickstart.yaml")
    assert code == 1 and "Traceback" not in stderr
    assert "train_net.py needs detectron2, which is not installed" in stderr
    assert "python tools/install_frameworks.py adelaidet" in stderr


def test_overrides_in_both_forms_top_level_keys_included():
    pytest.importorskip("detectron2", reason="detectron2 is not installed (not on PyPI; see README)")
    sys.path.insert(0, str(REPO))
    import train_net

    opts = ["OUTPUT_DIR=output/x", "SEED=1", "MODEL.IUQ.ENABLED=False", "SOLVER.MAX_ITER", "5",
            "DATASETS.TEST", "('a=b',)", "OUTPUT_DIR", "X=1"]
    assert train_net.split_overrides(opts) == [
        "OUTPUT_DIR", "output/x", "SEED", "1", "MODEL.IUQ.ENABLED", "False", "SOLVER.MAX_ITER", "5",
        "DATASETS.TEST", "('a=b',)", "OUTPUT_DIR", "X=1"]  # a value with "=" in it stays a value
    args = train_net.default_argument_parser().parse_args(
        ["--config-file", str(REPO / "configs/quickstart.yaml"), "OUTPUT_DIR=/tmp/iuq_x", "SEED=3", "MODEL.DEVICE=cpu"])
    cfg = train_net.load_config(args)
    assert (cfg.OUTPUT_DIR, cfg.SEED, cfg.MODEL.DEVICE) == ("/tmp/iuq_x", 3, "cpu")
