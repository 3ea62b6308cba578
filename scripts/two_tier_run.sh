#!/usr/bin/env bash
# Two tiers (issue 27) on N hold-out facts: `kagent watch` into the memory tier, then `kagent consolidate` on copies of
# that workspace with ENCORE's solve and with the null-space solve (compact_solve), each followed by `kagent check`.
#   scripts/two_tier_run.sh OUT_DIR [N=100] [START=6200]     (CounterFact train START.., never tuned on)
# Then: python scripts/two_tier_summary.py OUT_DIR
set -euo pipefail
D=$(realpath -m "$1"); N=${2:-100}; START=${3:-6200}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$D" && cd "$D"
python "$HERE/cf_feed.py" --start "$START" --n "$N" --out feed.jsonl
cat /proc/loadavg > load0.txt
kagent init --workspace ws > init.log 2>&1
/usr/bin/time -v kagent watch feed.jsonl --once --workspace ws > watch.log 2>&1
kagent check --json --workspace ws > check-memory.json || true
cp -r ws ws-null
sed -i 's/^compact_solve = "method"/compact_solve = "nullspace"/' ws-null/config.toml
grep -q '^compact_solve = "nullspace"' ws-null/config.toml
for w in ws ws-null; do
  cat /proc/loadavg > "load-$w.txt"
  /usr/bin/time -v kagent -v consolidate --json --workspace "$w" > "consolidate-$w.json" 2> "consolidate-$w.log" || true
  kagent check --json --workspace "$w" > "check-$w.json" || true
done
cat /proc/loadavg > load-end.txt
