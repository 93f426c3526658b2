#!/usr/bin/env bash
# Issue 30, item 3: the real SOLOv2 R50 from random initialisation on the COCO sample (probe.py's
# setting), 50 steps, seeds 0-2, FrozenBN and trainable BN; per (norm, seed): IUQ on with the bound
# (MODEL.IUQ.INTER.GRAD_BOUND 0.3), IUQ on without it (the paper's), the IUQ-off twin and the
# `augment` twin. One row per step in runs50.jsonl; report.py prints the table. Resumable: a run
# already there is skipped, one cut off part-way reruns from step 0. A run whose masks have all
# been off for 10 steps stops there (SOLOv2's dead state is absorbing).
#   OMP_NUM_THREADS=1 nohup bash studies/solov2_r50_instability/run.sh > studies/solov2_r50_instability/runner.log 2>&1 &
cd "$(dirname "$0")/../.."
HERE=studies/solov2_r50_instability
export DETECTRON2_DATASETS=${DETECTRON2_DATASETS:-$(cd .. && pwd)/shared/datasets}
probe() { python3 "$HERE/probe.py" --steps 50 --no-grads --stop-dead 10 --skip-done \
    --out "$HERE/runs50.jsonl" --output output/solov2_r50_runs50 "$@"; }
# 0. The paper's setting on the same model (IUQ's weights full from step 0: MODEL.IUQ.WARMUP_ITERS 0),
#    15 steps, with and without the bound: the setting of tests/test_r50_bound.py.
paper() { python3 "$HERE/probe.py" --steps 15 --no-grads --stop-dead 5 --skip-done \
    --out "$HERE/paper_setting.jsonl" --output output/solov2_r50_paper "$@"; }
paper --norm frozen --seed 0 --variant iuq --tag paper -- MODEL.IUQ.WARMUP_ITERS 0
paper --norm frozen --seed 0 --variant iuq --tag paper+bound0.3 -- MODEL.IUQ.WARMUP_ITERS 0 MODEL.IUQ.INTER.GRAD_BOUND 0.3
# 1. The issue's setting (the recipe's ramp), 50 steps.
for seed in 0 2 1; do
    for norm in frozen bn; do
        probe --norm "$norm" --seed "$seed" --variant iuq --tag bound0.3 -- MODEL.IUQ.INTER.GRAD_BOUND 0.3
        probe --norm "$norm" --seed "$seed" --variant iuq
        probe --norm "$norm" --seed "$seed" --variant off
        probe --norm "$norm" --seed "$seed" --variant augment
    done
done
python3 "$HERE/report.py"
