#!/usr/bin/env bash
# The first look at a GPU, in at most 10 minutes (GPU_CHECK_BUDGET seconds) on one GPU:
#   0. the machine: nvidia-smi (if present), torch's view of CUDA, the offline weights;
#   1. the GPU tests: the test files with CUDA skips (they run here, not on a CPU) and
#      tests/test_accel.py (its torch.compile test within CMPIPE_COMPILE_BUDGET_S);
#   2. each benchmark on CUDA with the quick profile's network, one JSON line each
#      (distill-step, trajectories, sampling; scaling needs 2 GPUs; loader after part 3, on its shards);
#   3. params-gpu-quick.yaml end to end: a copy of the repository with it as params.yaml, `dvc repro`,
#      then its reports/metrics.json, the wall time of each stage and the training stages' throughput.
# Every part runs under `timeout` and the global deadline; a failing part does not stop the others;
# the last lines give each part's exit status (124: stopped by its time guard).
#
#   bash scripts/gpu_check.sh 2>&1 | tee gpu_check.log      # from the repository root, after `make setup`
#
# Rehearsal on a machine without a GPU (what the test suite does not do: minutes):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_PARAMS=params-smoke.yaml GPU_CHECK_BATCH=16 bash scripts/gpu_check.sh
set -uo pipefail   # no -e: a failing part must not stop the rest

cd "$(dirname "$0")/.."
ROOT=$PWD
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PARAMS=${GPU_CHECK_PARAMS:-params-gpu-quick.yaml}
BUDGET=${GPU_CHECK_BUDGET:-600}
BATCH=${GPU_CHECK_BATCH:-512}           # the benchmarks' training batch (the profile's)
# Time guards (seconds). The profile has priority: the parts before it may use only what its cap
# leaves of the budget (600 - 480 = 120 s: machine and weights ~10, tests 45, 3 benchmarks 15 each,
# the loader benchmark and the printing ~20 at the end).
PROFILE_CAP=${GPU_CHECK_PROFILE_CAP:-480}
TESTS_CAP=${GPU_CHECK_TESTS_CAP:-45}
BENCH_CAP=${GPU_CHECK_BENCH_CAP:-15}
# tests/test_accel.py's torch.compile test builds on the CPU; it is skipped past this budget
export CMPIPE_COMPILE_BUDGET_S=${CMPIPE_COMPILE_BUDGET_S:-20}
[ -x "$ROOT/.venv/bin/python" ] && export PATH="$ROOT/.venv/bin:$PATH"
PY=$(command -v python || command -v python3)
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" DVC_NO_ANALYTICS=1 OMP_WAIT_POLICY=PASSIVE
START=$SECONDS
DEADLINE=$((START + BUDGET))
declare -A STATUS=()
ORDER=()

left() { echo $((DEADLINE - SECONDS)); }
# guard CAP RESERVE: seconds a part may take, at most CAP, leaving RESERVE for the parts after it
guard() { local t=$(($(left) - $2)); [ "$t" -gt "$1" ] && t=$1; [ "$t" -lt 1 ] && t=1; echo "$t"; }
record() { STATUS[$1]=$2; ORDER+=("$1"); echo "== $1: exit $2 ($((SECONDS - START)) s since start)"; }
part() {  # part NAME CAP RESERVE CMD...: CMD under its time guard
  local name=$1 cap=$2 reserve=$3; shift 3
  if [ "$(left)" -le $((reserve + 5)) ]; then echo "== $name: skipped, the $BUDGET s budget is spent"; \
    STATUS[$name]=skipped; ORDER+=("$name"); return; fi
  local t; t=$(guard "$cap" "$reserve")
  echo "== $name (time guard ${t} s)"
  timeout --kill-after=10 "$t" "$@"
  record "$name" $?
}

echo "== gpu_check: device $DEVICE, params $PARAMS, budget $BUDGET s, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null)"
# ---------------------------------------------------------------- 0. the machine
if command -v nvidia-smi >/dev/null; then
  timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  GPUS=$(timeout 20 nvidia-smi --list-gpus 2>/dev/null | wc -l)
else
  echo "nvidia-smi: not found (no NVIDIA driver here)"
  GPUS=0
fi
part machine 60 0 "$PY" - "$DEVICE" <<'EOF'
import os, sys
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available {torch.cuda.is_available()}, "
      f"devices {torch.cuda.device_count()}, CPUs {os.cpu_count()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, "
          f"bf16 {torch.cuda.is_bf16_supported()}")
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch: the GPU parts will fail")
EOF
part weights 60 0 "$PY" -m cmpipe.weights

# ---------------------------------------------------------------- 1. the GPU tests
mapfile -t GPU_TESTS < <( { grep -l "cuda.is_available\|cuda.device_count" tests/test_*.py; \
  ls tests/test_accel.py; } 2>/dev/null | sort -u)
if [ "${#GPU_TESTS[@]}" -gt 0 ]; then
  part tests "$TESTS_CAP" $((PROFILE_CAP + 3 * BENCH_CAP + 20)) "$PY" -m pytest -q -rs -p no:cacheprovider -m "not slow" "${GPU_TESTS[@]}"
