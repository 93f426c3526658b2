#!/usr/bin/env bash
# The textures study (docs/study.md, "Study 2: the textures testbed"), in its fixed order. Every
# command is resumable: a run already in results.jsonl is skipped, a killed one resumes from its
# last checkpoint. Rerun this script to continue; JOBS=2 trains two runs at once.
#   OMP_NUM_THREADS=1 nohup bash studies/textures_condinst/run.sh > studies/textures_condinst/runner.log 2>&1 &

cd "$(dirname "$0")/../.."
CONFIG=configs/studies/textures_condinst.yaml
OUT=studies/textures_condinst
JOBS=${JOBS:-1}
MAIN="baseline augment inter equi both both_matched"
study() { python3 tools/ablation.py --config-file "$CONFIG" --output-dir "$OUT" --jobs "$JOBS" "$@"; }

# 1. The main modes, seeds 0-2 (seed-major).
study --modes $MAIN --seeds 0 1 2
# 2. The open choices (issue 26, item 3) for inter and both, seeds 0-2, seed by seed: the other
#    value of each key the study config pins (there: detached negatives, alpha on the positives,
#    every positive query, one RandomChoice per batch).
for seed in 0 1 2; do
    study --modes inter both --seeds "$seed" --sweep MODEL.IUQ.INTER.DETACH_NEGATIVES False
    study --modes inter both --seeds "$seed" --sweep MODEL.IUQ.INTER.ALPHA_WEIGHTS negatives
    study --modes inter both --seeds "$seed" --sweep MODEL.IUQ.INTER.QUERIES matched_originals
    study --modes both --seeds "$seed" --sweep MODEL.IUQ.EQUI.DRAW per_image_compose
done
# 3. The main modes, seeds 3-4.
study --modes $MAIN --seeds 0 1 2 3 4
