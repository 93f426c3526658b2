#!/usr/bin/env bash
# The textures study (docs/study.md, "Study 2: the textures testbed"), in its fixed order, as
# amended on 2026-12-07 ("Amendment 1", before any run after inter/seed0; "Amendment 3",
# the order of steps 2 and 3 only, on 2026-12-07 evening). Every command is
# resumable: a run already in results.jsonl is skipped, a killed one resumes from its last
# checkpoint. Rerun this script to continue; JOBS=2 trains two runs at once.
#   OMP_NUM_THREADS=1 nohup bash studies/textures_condinst/run.sh > studies/textures_condinst/runner.log 2>&1 &

cd "$(dirname "$0")/../.."
CONFIG=configs/studies/textures_condinst.yaml
OUT=studies/textures_condinst
JOBS=${JOBS:-1}
MAIN="baseline augment inter equi both both_matched"
BOUND="MODEL.IUQ.INTER.GRAD_BOUND 0.3"
study() { python3 tools/ablation.py --config-file "$CONFIG" --output-dir "$OUT" --jobs "$JOBS" \
    --references baseline augment equi "$@"; }
# A main mode whose masks died on every one of seeds 0-2 is not run at seeds 3-4 (Amendment 1).
alive_modes() { python3 tools/ablation.py --config-file "$CONFIG" --output-dir "$OUT" --drop-dead 0 1 2 --modes "$@"; }

# 1. Seeds 0-2, seed by seed: the main modes, then the bounded arms (L_inter's gradient at the
#    query head capped at 0.3x the base losses', issue 30's remedy) of inter and both.
for seed in 0 1 2; do
    study --modes $MAIN --seeds "$seed"
    study --modes inter both --seeds "$seed" --sweep $BOUND
done
# 2. Seeds 3-4: the main modes still alive, and the bounded arms (before the option rows since
#    Amendment 3: the primary question first; every run still runs).
for seed in 3 4; do
    study --modes $(alive_modes $MAIN) --seeds "$seed"
    study --modes inter both --seeds "$seed" --sweep $BOUND
done
# 3. The open choices (issue 26, item 3) for inter and both, seeds 0-2, seed by seed: the other
#    value of each key the study config pins (there: detached negatives, alpha on the positives,
#    every positive query, one RandomChoice per batch).
for seed in 0 1 2; do
    study --modes inter both --seeds "$seed" --sweep MODEL.IUQ.INTER.DETACH_NEGATIVES False
    study --modes inter both --seeds "$seed" --sweep MODEL.IUQ.INTER.ALPHA_WEIGHTS negatives
    study --modes inter both --seeds "$seed" --sweep MODEL.IUQ.INTER.QUERIES matched_originals
    study --modes both --seeds "$seed" --sweep MODEL.IUQ.EQUI.DRAW per_image_compose
done
