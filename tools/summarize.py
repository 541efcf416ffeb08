"""Mean ± std over seeds of every results.json under a folder, next to the published numbers.

    python tools/summarize.py runs/cap --paper cap       # one table: dataset x setting, paper / ours / ours - paper
    python tools/summarize.py runs/coreg --paper coreg
    python tools/summarize.py runs/zeroshot --paper zeroshot
    python tools/summarize.py runs/demo                  # no paper: one line per run folder

The published numbers are docs/paper_results.json (`--results FILE` for another), looked up with `published()`.
A run's cell is (dataset, setting, model), read from its results.json: `config.data`, the setting (`config.mode`
for cap.py; `npll` for coreg.py; `ul` and `ssl` for zeroshot.py, whose test set is the one both settings use) and
the CLIP model (`clip.model`, else `config.clip_model`, else ViT-B-32). Ours is 100 x `metrics.test_acc`, or
`metrics.harmonic_mean` in TRZSL; cap and coreg rows also show the run's zero-shot baseline against the
published zero-shot cell. A paper cell reads "not published" when no source prints a number there, "not
transcribed" when a source has one that docs/paper_results.json could not give; an ours cell with no runs
reads "not run".
"""

import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "paper_results.json"
KEYS = ["test_acc", "harmonic_mean", "zeroshot_test_acc", "noisy_label_acc", "pseudolabel_acc"]
DEFAULT_MODEL = "ViT-B-32"
# the rows each table always shows; runs of other datasets, settings or models are added below them
ROWS = {
    "cap": (["flowers102", "resisc45", "dtd", "eurosat", "cub", "fgvc_aircraft"], ["ul", "ssl", "trzsl"]),
    "coreg": (["cifar10", "cifar100", "svhn", "fashion_mnist", "eurosat", "fer2013", "gtsrb"], ["npll"]),
    "zeroshot": (["flowers102", "resisc45", "dtd", "eurosat", "cub", "fgvc_aircraft"], ["ul", "ssl"]),
}


def load_results(path=RESULTS):
    return json.loads(Path(path).read_text())


def published(method_or_zeroshot, data, setting, model=DEFAULT_MODEL, table=None):
    """The published cell {value, source, metric, note?, secondary?} or None when no source has that cell.

    method_or_zeroshot: "cap", "coreg", "zeroshot", or a row of `baselines` (e.g. "grip_textual_grip_readme").
    setting: "ul", "ssl", "trzsl" or "npll"; model: an open_clip name ("ViT-B/32" is read as "ViT-B-32").
    A cell's value may be None: its note then says "not published ..." or "not transcribed ..."."""
    table = load_results() if table is None else table
    model = (model or DEFAULT_MODEL).replace("/", "-")
    rows = table.get(method_or_zeroshot, table.get("baselines", {}).get(method_or_zeroshot, {}))
    return rows.get(setting, {}).get(data, {}).get(model)


def paper_text(cell):
    """How a paper cell is printed: its number (* when copied from a secondary source), or why there is none."""
    if cell is None or (cell["value"] is None and cell.get("note", "").startswith("not published")):
        return "not published"
    if cell["value"] is None:
        return "not transcribed"
    return f"{cell['value']:g}" + ("*" if cell.get("secondary") else "")


def method_of(res):
    """Which script wrote a results.json: cap.py keeps its concept-alignment report, coreg.py its history."""
    if "concept_alignment" in res:
        return "cap"
    if "history" in res and "test_acc_net1" in res.get("metrics", {}):
        return "coreg"
    return "zeroshot"


def run_cells(res):
    """(setting, ours %, zero-shot %) for each table row a run counts in."""
    m, method = res["metrics"], method_of(res)
    if method == "cap":
        mode = res["config"]["mode"]
        key = "harmonic_mean" if mode == "trzsl" else "test_acc"
        return [(mode, 100 * m[key], 100 * m[f"zeroshot_{key}"] if f"zeroshot_{key}" in m else None)]
    if method == "coreg":
        zs = m.get("zeroshot_test_acc")
        return [("npll", 100 * m["test_acc"], None if zs is None else 100 * zs)]
    return [(s, 100 * m["test_acc"], None) for s in ("ul", "ssl")]


