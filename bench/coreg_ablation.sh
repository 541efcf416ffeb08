#!/usr/bin/env bash
# Co-Reg ablation on the demo world (docs/coreg.md): the full method, then one component switched off per row,
# each over seeds 1-3 with the default demo settings. Each run uses one torch thread, JOBS runs at a time
# (default 1; JOBS=2 on 2 cores); a finished run (its results.json exists) is skipped, so the script can be
# re-run to resume.
#   bash bench/coreg_ablation.sh                 # all rows
#   JOBS=2 bash bench/coreg_ablation.sh          # two runs side by side
#   ROWS="full no-da" SEEDS="1" bash bench/coreg_ablation.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SEEDS=${SEEDS:-"1 2 3"}
ROWS=${ROWS:-"full no-da no-mixup no-proto no-supcon self-divide"}
OUT=${OUT:-runs/coreg-ablation}
JOBS=${JOBS:-1}
printf -v extra '%q ' "$@"  # the extra arguments, quoted once for the bash -c below
for row in $ROWS; do
  case $row in
    full) flags="";;
    no-da) flags="--no-da";;
    no-mixup) flags="--no-mixup";;
    no-proto) flags="--no-proto";;
    no-supcon) flags="--no-supcon";;
    self-divide) flags="--divide self";;
    *) echo "unknown row $row" >&2; exit 2;;
  esac
  for seed in $SEEDS; do
    out=$OUT/$row-seed$seed
    [ -f $out/results.json ] && continue
    printf '%s\0' "OMP_NUM_THREADS=1 $PY coreg.py --data demo --seed $seed --quiet $flags --out-dir $out $extra | tail -1"
  done
done | xargs -0 -r -P "$JOBS" -I{} bash -c {}
# one line per row: mean ± std over seeds of the final and after-warm-up test accuracy, and the wall time
$PY - "$OUT" $ROWS <<'PY'
import json, statistics, sys
from pathlib import Path
out, rows = Path(sys.argv[1]), sys.argv[2:]
def ms(v):
    return f"{statistics.mean(v):5.2f} ± {statistics.stdev(v) if len(v) > 1 else 0:.2f}"
print("| row | test acc | after warm-up | noisy labels | wall (s) | seeds |\n|---|---|---|---|---|---|")
for row in rows:
    runs = [json.loads(p.read_text()) for p in sorted(out.glob(f"{row}-seed*/results.json"))]
    if runs:
        m = lambda k: [100 * r["metrics"][k] for r in runs]
        print(f"| {row} | {ms(m('test_acc'))} | {ms(m('acc_after_warmup'))} | {ms(m('noisy_label_acc'))} | "
              f"{statistics.mean(r['elapsed_s'] for r in runs):.0f} | {len(runs)} |")
PY
