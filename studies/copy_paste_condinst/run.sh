#!/usr/bin/env bash
# Testbed 2 of the study (docs/study.md, "Study 2", "Testbed 2", Amendments 1 and 2): copy-paste
# scenes of real COCO instances, class-agnostic. Every step is resumable: rerun this script to continue.
#   OMP_NUM_THREADS=1 nohup bash studies/copy_paste_condinst/run.sh > studies/copy_paste_condinst/runner.log 2>&1 &
set -e
cd "$(dirname "$0")/../.."
CONFIG=configs/studies/copy_paste_condinst.yaml
OUT=studies/copy_paste_condinst
JOBS=${JOBS:-1}
BOUND="MODEL.IUQ.INTER.GRAD_BOUND 0.3"
SCHEDULE_FILE=$OUT/schedule.txt  # the study's schedule, once its pilot has fixed it (committed)

if [ ! -f "$SCHEDULE_FILE" ]; then
    # 1. The pilot: the baseline at constant lr (after the warm-up), segm AP every 250 iterations
    #    up to the CPU budget's cap, 1000.
    PILOT=$OUT/pilot
    if ! python3 tools/pilot_schedule.py "$PILOT" --cap 1000 --require 1000 > /dev/null 2>&1; then
        RESUME=""
        [ -f "$PILOT/last_checkpoint" ] && RESUME=--resume
        mkdir -p "$PILOT"
        python3 train_net.py --config-file "$CONFIG" $RESUME MODEL.IUQ.ENABLED False MODEL.IUQ.MEASURES.ENABLED False \
            SOLVER.MAX_ITER 1000 SOLVER.STEPS "(100000,)" TEST.EVAL_PERIOD 250 SEED 0 OUTPUT_DIR "$PILOT" \
            >> "$PILOT/log.txt" 2>&1
    fi
    # 2. The schedule by the rule (N, lr / 10 at 0.8 N), as overrides every run of the study gets.
    python3 tools/pilot_schedule.py "$PILOT" --cap 1000 > "$SCHEDULE_FILE"
fi
read -ra SCHEDULE < "$SCHEDULE_FILE"
study() { python3 tools/ablation.py --config-file "$CONFIG" --output-dir "$OUT" --jobs "$JOBS" \
    --references baseline equi "$@" -- "${SCHEDULE[@]}"; }
# 3. Seeds 0-2, seed by seed: the issue's modes, then the bounded arms of inter and both.
for seed in 0 1 2; do
    study --modes baseline inter equi both --seeds "$seed"
    study --modes inter both --seeds "$seed" --sweep $BOUND
done
# The tables and figure of what has finished.
study --report
