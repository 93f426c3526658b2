#!/usr/bin/env python3
"""Issue 30's tables, from the rows this folder holds (markdown on stdout):

- ``mechanism.jsonl`` (``probe.py --steps 13``, with the lr scheduler stepped): per norm, step by
  step, what the issue's item 1 asks for: the raw ``loss_inter``, the negatives' largest logit and
  share above 0, the kernels' and mask features' norms, and the weighted ``L_inter``'s gradient at
  the kernel head against the base dice loss's (ratio of norms, cosine);
- ``probes.jsonl`` (``probe.py``): per run (norm, seed, variant, tag), the steps, the largest
  own-instance probability per step, and the first step where every mask is off (the dead-mask
  monitor's reading: largest p < DEAD_MASK_P);
- ``runs50.jsonl`` (``run.sh``: ``probe.py --steps 50``): the same per run, for the issue's 50 steps,
  seeds 0-2, both norms, with the option on and off and the IUQ-off and ``augment`` twins;
- ``runs70.jsonl`` (``probe.py --steps 70``): FrozenBN seed 0 with the momentum bound carried past
  the grid's 50 steps (it died at step 50), and its IUQ-off and ``augment`` twins carried as far;
- ``runs50_constant_lr.jsonl``: the first 50-step run, cut at step 37 when it was found that
  ``probe.py`` did not step the lr scheduler (so the lr stayed at the warm-up's first value,
  1e-4, as in every run of ``probes.jsonl``); kept because every run made is reported;
- ``paper_setting.jsonl`` (``run.sh``, step 0): the same model at the paper's setting (IUQ's
  weights full from step 0), 15 steps, with and without the bound;
- ``slim_bound.jsonl`` (``slim_bound.py``): the slim quickstart SOLOv2 at the paper's setting, per
  seed and ``INTER.GRAD_BOUND``, whether the masks are alive through the last 10 of 30 steps;
- ``sotr_bound.jsonl`` (``sotr_bound.py``): the same for the real SOTR R50 (the tests' small
  setting), through the last 5 of 10 steps.

    python studies/solov2_r50_instability/report.py
"""
import json
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEAD_MASK_P = 1e-3  # iuq.engine.hooks.DEAD_MASK_P (not imported: detectron2 need not be installed here)
DICE_WEIGHT = 3.0  # MODEL.SOLOV2.LOSS.DICE_WEIGHT: loss_ins is 3.0 where no mask fires anywhere
DEAD_DICE = 0.99  # iuq.study.masks_alive's reading of the base dice loss


def dead_step(row):
    """Whether every mask is off at this step: the dead-mask monitor's reading (largest
    own-instance p below DEAD_MASK_P) where the row has it, else (the IUQ-off and ``augment``
    twins, which capture no queries) the base dice loss at DEAD_DICE of its maximum or more."""
    if row.get("own_p_max") is not None:
        return row["own_p_max"] < DEAD_MASK_P
    return row.get("loss_ins") is not None and row["loss_ins"] >= DEAD_DICE * DICE_WEIGHT


def rows(name):
    """The JSON rows of ``name`` (a file of this folder, or a path); none where it does not exist."""
    path = Path(name) if "/" in str(name) else HERE / name  # a bare name: this folder's file
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run_key(row):
    """A probe run's identity in its rows: (norm, seed, variant, tag)."""
    return row["norm"], row["seed"], row["variant"], row.get("tag", "")


def runs_of(name):
    """``name``'s rows by run (``run_key``), each run's rows in step order (a rerun's rows: the last)."""
    runs = defaultdict(dict)
    for r in rows(name):
        runs[run_key(r)][r["step"]] = r
    return {key: [by_step[k] for k in sorted(by_step)] for key, by_step in sorted(runs.items())}


