#!/usr/bin/env bash
# What a lent GPU machine runs first (issue 26, item 5): build the frameworks from ../shared, the
# train-step benchmark on CUDA at memory 100K and 1M, then as many study runs as fit, parallel on
# the one GPU. Everything it finds goes under $OUT as it goes (the device tool copies $OUT back,
# also from a command stopped at its time limit).
#
#   bash benchmarks/gpu.sh                      # setup, bench, study, within DEADLINE_S (570 s)
#   bash benchmarks/gpu.sh setup bench          # phases by name, in the order given
#   DEADLINE_S=560 bash benchmarks/gpu.sh study # a second call on the still-warm machine
#   bash benchmarks/gpu.sh --dry-run            # (or DRY_RUN=1) print every command, run nothing heavy
#   bash benchmarks/gpu.sh --smoke study        # the study phase for real on this machine's CPU,
#                                               # 1 run of 2 iterations (checks the command line)
#
# Phases:
#   setup  nvidia-smi; a virtual environment output/venv-gpu (kept while the machine stays warm) with
#          torch and the rest pinned in requirements/tested.txt (skipped where a CUDA torch is
#          already importable), this package (-e), then detectron2 + AdelaiDet built from the
#          tarballs in $SHARED/frameworks (tools/install_frameworks.py; CUDA ops for sm_90 only)
#   bench  benchmarks/train_step.py --device cuda --memory 100000 1000000 (CondInst; BENCH_MODELS)
#   study  tools/ablation.py --jobs STUDY_JOBS on STUDY_CONFIG with MODEL.DEVICE cuda until the
#          deadline; rows land in results.jsonl as runs finish (a later call resumes the rest)
#
# Writes under $OUT: commands.txt (every command, timed), timings.tsv (phase, step, seconds,
# exit status), nvidia-smi.txt, env.txt, setup_*.log, train_step.txt (+ .log), study/ (results.jsonl,
# each run's metrics.json and log.txt, report.txt: the table), gpu_usage.csv (nvidia-smi every 10 s).
#
# Environment (defaults): OUT (./output/gpu), SHARED (../shared), DEADLINE_S (570, from the
# script's start; phases get what is left), BENCH_BUDGET_S (180), BENCH_MODELS (CondInst),
# BENCH_MODES (baseline inter both), STUDY_CONFIG (configs/studies/quickstart_condinst.yaml),
# STUDY_MODES (baseline inter equi both), STUDY_SEEDS (0 1 2 3 4), STUDY_JOBS (8), STUDY_DIR
# (./output/gpu_study: checkpoints stay on the machine; only the light files go to $OUT),
# STUDY_OPTS (extra overrides for every run), TORCH_CUDA_ARCH_LIST (9.0: the H200).
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
START=$(date +%s)
DRY_RUN="${DRY_RUN:-0}"
SMOKE=0
PHASES=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --smoke) SMOKE=1 ;;
    setup|bench|study) PHASES+=("$arg") ;;
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown argument $arg (phases: setup bench study; --dry-run, --smoke)" >&2; exit 2 ;;
  esac