else
  echo "== tests: no test file with a CUDA skip found"; STATUS[tests]=none; ORDER+=(tests)
fi

# ---------------------------------------------------------------- 2. the benchmarks (JSON lines)
bench() {  # bench NAME RESERVE ARGS...: one JSON line, or one saying why there is none
  local name=$1 reserve=$2; shift 2
  part "bench-$name" "$BENCH_CAP" "$reserve" "$PY" -m cmpipe.bench "$name" --params "$PARAMS" --device "$DEVICE" "$@"
  case "${STATUS[bench-$name]}" in
    0) ;;
    skipped) echo "{\"bench\": \"$name\", \"skipped\": \"the time budget is spent\"}" ;;
    *) echo "{\"bench\": \"$name\", \"failed\": true, \"exit\": ${STATUS[bench-$name]}}" ;;
  esac
}
bench distill-step $((PROFILE_CAP + 20)) --steps 10 --batch-size "$BATCH"
bench trajectories $((PROFILE_CAP + 20)) --steps 3
bench sampling $((PROFILE_CAP + 20)) --steps 2
if [ "$DEVICE" = cpu ] || [ "$GPUS" -ge 2 ]; then
  bench scaling $((PROFILE_CAP + 20)) --steps 5 --batch-size "$BATCH"
else
  echo "{\"bench\": \"scaling\", \"skipped\": \"needs 2 GPUs, $GPUS here\"}"; STATUS[bench-scaling]=skipped; ORDER+=(bench-scaling)
fi

# ---------------------------------------------------------------- 3. the quick profile end to end
TMP=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
echo "== profile: copying the repository to $TMP with $PARAMS as params.yaml"
git ls-files -co --exclude-standard | grep -v '^reports/\|^dvc.lock$\|^data/' | while read -r f; do
  [ -f "$f" ] && mkdir -p "$TMP/$(dirname "$f")" && cp "$f" "$TMP/$f"; done
cp "$PARAMS" "$TMP/params.yaml"
( cd "$TMP" && git init -q && git add -A && git -c user.name=gpu -c user.email=gpu@check commit -qm "gpu_check: $PARAMS" )
# each output line stamped with the seconds since the start of dvc repro (the stage times below)
repro() {
  cd "$TMP" || return 1
  t0=$SECONDS
  PYTHONPATH="$TMP/src" dvc repro 2>&1 | while IFS= read -r line; do printf '[%4d s] %s\n' $((SECONDS - t0)) "$line"; done
  return "${PIPESTATUS[0]}"
}
export -f repro
export TMP
# the whole log in $TMP/repro.log; on the screen without the progress bars
part profile "$PROFILE_CAP" 30 bash -c 'repro' 2>&1 | tee "$TMP/repro.log" | grep --line-buffered -v '%|' 
STATUS[profile]=$(sed -n 's/^== profile: exit \([0-9]*\).*/\1/p' "$TMP/repro.log" | tail -n 1)
[ -z "${STATUS[profile]}" ] && STATUS[profile]=skipped
ORDER+=(profile)
echo "== profile: reports/metrics.json"
cat "$TMP/reports/metrics.json" 2>/dev/null || echo "(none: the run did not reach evaluate)"
echo "== profile: stage wall times (from the stamped dvc output; the last one runs to the end of dvc repro)"
awk '/Running stage/ { match($0, /\[ *[0-9]+ s\]/); t = substr($0, RSTART + 1, RLENGTH - 4) + 0;
       if (name != "") printf "  %-13s %5d s\n", name, t - t0; name = $0; sub(/.*Running stage .?/, "", name);
       sub(/.?:.*$/, "", name); t0 = t }
     /^\[ *[0-9]+ s\]/ { match($0, /\[ *[0-9]+ s\]/); last = substr($0, RSTART + 1, RLENGTH - 4) + 0 }
     END { if (name != "") printf "  %-13s %5d s\n  %-13s %5d s\n", name, last - t0, "total", last }' "$TMP/repro.log"
echo "== profile: throughput and choices of the training stages"
for f in reports/teacher/metrics.json reports/midtrain/metrics.json reports/distill/metrics.json reports/trajectories.json \
         reports/sample_timing.json reports/ts_search.json reports/copy_check.json; do
  [ -f "$TMP/$f" ] && { echo "-- $f"; cat "$TMP/$f"; echo; }
done
if [ -f "$TMP/data/shards/manifest.json" ]; then
  bench loader 0 --steps 3 --shards "$TMP/data/shards/manifest.json"
else
  echo "{\"bench\": \"loader\", \"skipped\": \"no shards: the profile's shard stage did not finish\"}"
  STATUS[bench-loader]=skipped; ORDER+=(bench-loader)
fi
command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv

# ---------------------------------------------------------------- summary
echo "== gpu_check summary ($((SECONDS - START)) s of $BUDGET; exit 124 = stopped by its time guard)"
fail=0
for name in "${ORDER[@]}"; do
  echo "  $name: ${STATUS[$name]}"
  case "${STATUS[$name]}" in 0|skipped|none) ;; *) fail=1 ;; esac
done
[ "${GPU_CHECK_KEEP:-0}" = 1 ] && echo "kept: $TMP" || rm -rf "$TMP"
exit $fail
