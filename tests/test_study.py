"""The ablation study's logic without training: modes -> overrides, the run plan, resumable
results, statistics against hand computations, reading detectron2's metrics.json, the table and
the figure. Needs no detectron2."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from iuq import study

REPO = Path(__file__).resolve().parents[1]


def test_modes_are_the_papers_rows_as_config_overrides():
    def opts(mode):
        o = study.MODES[mode][1]
        return dict(zip(o[0::2], o[1::2]))

    assert opts("baseline") == {"MODEL.IUQ.ENABLED": "False"}
    assert opts("augment")["MODEL.IUQ.EQUI.MODE"] == "augment" and opts("augment")["MODEL.IUQ.INTER.ENABLED"] == "False"
    assert opts("inter")["MODEL.IUQ.EQUI.ENABLED"] == "False" and opts("inter")["MODEL.IUQ.INTER.ENABLED"] == "True"
    assert opts("equi")["MODEL.IUQ.INTER.ENABLED"] == "False" and opts("equi")["MODEL.IUQ.EQUI.MODE"] == "full"
    assert opts("feature")["MODEL.IUQ.EQUI.MODE"] == "feature"
    assert opts("both")["MODEL.IUQ.INTER.ENABLED"] == "True" and opts("both")["MODEL.IUQ.EQUI.MODE"] == "full"
    assert opts("both_matched") == {**opts("both"), "MODEL.IUQ.EQUI.VIEWS_IN_BATCH": "True"}


def test_plan_is_seed_major_and_sweeps_every_mode():
    runs = study.plan_runs(["baseline", "both"], [0, 1])
    assert [r.key for r in runs] == ["baseline/seed0", "both/seed0", "baseline/seed1", "both/seed1"]
    runs = study.plan_runs(["both"], [3], sweep=("MODEL.IUQ.MEMORY.SIZE", ["0", "1000"]))
    assert [r.variant for r in runs] == ["both@MODEL.IUQ.MEMORY.SIZE=0", "both@MODEL.IUQ.MEMORY.SIZE=1000"]
    assert runs[1].overrides[-2:] == ["MODEL.IUQ.MEMORY.SIZE", "1000"] and runs[1].sweep == ("MODEL.IUQ.MEMORY.SIZE", "1000")
    with pytest.raises(ValueError, match="Unknown mode"):
        study.plan_runs(["bogus"], [0])


def test_paired_difference_against_a_hand_computation():
    # diffs 1, 2, 3: mean 2, sd 1, n 3, t(0.975, 2) = 4.302653 -> half-width 4.302653 / sqrt(3)
    mean, half, n = study.paired_difference({0: 11.0, 1: 12.0, 2: 13.0, 9: 99.0}, {0: 10.0, 1: 10.0, 2: 10.0})
    assert (mean, n) == (2.0, 3)
    assert half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    mean, half, n = study.paired_difference({0: 1.0}, {0: 0.5})
    assert (mean, n) == (0.5, 1) and math.isnan(half)
    assert study.mean_std([1.0, 2.0, 4.0]) == pytest.approx((7 / 3, math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)))


def _row(variant, seed, ap, fp="s1", **extra):
    mode = variant.split("@")[0]
    return {"study": fp, "variant": variant, "mode": mode, "seed": seed, "metrics": {"segm/AP": ap}, **extra}


def test_summary_pairs_by_seed_and_ignores_other_studies():
    rows = [_row("baseline", 0, 10.0), _row("baseline", 1, 12.0), _row("both", 0, 11.0), _row("both", 1, 14.0),
            _row("both", 2, 50.0), _row("both", 0, 99.0, fp="other")]
    s = {x.variant: x for x in study.summarise(rows, "s1", references=("baseline",))}
    assert s["both"].seeds == [0, 1, 2]
    assert s["both"].stats["segm/AP"][0] == pytest.approx(25.0)
    mean, half, n = s["both"].diffs[("baseline", "segm/AP")]
    assert (mean, n) == (1.5, 2)  # seeds 0 and 1 only: (1 + 2) / 2
    assert half == pytest.approx(12.706205 * math.sqrt(0.5) / math.sqrt(2), rel=1e-6)  # sd of (1, 2)
    assert ("baseline", "segm/AP") not in s["baseline"].diffs


def test_swept_variants_compare_to_the_reference_at_the_same_value():
    key = "MODEL.IUQ.MEMORY.SIZE"
    rows = [_row(f"baseline@{key}=0", 0, 10.0, sweep=[key, "0"]), _row(f"both@{key}=0", 0, 12.0, sweep=[key, "0"]),
            _row("baseline", 0, 1.0), _row(f"both@{key}=5", 0, 3.0, sweep=[key, "5"])]
    s = {x.variant: x for x in study.summarise(rows, references=("baseline",))}
    assert s[f"both@{key}=0"].diffs[("baseline", "segm/AP")][0] == 2.0
    assert s[f"both@{key}=5"].diffs[("baseline", "segm/AP")][0] == 2.0  # no baseline at 5: the plain one


def test_results_file_is_resumable_and_survives_a_torn_line(tmp_path):
    path = tmp_path / "r" / "results.jsonl"
    study.append_result(str(path), _row("baseline", 0, 1.0))
    study.append_result(str(path), _row("both", 0, 2.0))
    with open(path, "a") as f:
        f.write('{"study": "s1", "variant": "tor')  # killed mid-write
    rows = study.load_results(str(path))
    assert len(rows) == 2
    assert study.done_keys(rows, "s1") == {"baseline/seed0", "both/seed0"}
    assert study.done_keys(rows, "s2") == set()


def test_fingerprint_changes_with_the_config_and_the_overrides(tmp_path):
    cfg = tmp_path / "a.yaml"
    cfg.write_text("SOLVER:\n  MAX_ITER: 10\n")
    a = study.study_fingerprint(str(cfg), ["SOLVER.BASE_LR", "0.1"])
    assert a == study.study_fingerprint(str(cfg), ["SOLVER.BASE_LR", "0.1"])
    assert a != study.study_fingerprint(str(cfg), ["SOLVER.BASE_LR", "0.2"])
    assert a != study.study_fingerprint(str(cfg), ["SOLVER.BASE_LR", "0.1"], num_gpus=8)
    cfg.write_text("SOLVER:\n  MAX_ITER: 20\n")
    assert a != study.study_fingerprint(str(cfg), ["SOLVER.BASE_LR", "0.1"])
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "child.yaml"
    child.write_text('_BASE_: "../a.yaml"\n')
    b = study.study_fingerprint(str(child), [])
    cfg.write_text("SOLVER:\n  MAX_ITER: 30\n")  # a change in the base changes the child's study
    assert b != study.study_fingerprint(str(child), [])
    assert study.config_files(str(child)) == [str(child), str(cfg)]


def test_read_run_takes_the_last_evaluation_the_median_time_past_warmup_and_the_curves(tmp_path):
    lines = [{"iteration": i, "time": 10.0 if i < 10 else 1.0 + (i % 3), "loss_mask": 1.0 / (i + 1),
              "loss_inter": 0.1, "peak_mem_mb": 100.0 + i} for i in range(0, 100, 5)]
    lines.append({"iteration": 95, "time": 2.0, "total_loss": 1.0})
    lines.append({"iteration": 100, "segm/AP": 12.5, "segm/AP50": 30.0, "iuq/cross_fa": 0.01})
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    info = study.read_run(str(tmp_path))
    assert info["metrics"] == {"segm/AP": 12.5, "segm/AP50": 30.0, "iuq/cross_fa": 0.01}
    times = sorted([1.0 + (i % 3) for i in range(10, 100, 5)] + [2.0])  # iterations >= 10% of 95
    assert info["sec_per_iter"] == times[len(times) // 2]
    assert info["peak_mem_mb"] == 195.0 and info["iters"] == 96
    assert info["curves"]["iteration"][:2] == [0, 5] and info["curves"]["loss_mask"][1] == pytest.approx(1 / 6)
    assert "loss_equi" not in info["curves"]
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        study.read_run(str(tmp_path / "nowhere"))


def test_a_run_is_dead_when_its_masks_are_off_at_the_end():
    dice = lambda tail: {"iteration": list(range(len(tail))), "loss_mask": tail}  # noqa: E731
    assert study.masks_alive(_row("x", 0, 0.0, curves=dice([0.9, 0.8] + [1.0] * 5))) is False  # inter/seed0's shape
    assert study.masks_alive(_row("x", 0, 0.0, curves=dice([1.0] * 5 + [0.3] * 3))) is True  # dead, then back
    assert study.masks_alive(_row("x", 0, 0.0, curves=dice([0.3, 0.995, 0.996, 0.2, 0.997]))) is False  # median 0.995
    row = _row("x", 0, 5.0, curves=dice([1.0] * 5))
    row["metrics"]["iuq/own_mask_p"] = 0.73  # the monitor's reading wins over the curve
    assert study.masks_alive(row) is True
    row["metrics"]["iuq/own_mask_p"] = 0.0
    assert study.masks_alive(row) is False
    assert study.masks_alive(_row("x", 0, 5.0)) is None  # nothing to judge by
    rows = [_row("baseline", 0, 10.0, curves=dice([0.3] * 5)), _row("baseline", 1, 12.0, curves=dice([0.3] * 5)),
            _row("inter", 0, 0.0, curves=dice([1.0] * 5)), _row("inter", 1, 11.0, curves=dice([0.3] * 5))]
    summaries = {s.variant: s for s in study.summarise(rows)}
    assert summaries["inter"].alive == (1, 2) and summaries["baseline"].alive == (2, 2)
    table = study.format_table(list(summaries.values()))
    assert " alive " in table.splitlines()[0]
    inter_line = next(line for line in table.splitlines() if line.startswith("| inter"))
    assert "| 1/2 " in inter_line and "-5.50 [" in inter_line  # the dead seed counts at its AP: ((0 - 10) + (11 - 12)) / 2


def test_the_stopping_rule_drops_only_a_mode_dead_at_every_seed():
    dead, live = {"iteration": [0], "loss_mask": [1.0]}, {"iteration": [0], "loss_mask": [0.3]}
    rows = [_row("inter", s, 0.0, curves=dead) for s in (0, 1, 2)] + [
        _row("both", 0, 0.0, curves=dead), _row("both", 1, 0.0, curves=dead), _row("both", 2, 9.0, curves=live),
        _row("equi", 0, 0.0, curves=dead), _row("equi", 1, 0.0, curves=dead),  # seed 2 not run yet
        _row("inter@K=1", 0, 0.0, sweep=["K", "1"], curves=live)]
    assert study.modes_alive(rows, ["baseline", "inter", "both", "equi"], [0, 1, 2]) == ["baseline", "both", "equi"]
    assert study.modes_alive(rows, ["inter", "equi"], [0, 1]) == []


def test_the_schedule_rule_on_hand_made_pilots(tmp_path):
    # the textures pilot: +4.1 AP from 500 to 750 is 38% of 10.71, not levelled: the cap
    assert study.schedule_from_pilot([(250, 2.57), (500, 6.61), (750, 10.71)], cap=1000) == 750  # reached no more
    assert study.schedule_from_pilot([(250, 2.57), (500, 6.61), (750, 10.71), (1000, 12.0)], cap=1000) == 1000
    # levelled at 750: 10.0 -> 10.5 is +0.5 < 0.1 * 10.5
    assert study.schedule_from_pilot([(250, 4.0), (500, 10.0), (750, 10.5), (1000, 10.6)]) == 750
    assert study.schedule_from_pilot([(250, 4.0), (500, 3.0), (750, 5.0)]) == 500  # a drop is no gain
    # below the floor a drop is noise (testbed 2's pilot: 0.63, 0.34, 0.77 at 250-750)
    assert study.schedule_from_pilot([(250, 0.63), (500, 0.34), (750, 0.77), (1000, 0.8)], cap=1000) == 1000
    assert study.schedule_from_pilot([(250, 0.63), (500, 0.34)], floor=0.0) == 500
    with pytest.raises(ValueError, match="EVAL_PERIOD"):
        study.schedule_from_pilot([])
    lines = [{"iteration": 10, "total_loss": 1.0}, {"iteration": 249, "segm/AP": 2.0},
             {"iteration": 499, "total_loss": 0.9}, {"iteration": 500, "segm/AP": 5.0, "segm/AP50": 9.0}]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert study.pilot_evaluations(str(tmp_path)) == [(250, 2.0), (500, 5.0)]  # the final one at MAX_ITER


def test_table_and_figure(tmp_path):
    curves = {"iteration": [0, 10], "loss_mask": [1.0, 0.5], "loss_inter": [0.1, 0.05]}
    rows = [_row("baseline", 0, 10.0, curves=curves, sec_per_iter=0.3), _row("baseline", 1, 12.0, sec_per_iter=0.3),
            _row("both", 0, 11.0, curves=curves, sec_per_iter=0.6), _row("both", 1, 14.0, sec_per_iter=0.6)]
    summaries = study.summarise(rows)
    table = study.format_table(summaries)
    assert "| both" in table and "12.50 ± 2.12" in table and "+1.50 [" in table and "s/iter" in table
    both = study.format_tables(summaries).split("\n\n")
    assert len(both) == 2 and "Δ AP" in both[0] and "s/iter" in both[1] and "s/iter" not in both[0]
    study.plot_study(rows, summaries, str(tmp_path / "a.png"))
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_runner_reports_a_finished_study_and_plans_the_rest(tmp_path):
    """tools/ablation.py as a user runs it: --report on a results file, --dry-run for what is left."""
    cfg = REPO / "configs" / "quickstart.yaml"
    out = tmp_path / "study"
    fp = study.study_fingerprint(str(cfg), ["MODEL.IUQ.MEASURES.ENABLED", "True"], 1)
    for seed, (b, m) in enumerate([(10.0, 11.0), (12.0, 14.0)]):
        study.append_result(str(out / "results.jsonl"), _row("baseline", seed, b, fp=fp))
        study.append_result(str(out / "results.jsonl"), _row("both", seed, m, fp=fp))
    tool = [sys.executable, str(REPO / "tools" / "ablation.py"), "--config-file", str(cfg), "--output-dir", str(out)]
    report = subprocess.run(tool + ["--modes", "baseline", "both", "--seeds", "0", "1", "--report"],
                            capture_output=True, text=True, check=True).stdout
    assert "+1.50 [" in report and (out / "ablation.png").exists()
    plan = subprocess.run(tool + ["--modes", "baseline", "both", "inter", "--seeds", "0", "1", "--dry-run"],
                          capture_output=True, text=True, check=True).stdout
    assert "4 already in" in plan and plan.count("train_net.py") == 2 and "SEED 1" in plan
    bad = subprocess.run(tool + ["--modes", "nope"], capture_output=True, text=True)
    assert bad.returncode != 0 and "Unknown mode" in bad.stderr