def probe_table(name="probes.jsonl", every_step=True):
    runs = runs_of(name)
    if not runs:
        return
    print(f"\n`{name}`:\n")
    if every_step:
        print("| norm | seed | variant | tag | steps | largest own-instance p per step | first dead step |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
    else:
        print("| norm | seed | variant | tag | steps | first dead step | dead steps | `loss_ins` last 5 (max 3) | largest raw `loss_inter` | bound bit (steps; median scale) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (norm, seed, variant, tag), steps in runs.items():
        p = [s.get("own_p_max") for s in steps]
        dead = next((s["step"] for s in steps if dead_step(s)), None)
        first = "none" if dead is None else str(dead)
        if every_step:
            shown = ", ".join("–" if x is None else f"{x:.2g}" for x in p)
            print(f"| {norm} | {seed} | {variant} | {tag or '—'} | {len(steps)} | {shown} | {first} |")
            continue
        n_dead = sum(dead_step(s) for s in steps)
        stopped = " (stopped: dead)" if steps[-1].get("stopped_dead") else ""
        tail = ", ".join(f"{s['loss_ins']:.2f}" for s in steps[-5:])
        raw = [s["raw_loss_inter"] for s in steps if s.get("raw_loss_inter") is not None]
        scales = sorted(1.0 if s.get("inter_grad_scale") is None else s["inter_grad_scale"] for s in steps)
        bit = f"{sum(x < 1 for x in scales)}; {scales[len(scales) // 2]:.2g}"
        print(f"| {norm} | {seed} | {variant} | {tag or '—'} | {len(steps)}{stopped} | {first} | {n_dead} | {tail} | "
              f"{f'{max(raw):.1f}' if raw else '—'} | {bit if 'bound' in tag else '—'} |")


def mechanism_table(name="mechanism.jsonl"):
    """Step by step per run: what grows, and how hard ``L_inter`` pulls the kernels against the base
    dice loss (the norm of the weighted ``L_inter``'s gradient at ``kernel_pred`` over the dice
    loss's, and their cosine)."""
    for (norm, seed, variant, tag), steps in runs_of(name).items():
        print(f"\n`{name}`: {norm}, seed {seed}, {variant}{f' ({tag})' if tag else ''}\n")
        print("| step | lr | ramp | raw `loss_inter` | largest neg. logit | neg. pairs > 0 | kernel norm | "
              "feature norm | g_inter / g_dice at kernels | cosine | largest own p | `loss_ins` |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for s in steps:
            g = s.get("grad_kernel_inter_weighted"), s.get("grad_kernel_ins")
            ratio = f"{g[0] / g[1]:.2f}" if None not in g and g[1] > 0 else "—"
            cos = s.get("grad_kernel_cosine")
            print(f"| {s['step']} | {s['lr']:.2e} | {s['ramp']:.3f} | {s['raw_loss_inter']:.2f} | "
                  f"{s['neg_logit_max']:.1f} | {s['neg_share_above_0']:.0%} | {s['kernel_norm_mean']:.1f} | "
                  f"{s['feature_norm_mean']:.1f} | {ratio} | {'—' if cos is None else f'{cos:.2f}'} | "
                  f"{s['own_p_max']:.2g} | {s['loss_ins']:.2f} |")


def bound_table(name="slim_bound.jsonl", tail=10):
    """Per ``INTER.GRAD_BOUND`` and seed: alive / dead / mixed through the last ``tail`` steps."""
    found = rows(name)
    if not found:
        return
    print(f"\n`{name}` (alive: every one of the last {tail} steps alive):\n")
    by = defaultdict(dict)
    for r in found:
        p = r["own_p_max"]
        state = "alive" if min(p[-tail:]) >= DEAD_MASK_P else ("dead" if max(p[-tail:]) < DEAD_MASK_P else "mixed")
        first = next((i for i, x in enumerate(p) if x < DEAD_MASK_P), None)
        by[r["grad_bound"], r.get("grad_bound_on", "step")][r["seed"]] = f"{state}" + ("" if first is None else f" (first dead step {first})")
    seeds = sorted({s for v in by.values() for s in v})
    print("| `INTER.GRAD_BOUND` | " + " | ".join(f"seed {s}" for s in seeds) + " | alive |")
    print("| --- | " + " | ".join("---" for _ in seeds) + " | --- |")
    for bound, on in sorted(by):
        cells = [by[bound, on].get(s, "—") for s in seeds]
        alive = sum(c.startswith("alive") for c in cells)
        label = "0 (off, the paper)" if bound == 0 else f"{bound:g}" + ("" if on == "step" else f" on the {on}")
        print(f"| {label} | " + " | ".join(cells) + f" | {alive} of {sum(c != '—' for c in cells)} |")


if __name__ == "__main__":
    mechanism_table()
    probe_table()
    probe_table("runs50_constant_lr.jsonl", every_step=False)
    probe_table("paper_setting.jsonl")
    probe_table("runs50.jsonl", every_step=False)
    probe_table("runs70.jsonl", every_step=False)
    bound_table()
    bound_table("sotr_bound.jsonl", tail=5)
