"""The study as a user runs it, on CondInst and the quickstart data (CPU, a few iterations):
tools/ablation.py end to end, the IUQ measures under --eval-only, and the views-in-batch option's
start-up check."""
import json
import os
import subprocess
import sys

import pytest

from adelaidet_support import REPO, require_adelaidet

require_adelaidet()

QUICK = ["SOLVER.MAX_ITER", "3", "SOLVER.WARMUP_ITERS", "1", "SOLVER.CHECKPOINT_PERIOD", "100",
         "MODEL.IUQ.MEASURES.MAX_IMAGES", "4", "SOLVER.STEPS", "()"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("quickstart_data")
    return {**os.environ, "IUQ_QUICKSTART_ROOT": str(root), "OMP_NUM_THREADS": "1"}


def test_ablation_runner_trains_evaluates_resumes_and_prints_its_table(tmp_path, env):
    out = tmp_path / "study"
    cmd = [sys.executable, str(REPO / "tools" / "ablation.py"), "--config-file", str(REPO / "configs" / "quickstart.yaml"),
           "--modes", "baseline", "both", "--seeds", "0", "--output-dir", str(out)] + QUICK
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["baseline", "both"]
    for r in rows:
        assert r["iters"] == 3 and r["sec_per_iter"] > 0 and r["peak_mem_mb"] > 0
        assert 0.0 <= r["metrics"]["segm/AP"] <= 100.0
        assert 0.0 <= r["metrics"]["iuq/cross_fa"] <= 1.0 and r["metrics"]["iuq/equi_rel_err"] >= 0.0
    assert rows[0]["images_per_iter"] == 4 and rows[1]["images_per_iter"] == 8  # 4 images + their views
    assert "loss_equi" in rows[1]["curves"] and "loss_equi" not in rows[0]["curves"]
    assert "| both" in run.stdout and "Δ AP vs baseline" in run.stdout and (out / "ablation.png").exists()
    assert "2/2 both/seed0" in run.stdout and "ETA" in run.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert again.returncode == 0 and "2 already in" in again.stdout and "0 to do" in again.stdout


@pytest.fixture(scope="module")
def weights(tmp_path_factory, env):
    """A baseline quickstart model after 3 iterations."""
    out = tmp_path_factory.mktemp("trained")
    train = [sys.executable, str(REPO / "train_net.py"), "--config-file", str(REPO / "configs" / "quickstart.yaml"),
             "OUTPUT_DIR", str(out), "MODEL.IUQ.ENABLED", "False", "DATASETS.TEST", "()"] + QUICK
    subprocess.run(train, check=True, capture_output=True, env=env, cwd=out, timeout=600)
    return out / "model_final.pth"


def test_measures_under_eval_only_and_an_identity_view_is_exactly_equivariant(tmp_path, env, weights):
    """With the identity as the only transform (a crop of the whole image), g(f(I)) is f(I) itself:
    the equivariance error is 0 and <q^g, g(F)> scores as <q^g, F^g>."""
    evaluate = [sys.executable, str(REPO / "train_net.py"), "--config-file", str(REPO / "configs" / "quickstart.yaml"),
                "--eval-only", "MODEL.WEIGHTS", str(weights), "OUTPUT_DIR",
                str(tmp_path / "eval"), "MODEL.IUQ.MEASURES.ENABLED", "True", "MODEL.IUQ.EQUI.TRANSFORMS", "('crop',)",
                "MODEL.IUQ.EQUI.CROP_RANGE", "(1.0, 1.0)", "MODEL.FCOS.INFERENCE_TH_TEST", "0.0"] + QUICK
    run = subprocess.run(evaluate, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(x for x in run.stdout.splitlines() + run.stderr.splitlines() if "IUQ measures on" in x)
    values = dict(kv.rsplit(" ", 1) for kv in line.split(": ", 2)[-1].split(", "))
    values = {k: float(v) for k, v in values.items()}
    assert values["equi_rel_err"] == 0.0 and values["equi_dice"] == values["view_dice"]
    assert values["images"] == 4.0
    for key in ("cross_fa", "cross_fa_frac", "own_fa", "own_fa_frac", "between_var", "own_probe"):
        assert 0.0 <= values[key] <= 1.0


def test_views_in_batch_needs_an_even_batch(tmp_path, env):
    cmd = [sys.executable, str(REPO / "train_net.py"), "--config-file", str(REPO / "configs" / "quickstart.yaml"),
           "OUTPUT_DIR", str(tmp_path), "MODEL.IUQ.EQUI.VIEWS_IN_BATCH", "True", "SOLVER.IMS_PER_BATCH", "3"] + QUICK
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert run.returncode != 0 and "SOLVER.IMS_PER_BATCH (3) divisible by 2" in run.stderr


def test_visualize_draws_predictions_and_cross_image_responses(tmp_path, env, weights):
    cmd = [sys.executable, str(REPO / "tools" / "visualize.py"), "--config-file", str(REPO / "configs" / "quickstart.yaml"),
           "--weights", str(weights), "--weights-b", str(weights), "--names", "a", "b", "--num-images", "3",
           "--output-dir", str(tmp_path / "vis"), "OUTPUT_DIR", str(tmp_path / "out")]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("predictions.png", "responses_a.png", "responses_b.png"):
        assert (tmp_path / "vis" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = subprocess.run(cmd[:5] + [str(tmp_path / "none.pth"), "--output-dir", str(tmp_path / "v2")],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert missing.returncode != 0 and "none.pth does not exist" in missing.stderr
