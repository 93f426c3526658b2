"""train_net.py's command line as a new user meets it: without detectron2 it says what to install
(one message, no traceback), and every override works as ``KEY VALUE`` and as ``KEY=VALUE``,
top-level keys included."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# train_net.py run where detectron2 cannot be imported (hidden if it is installed here).
WITHOUT_DETECTRON2 = """
import importlib.abc, runpy, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "detectron2":
            raise ModuleNotFoundError("No module named %r" % name, name=name)
sys.meta_path.insert(0, Hide())
sys.argv = ["train_net.py", "--config-file", "configs/quickstart.yaml"]
runpy.run_path("train_net.py", run_name="__main__")
"""


def test_without_detectron2_train_net_says_what_to_install():
    result = subprocess.run([sys.executable, "-c", WITHOUT_DETECTRON2], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "train_net.py needs detectron2, which is not installed" in result.stderr
    assert "python tools/install_frameworks.py adelaidet" in result.stderr


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