def model_of(res):
    return ((res.get("clip") or {}).get("model") or res["config"].get("clip_model") or DEFAULT_MODEL).replace("/", "-")


def mean_std(values):
    """'mean ± std' (sample std; 0.00 for one run) and the mean, or ('not run', None)."""
    if not values:
        return "not run", None
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}", mean


def difference(mean, cell):
    if mean is None or cell is None or cell["value"] is None:
        return "—"
    return f"{mean - cell['value']:+.2f}"


def collect(root, method):
    """{(data, setting, model): {"ours": [...], "zs": [...], "seeds": [...]}} from the runs of `method`."""
    found = defaultdict(lambda: {"ours": [], "zs": [], "seeds": []})
    for path in sorted(Path(root).rglob("results.json")):
        res = json.loads(path.read_text())
        if method_of(res) != method:
            continue
        for setting, ours, zs in run_cells(res):
            row = found[(res["config"]["data"], setting, model_of(res))]
            row["ours"].append(ours)
            row["seeds"].append(res["config"].get("seed"))
            if zs is not None:
                row["zs"].append(zs)
    for key, row in found.items():
        if len(set(row["seeds"])) < len(row["seeds"]):
            print(f"note: {key} has more than one run with the same seed {row['seeds']}", file=sys.stderr)
    return found


def paper_table(root, method, table):
    """Print one markdown table: per (dataset, setting, model), paper, ours (mean ± std over seeds), ours - paper."""
    datasets, settings = ROWS[method]
    found = collect(root, method)
    keys = [(d, s, DEFAULT_MODEL) for d in datasets for s in settings]
    keys += sorted(k for k in found if k not in keys)
    with_zs = method != "zeroshot"
    head = ["dataset", "setting", "model", "paper", "ours", "n", "ours − paper"]
    head += ["zero-shot paper", "zero-shot ours", "zero-shot ours − paper"] if with_zs else []
    lines = []
    for data, setting, model in keys:
        row = found.get((data, setting, model), {"ours": [], "zs": []})
        cell = published(method, data, setting, model, table)
        ours, mean = mean_std(row["ours"])
        cells = [data, setting, model, paper_text(cell), ours, str(len(row["ours"])), difference(mean, cell)]
        if with_zs:
            zcell = published("zeroshot", data, setting, model, table)
            zours, zmean = mean_std(row["zs"])
            cells += [paper_text(zcell), zours, difference(zmean, zcell)]
        lines.append(cells)
    trzsl = " (TRZSL: harmonic mean of seen and unseen accuracy)" if "trzsl" in settings else ""
    print(
        f"{method}: top-1 %{trzsl}, mean ± sample std over the n runs under {root}; paper values from "
        "docs/paper_results.json, * = copied from a third-party summary of the paper (see its note)"
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for cells in lines:
        print("| " + " | ".join(cells) + " |")
    return lines


def group_lines(root):
    """One line per run folder (its name without -seed<N>): mean ± std of each metric found."""
    groups = defaultdict(list)
    for path in sorted(Path(root).rglob("results.json")):
        groups[re.sub(r"-seed\d+$", "", path.parent.name)].append(json.loads(path.read_text()))
    rows = {}
    for name, runs in groups.items():
        cells = {}
        for key in KEYS:
            values = [100 * r["metrics"][key] for r in runs if r["metrics"].get(key) is not None]
            if values:
                cells[key] = mean_std(values)[0]
        wall = statistics.mean(r["elapsed_s"] for r in runs)
        rows[name] = cells
        print(f"{name:32s} n={len(runs)}  " + "  ".join(f"{k} {v}" for k, v in cells.items()) + f"  wall {wall:.0f}s")
    return rows


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = {}
    for flag in ("--paper", "--results"):
        if flag in argv:
            i = argv.index(flag)
            opts[flag] = argv[i + 1]
            del argv[i : i + 2]
    root = Path((argv or ["runs"])[0])
    if "--paper" not in opts:
        return group_lines(root)
    if opts["--paper"] not in ROWS:
        sys.exit(f"--paper takes one of {', '.join(ROWS)}")
    return paper_table(root, opts["--paper"], load_results(opts.get("--results", RESULTS)))


if __name__ == "__main__":
    main()
