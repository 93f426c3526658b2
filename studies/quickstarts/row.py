"""One row of studies/quickstarts/results.jsonl from a finished quickstart run (run.sh):
name, config, wall seconds, commit, segm AP / AP50, alive (iuq.study.masks_alive), seconds per
iteration, and the losses logged at iteration 19 (the README's sample line).
    python studies/quickstarts/row.py NAME CONFIG OUTPUT_DIR WALL_S LOG"""
import json
import re
import subprocess
import sys

from iuq import study


def main(name, config, output_dir, wall_s, log):
    run = study.read_run(output_dir)
    row = {"name": name, "config": config, "wall_s": round(float(wall_s), 1), **run}
    row["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    row["alive"] = study.masks_alive(row)
    with open(log) as f:
        line19 = next((line.strip() for line in f if re.search(r"\biter: 19\b", line)), None)
    row["log_iter19"] = line19
    print(json.dumps({k: row[k] for k in ("name", "config", "commit", "wall_s", "alive", "sec_per_iter", "iters",
                                          "log_iter19", "metrics")}))


if __name__ == "__main__":
    main(*sys.argv[1:])
