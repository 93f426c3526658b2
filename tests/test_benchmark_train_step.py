"""benchmarks/train_step.py as a user runs it (small images, one batch): it must finish and print a
baseline row at ratio 1 and an IUQ row whose ratios are numbers, with IUQ's own seconds inside its
steps > 0 (so in-step x > 1). CondInst here (SOLOv2's row is the same code, and cost this test ~8
of its ~13 minutes on one core; Mask2Former's and SparseInst's rows are checked in their own
files). Times are not bounded: this is no timed test (the benchmark prints ratios measured in one
run; a loaded machine moves them); memory ratios are."""
import os
import subprocess
import sys

from adelaidet_support import REPO, require_adelaidet

require_adelaidet()


def test_train_step_benchmark_prints_every_models_ratios():
    cmd = [sys.executable, str(REPO / "benchmarks" / "train_step.py"), "--models", "CondInst",
           "--modes", "baseline", "both", "twin", "matched",
           "--memory", "2000", "--batches", "1", "--min-size", "160", "--max-size", "240"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=dict(os.environ), timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    per_step, per_iter = out.stdout.split("Per iteration")
    rows = {tuple(line.split()[:2]): line for line in per_step.splitlines() if line.split()[1:2] in (["baseline"], ["both"])}
    assert set(rows) == {("CondInst", mode) for mode in ("baseline", "both")}, out.stdout
    for (model, mode), line in rows.items():
        # model mode memory | s/image time x median x n | in-step x IUQ s/im | peak GiB peak x | queries
        cells = [c.split() for c in line.split("|")]
        seconds, time_x, median_x, n = map(float, cells[1])
        in_step_x, iuq_seconds = map(float, cells[2])
        peak_gib, peak_x = map(float, cells[3])
        assert seconds > 0 and peak_gib > 0 and n >= 1, line
        if mode == "baseline":
            assert (time_x, median_x, in_step_x, iuq_seconds, peak_x) == (1.0, 1.0, 1.0, 0.0, 1.0), line
        else:
            assert cells[0][2] == "2K" and float(cells[4][0]) > 0, line  # memory size, queries per step
            assert in_step_x > 1.0 and iuq_seconds > 0, line
            assert time_x > 0 and median_x > 0 and 0.5 < peak_x < 2, line
    # Per iteration against the IUQ-off twin: images per step, iteration time and peak ratios.
    iters = {tuple(line.split()[:2]): [c.split() for c in line.split("|")] for line in per_iter.splitlines()
             if line.split()[1:2] in (["twin"], ["both"], ["matched"])}
    for model in ("CondInst",):
        twin, both, matched = iters[(model, "twin")], iters[(model, "both")], iters[(model, "matched")]
        assert (twin[1], twin[2], twin[3]) == (["2"], ["1.000"], ["1.000"])
        assert both[1] == ["4"] and matched[1] == ["2"]
        assert float(matched[2][0]) > 0 and 0.5 < float(matched[3][0]) < 2
