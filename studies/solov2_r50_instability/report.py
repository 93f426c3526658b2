#!/usr/bin/env python3
"""Issue 30's tables, from the rows this folder holds (markdown on stdout):

- ``probes.jsonl`` (``probe.py``): per run (norm, seed, variant, tag), the steps, the largest
  own-instance probability per step, and the first step where every mask is off (the dead-mask
  monitor's reading: largest p < DEAD_MASK_P);
- ``slim_bound.jsonl`` (``slim_bound.py``): the slim quickstart SOLOv2 at the paper's setting, per
  seed and ``INTER.GRAD_BOUND``, whether the masks are alive through the last 10 of 30 steps.

    python studies/solov2_r50_instability/report.py
"""
import json
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEAD_MASK_P = 1e-3  # iuq.engine.hooks.DEAD_MASK_P (not imported: detectron2 need not be installed here)


def rows(name):
    path = HERE / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def probe_table():
    runs = defaultdict(list)
    for r in rows("probes.jsonl"):
        runs[(r["norm"], r["seed"], r["variant"], r.get("tag", ""))].append(r)
    print("| norm | seed | variant | tag | steps | largest own-instance p per step | first dead step |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (norm, seed, variant, tag), steps in sorted(runs.items()):
        steps = sorted({s["step"]: s for s in steps}.values(), key=lambda s: s["step"])  # a rerun's rows: the last
        p = [s.get("own_p_max") for s in steps]
        dead = next((s["step"] for s in steps if s.get("own_p_max") is not None and s["own_p_max"] < DEAD_MASK_P), None)
        shown = ", ".join("–" if x is None else f"{x:.2g}" for x in p)
        print(f"| {norm} | {seed} | {variant} | {tag or '—'} | {len(steps)} | {shown} | {'none' if dead is None else dead} |")


def slim_table():
    found = rows("slim_bound.jsonl")
    if not found:
        return
    by = defaultdict(dict)
    for r in found:
        p = r["own_p_max"]
        state = "alive" if min(p[-10:]) >= DEAD_MASK_P else ("dead" if max(p[-10:]) < DEAD_MASK_P else "mixed")
        first = next((i for i, x in enumerate(p) if x < DEAD_MASK_P), None)
        by[r["grad_bound"]][r["seed"]] = f"{state}" + ("" if first is None else f" (first dead step {first})")
    seeds = sorted({s for v in by.values() for s in v})
    print()
    print("| `INTER.GRAD_BOUND` | " + " | ".join(f"seed {s}" for s in seeds) + " | alive |")
    print("| --- | " + " | ".join("---" for _ in seeds) + " | --- |")
    for bound in sorted(by):
        cells = [by[bound].get(s, "—") for s in seeds]
        alive = sum(c.startswith("alive") for c in cells)
        label = "0 (off, the paper)" if bound == 0 else f"{bound:g}"
        print(f"| {label} | " + " | ".join(cells) + f" | {alive} of {sum(c != '—' for c in cells)} |")


if __name__ == "__main__":
    probe_table()
    slim_table()
