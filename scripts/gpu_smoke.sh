#!/usr/bin/env bash
# GPU smoke check of kagent: one PASS/FAIL line per check, under 8 minutes on one GPU (estimated for an H200 from the
# CPU timings in BENCHMARKS.md; not yet run on one). Run from the repository root with the venv active:
#
#   bash scripts/gpu_smoke.sh [COUNTERFACT_JSON]      # default ../shared/data/counterfact/counterfact-train.json
#
# Checks: CPU and CUDA agree on 16 edits (values and deltas within 1e-3 relative); all three methods through
# `kagent bench --device cuda --n 64` (quality, edits/s, peak GPU memory); init/watch/verify/rollback/verify/export
# of a CUDA workspace; no FutureWarning in any output. Logs go to $OUT (a temp dir unless set). Exit 1 on any FAIL.
set -u
FACTS=${1:-../shared/data/counterfact/counterfact-train.json}
OUT=${OUT:-$(mktemp -d -t kagent-gpu-smoke.XXXX)}
PY=${PYTHON:-python}
FAILED=0

step() {  # step NAME SECONDS COMMAND...: PASS when the command exits 0 within SECONDS
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  if timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
    echo "PASS $name ($((SECONDS - t0)) s)"
  else
    echo "FAIL $name ($((SECONDS - t0)) s; log $OUT/$name.log)"
    FAILED=1
  fi
}

report() {  # report NAME SECONDS COMMAND...: the command prints its own PASS/FAIL lines (none: it crashed)
  local name=$1 limit=$2
  shift 2
  timeout "$limit" "$@" >"$OUT/$name.out" 2>"$OUT/$name.log" || FAILED=1
  if [ -s "$OUT/$name.out" ]; then
    cat "$OUT/$name.out"
  else
    echo "FAIL $name (no result; log $OUT/$name.log)"
    FAILED=1
  fi
}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "FAIL cuda: torch sees no CUDA device"
  exit 1
fi
head -n 16 examples/feed.jsonl >"$OUT/feed.jsonl"

report agree 150 "$PY" scripts/gpu_smoke.py agree --n 16 --facts "$OUT/feed.jsonl"
step bench 240 "$PY" -m agent bench --device cuda --facts "$FACTS" --n 64 --batch-size 32 \
  --methods encore,memit,alphaedit --json "$OUT/bench.json"
[ -f "$OUT/bench.json" ] && report bench-rows 30 "$PY" scripts/gpu_smoke.py bench "$OUT/bench.json"

WS="$OUT/ws"
step init 60 "$PY" -m agent init --device cuda --workspace "$WS"
step watch 120 "$PY" -m agent watch "$OUT/feed.jsonl" --once --batch-size 8 --workspace "$WS"
step verify 30 "$PY" -m agent verify --workspace "$WS"
step rollback 60 "$PY" -m agent rollback 1 --workspace "$WS"
step verify-after-rollback 30 "$PY" -m agent verify --workspace "$WS"
step export 60 "$PY" -m agent export "$OUT/export" --workspace "$WS"
step no-future-warning 5 bash -c "! grep -l FutureWarning '$OUT'/*.log"
exit $FAILED