done
[ ${#PHASES[@]} -eq 0 ] && PHASES=(setup bench study)

OUT="${OUT:-$REPO/output/gpu}"
SHARED="$(cd "${SHARED:-$REPO/../shared}" 2>/dev/null && pwd || echo "${SHARED:-$REPO/../shared}")"
DEADLINE_S="${DEADLINE_S:-570}"
BENCH_BUDGET_S="${BENCH_BUDGET_S:-180}"
BENCH_MODELS="${BENCH_MODELS:-CondInst}"
BENCH_MODES="${BENCH_MODES:-baseline inter both}"
STUDY_CONFIG="${STUDY_CONFIG:-configs/studies/quickstart_condinst.yaml}"
STUDY_MODES="${STUDY_MODES:-baseline inter equi both}"
STUDY_SEEDS="${STUDY_SEEDS:-0 1 2 3 4}"
STUDY_JOBS="${STUDY_JOBS:-8}"
STUDY_DIR="${STUDY_DIR:-$REPO/output/gpu_study}"
STUDY_OPTS="${STUDY_OPTS:-}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export DETECTRON2_DATASETS="${DETECTRON2_DATASETS:-$SHARED/datasets}"
export PYTHONUNBUFFERED=1
VENV="$REPO/output/venv-gpu"  # under output/ (git-ignored): kept on the machine between calls
PY=python3
if [ "$SMOKE" = 1 ]; then  # this machine's CPU, its own python, one tiny run
  STUDY_MODES=baseline; STUDY_SEEDS=0; STUDY_JOBS=1; STUDY_DIR="${STUDY_DIR%/}_smoke"
  STUDY_OPTS="SOLVER.MAX_ITER 2 SOLVER.STEPS (1,) DATASETS.TEST ('iuq_quickstart_val_8',) MODEL.IUQ.MEASURES.MAX_IMAGES 4 $STUDY_OPTS"
fi
DEVICE=cuda; [ "$SMOKE" = 1 ] && DEVICE=cpu
mkdir -p "$OUT"

left() { echo $(( DEADLINE_S - ($(date +%s) - START) )); }
log() { echo "[gpu.sh +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/commands.txt" >&2; }

# run PHASE STEP LOGFILE CMD...: print (and record) the command; unless dry, run it with its output
# in LOGFILE (and on screen), record its seconds and exit status.
run() {
  local phase="$1" step="$2" logfile="$3"; shift 3
  log "$phase/$step: $*"
  [ "$DRY_RUN" = 1 ] && return 0
  local t0=$(date +%s) rc
  "$@" > >(tee -a "$logfile") 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$phase" "$step" "$(( $(date +%s) - t0 ))" "$rc" >> "$OUT/timings.tsv"
  return $rc
}

activate() {  # (a dry run keeps python3: its cheap checks run here; a bare GPU machine uses the venv's)
  if [ -x "$VENV/bin/python" ] && [ "$SMOKE" = 0 ]; then
    # shellcheck disable=SC1091
    . "$VENV/bin/activate"
    PY=python
  fi
}

one_tarball() {  # the single file matching $1 (a glob), or fail naming it
  local matches=( $1 )
  if [ ${#matches[@]} -ne 1 ] || [ ! -f "${matches[0]}" ]; then
    echo "gpu.sh: expected one file matching $1, found: ${matches[*]}" >&2; return 1
  fi
  echo "${matches[0]}"
}

phase_setup() {
  log "setup: nvidia-smi, torch, detectron2 + AdelaiDet from $SHARED/frameworks"
  if [ "$DRY_RUN" = 1 ]; then
    log "setup/gpu: nvidia-smi > $OUT/nvidia-smi.txt"
  else
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi" >> "$OUT/nvidia-smi.txt"
    (while true; do nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader \
       >> "$OUT/gpu_usage.csv" 2>/dev/null || exit 0; sleep 10; done) &
    GPU_MONITOR=$!
  fi
  local d2 adet
  d2=$(one_tarball "$SHARED/frameworks/detectron2-*.tar.gz") || return 1
  adet=$(one_tarball "$SHARED/frameworks/AdelaiDet-*.tar.gz") || return 1
  if [ "$DRY_RUN" = 0 ] && python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    log "setup/torch: a CUDA torch is already importable by python3: no virtual environment"
  else
    [ -x "$VENV/bin/python" ] || run setup venv "$OUT/setup_pip.log" python3 -m venv "$VENV" || return 1
    run setup pip "$OUT/setup_pip.log" "$VENV/bin/python" -m pip install -q -r requirements/tested.txt \
      "setuptools>=64" wheel || return 1
  fi
  activate
  run setup iuq "$OUT/setup_pip.log" $PY -m pip install -q --no-build-isolation --no-deps -e . || return 1
  local install=($PY tools/install_frameworks.py adelaidet --source "$adet" --detectron2-source "$d2"
                 --workdir "$REPO/frameworks" --jobs "$(nproc)" --no-check)
  [ "$DRY_RUN" = 1 ] && install+=(--dry-run)
  # The installer's own dry run (it changes nothing) runs here too: it checks the tarballs' commits.
  DRY_RUN=0 run setup frameworks "$OUT/setup_frameworks.log" "${install[@]}" || return 1
  [ "$DRY_RUN" = 1 ] && return 0
  $PY -c "import torch, detectron2, adet; print('torch', torch.__version__, 'cuda', torch.version.cuda,
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'); print('detectron2', detectron2.__version__)" \
    > "$OUT/env.txt" 2>&1
  $PY -m iuq.collect_env >> "$OUT/env.txt" 2>&1 || true
}

phase_bench() {
  activate
  local budget=$(( $(left) - 30 )); [ "$budget" -gt "$BENCH_BUDGET_S" ] && budget=$BENCH_BUDGET_S
  if [ "$budget" -lt 60 ] && [ "$DRY_RUN" = 0 ]; then log "bench: skipped, ${budget}s left"; return 0; fi
  # stdout: the tables; stderr: progress per step (train_step.log)
  local cmd=(timeout -k 10 "$budget" $PY benchmarks/train_step.py --models $BENCH_MODELS --device cuda
             --memory 100000 1000000 --modes $BENCH_MODES --batches 3 --rounds 2)
  log "bench: ${cmd[*]} > $OUT/train_step.txt 2> $OUT/train_step.log"
  [ "$DRY_RUN" = 1 ] && return 0
  local t0=$(date +%s) rc
  "${cmd[@]}" > "$OUT/train_step.txt" 2> "$OUT/train_step.log"
  rc=$?
  printf 'bench\ttrain_step\t%s\t%s\n' "$(( $(date +%s) - t0 ))" "$rc" >> "$OUT/timings.tsv"
  cat "$OUT/train_step.txt"
}

copy_study() {  # the light files of the study, into $OUT/study
  mkdir -p "$OUT/study"
  [ -f "$STUDY_DIR/results.jsonl" ] && cp "$STUDY_DIR/results.jsonl" "$OUT/study/"
  for f in "$STUDY_DIR"/runs/*/seed*/metrics.json "$STUDY_DIR"/runs/*/seed*/log.txt; do
    [ -f "$f" ] || continue
    local rel="${f#"$STUDY_DIR"/runs/}"
    mkdir -p "$OUT/study/runs/$(dirname "$rel")"
    cp "$f" "$OUT/study/runs/$rel"
  done
}

phase_study() {
  activate
  local budget=$(( $(left) - 25 ))
  # ablation.py's flags, then the overrides for every run (after them, its flags would be taken
  # for overrides: --dry-run and --report must come before).
  local flags=($PY tools/ablation.py --config-file "$STUDY_CONFIG" --modes $STUDY_MODES --seeds $STUDY_SEEDS
               --jobs "$STUDY_JOBS" --output-dir "$STUDY_DIR")
  local overrides=(MODEL.DEVICE "$DEVICE" $STUDY_OPTS)
  local cmd=("${flags[@]}" "${overrides[@]}")
  # What would run (cheap: plans the runs, trains nothing); then the runs, until the deadline.
  DRY_RUN=0 run study plan "$OUT/study_plan.txt" "${flags[@]}" --dry-run "${overrides[@]}" || return 1
  if [ "$budget" -lt 120 ] && [ "$DRY_RUN" = 0 ] && [ "$SMOKE" = 0 ]; then log "study: skipped, ${budget}s left"; return 0; fi
  [ "$SMOKE" = 1 ] && budget=900
  log "study: timeout ${budget}s ${cmd[*]}"
  [ "$DRY_RUN" = 1 ] && return 0
  (while true; do sleep 20; copy_study; done) &
  local copier=$! t0=$(date +%s) rc
  # Its own process group, so that the deadline stops every run it started.
  setsid "${cmd[@]}" > "$OUT/study.log" 2>&1 &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null && [ $(( $(date +%s) - t0 )) -lt "$budget" ]; do sleep 5; done
  if kill -0 "$pid" 2>/dev/null; then
    log "study: deadline: stopping the runs still training (a later call resumes them)"
    kill -TERM -- "-$pid" 2>/dev/null; sleep 5; kill -KILL -- "-$pid" 2>/dev/null
  fi
  wait "$pid"; rc=$?
  kill "$copier" 2>/dev/null
  printf 'study\tablation\t%s\t%s\n' "$(( $(date +%s) - t0 ))" "$rc" >> "$OUT/timings.tsv"
  copy_study
  "${flags[@]}" --report "${overrides[@]}" > "$OUT/study/report.txt" 2>&1 || true
  tail -n 30 "$OUT/study/report.txt"
}

log "phases: ${PHASES[*]}; OUT=$OUT; deadline ${DEADLINE_S}s; dry run: $DRY_RUN; smoke: $SMOKE"
status=0
for phase in "${PHASES[@]}"; do
  "phase_$phase" || { status=1; log "$phase failed"; [ "$phase" = setup ] && break; }
done
[ -n "${GPU_MONITOR:-}" ] && kill "$GPU_MONITOR" 2>/dev/null
log "done (exit $status)"
exit $status
