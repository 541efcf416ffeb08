"""Mean ± std over seeds of every results.json under a folder: `python tools/summarize.py runs/cap`.

Runs are grouped by their folder name with the trailing `-seed<N>` removed. With `--paper cap`, runs named
<dataset>-<mode> also go into one dataset x setting table next to the CAP paper's numbers (TRZSL: harmonic mean).
"""
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

KEYS = ["test_acc", "harmonic_mean", "zeroshot_test_acc", "noisy_label_acc", "pseudolabel_acc"]

# CAP paper (ICML 2025), Table 1, ViT-B/32, top-1 % (TRZSL: harmonic mean), mean of 3 runs. We could only read
# the UL cells below, from a secondary summary that looks partly mis-transcribed (its zero-shot row matches
# FPL's TRZSL numbers); every other cell is still to be filled in from the paper.
PAPER = {"cap": {("flowers102", "ul"): 76.80, ("resisc45", "ul"): 83.32, ("dtd", "ul"): 55.29}}
DATASETS = ["flowers102", "resisc45", "dtd", "eurosat", "cub", "fgvc_aircraft"]
MODES = ["ul", "ssl", "trzsl"]


def paper_table(rows, paper):
    """One markdown table: dataset x setting, `ours (paper)`; TRZSL cells are the harmonic mean."""
    print("| dataset | " + " | ".join(f"{m.upper()} ours (paper)" for m in MODES) + " |")
    print("|---|" + "---|" * len(MODES))
    for data in DATASETS:
        cells = []
        for mode in MODES:
            ours = rows.get(f"{data}-{mode}", {}).get("harmonic_mean" if mode == "trzsl" else "test_acc", "—")
            ref = paper.get((data, mode))
            cells.append(f"{ours} ({ref:.2f})" if ref is not None else f"{ours} (—)")
        print(f"| {data} | " + " | ".join(cells) + " |")


def main(argv=None):
    argv = list(argv if argv is not None else sys.argv[1:])
    paper = None
    if "--paper" in argv:
        i = argv.index("--paper")
        paper = PAPER[argv[i + 1]]
        del argv[i:i + 2]
    root = Path((argv or ["runs"])[0])
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
    if paper is not None:
        paper_table(rows, paper)
    return rows


if __name__ == "__main__":
    main()
