"""Mean ± std over seeds of every results.json under a folder: `python tools/summarize.py runs/cap`.

Runs are grouped by their folder name with the trailing `-seed<N>` removed.
"""
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

KEYS = ["test_acc", "harmonic_mean", "zeroshot_test_acc", "noisy_label_acc", "pseudolabel_acc"]


def main(argv=None):
    root = Path((argv or sys.argv[1:] or ["runs"])[0])
    groups = defaultdict(list)
    for path in sorted(root.rglob("results.json")):
        groups[re.sub(r"-seed\d+$", "", path.parent.name)].append(json.loads(path.read_text()))
    rows = {}
    for name, runs in groups.items():
        cells = {}
        for key in KEYS:
            values = [100 * r["metrics"][key] for r in runs if key in r["metrics"]]
            if values:
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                cells[key] = f"{statistics.mean(values):.2f} ± {std:.2f}"
        wall = statistics.mean(r["elapsed_s"] for r in runs)
        rows[name] = cells
        print(f"{name:32s} n={len(runs)}  " + "  ".join(f"{k} {v}" for k, v in cells.items()) + f"  wall {wall:.0f}s")
    return rows


if __name__ == "__main__":
    main()
