#!/usr/bin/env bash
# The two quickstarts as a new user runs them (README, "Quickstart"), SEED 0, one core each, timed:
# the look-alike one (configs/quickstart.yaml) and the textures one (configs/quickstart_textures.yaml),
# and the textures data's first-use generation on its own (a fresh root). Issue 26, item 6: which is
# the README's quickstart (docs/study.md, "The quickstart", states the rule). Writes
# studies/quickstarts/results.jsonl (one row per run: wall seconds, segm AP, alive); a run already
# there is skipped.
#   OMP_NUM_THREADS=1 bash studies/quickstarts/run.sh
cd "$(dirname "$0")/../.."
HERE=studies/quickstarts
done_() { [ -f "$HERE/results.jsonl" ] && grep -q "\"name\": \"$1\"" "$HERE/results.jsonl"; }
if ! done_ textures_generation; then
    GEN=$(mktemp -d)
    START=$(date +%s.%N)
    python3 -c "import sys; from iuq.data import register_textures; register_textures(root=sys.argv[1])" "$GEN"
    END=$(date +%s.%N)
    python3 -c "import json,sys; print(json.dumps({'name': 'textures_generation', 'wall_s': round(float(sys.argv[1]), 1)}))" \
        "$(echo "$END - $START" | bc)" >> "$HERE/results.jsonl"
    rm -rf "$GEN"
fi
for pair in lookalike:configs/quickstart.yaml textures:configs/quickstart_textures.yaml; do
    name=${pair%%:*} config=${pair#*:}
    done_ "$name" && continue
    out=output/quickstarts/$name
    rm -rf "$out"
    START=$(date +%s.%N)
    python3 train_net.py --config-file "$config" SEED 0 OUTPUT_DIR "$out" > "$HERE/$name.log" 2>&1
    END=$(date +%s.%N)
    python3 "$HERE/row.py" "$name" "$config" "$out" "$(echo "$END - $START" | bc)" "$HERE/$name.log" >> "$HERE/results.jsonl"
done
