#!/usr/bin/env bash
# CAP's component ablation on the demo world (docs/cap.md), the paper's kind: the full method, then one component
# switched off per row, each over seeds 1-3 with the default demo settings (UL). Each run uses one torch thread,
# JOBS runs at a time (default 1; JOBS=2 on 2 cores); a finished run (its results.json exists) is skipped.
#   bash bench/cap_components.sh                  # all rows, then the table
#   JOBS=2 bash bench/cap_components.sh
#   ROWS="full no-margin" SEEDS="1" bash bench/cap_components.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SEEDS=${SEEDS:-"1 2 3"}
ROWS=${ROWS:-"full no-alignment no-margin no-pseudo no-main no-expansion"}
OUT=${OUT:-runs/cap-components}
JOBS=${JOBS:-1}
printf -v extra '%q ' "$@"  # the extra arguments, quoted once for the bash -c below
for row in $ROWS; do
  case $row in
    full) flags="";;
    no-alignment|no-margin|no-pseudo|no-main|no-expansion) flags="--$row";;
    *) echo "unknown row $row" >&2; exit 2;;
  esac
  for seed in $SEEDS; do
    out=$OUT/$row-seed$seed
    [ -f $out/results.json ] && continue
    printf '%s\0' "OMP_NUM_THREADS=1 $PY cap.py --data demo --mode ul --seed $seed --quiet $flags --out-dir $out $extra | tail -1"
  done
done | xargs -0 -r -P "$JOBS" -I{} bash -c {}
$PY - "$OUT" $ROWS <<'PY'
import json, statistics, sys
from pathlib import Path
out, rows = Path(sys.argv[1]), sys.argv[2:]
acc = {r: [100 * json.loads(p.read_text())["metrics"]["test_acc"] for p in sorted(out.glob(f"{r}-seed*/results.json"))]
       for r in rows}
full = statistics.mean(acc["full"]) if acc.get("full") else None
print("| row | test acc %, mean ± std | Δ against full | seeds |\n|---|---|---|---|")
for r in rows:
    a = acc[r]
    if not a:
        print(f"| {r} | not run | | 0 |")
        continue
    m, s = statistics.mean(a), statistics.stdev(a) if len(a) > 1 else 0.0
    delta = "" if r == "full" or full is None else f"{m - full:+.2f}"
    print(f"| {r} | {m:.2f} ± {s:.2f} | {delta} | {len(a)} |")
PY
