#!/usr/bin/env bash
# Why the look-alike quickstart's SEED 0 run (results.jsonl, "lookalike") trained so much worse than
# the first study's `both` runs at the old defaults (loss_mask 0.61 at iteration 199 against
# 0.25-0.32): the same run to iteration 199 (no evaluation) with each of the two defaults that
# changed on 2026-12-01 (9f7b992: supplementary Algorithm 1) set back, and with both set back.
# The first 200 iterations of the full run are the control (same seed, same lr up to 400). Then
# both EQUI.DRAW values at the seeds in SEEDS (default "1"). One row per run in diagnose.jsonl; a
# run already there is skipped.
cd "$(dirname "$0")/../.."
HERE=studies/quickstarts
# run NAME [OVERRIDES...]: SEED 0 unless the overrides name another (the later value wins)
run() { name=$1; shift; out=output/quickstarts/diag_$name
    grep -q "\"name\": \"diag_$name\"" "$HERE/diagnose.jsonl" 2>/dev/null && return
    rm -rf "$out"
    python3 train_net.py --config-file configs/quickstart.yaml SEED 0 SOLVER.MAX_ITER 200 DATASETS.TEST "()" \
        OUTPUT_DIR "$out" "$@" > "$HERE/diag_$name.log" 2>&1
    python3 - "$name" "$out" "$@" >> "$HERE/diagnose.jsonl" <<'PY'
import json, sys
from iuq import study
run = study.read_run(sys.argv[2])
c = run["curves"]
print(json.dumps({"name": "diag_" + sys.argv[1], "overrides": sys.argv[3:], "sec_per_iter": run["sec_per_iter"],
                  **{k: dict(zip(c["iteration"], c[k])) for k in ("loss_mask", "loss_equi", "loss_inter") if k in c}}))
PY
}
run per_image_compose MODEL.IUQ.EQUI.DRAW per_image_compose
run old_defaults MODEL.IUQ.EQUI.DRAW per_image_compose MODEL.IUQ.INTER.DETACH_NEGATIVES False
run grad_negatives MODEL.IUQ.INTER.DETACH_NEGATIVES False
for seed in ${SEEDS:-1}; do
    for draw in per_batch_choice per_image_compose; do
        run "seed${seed}_$draw" SEED "$seed" MODEL.IUQ.EQUI.DRAW "$draw"
    done
done
