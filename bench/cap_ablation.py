"""What each difference between CAP's paper and its released code does, on the offline demo world.

For every entry of cap.RELEASE_BEHAVIOURS, runs `cap.py --data demo` over seeds 1-3 with the paper's formulas
and with that one release behaviour turned on (`--release NAME`), plus all of them at once (`--as-released`),
then prints the markdown table of docs/cap.md (test accuracy, TRZSL: harmonic mean; mean ± std over seeds).
Behaviours that only act in SSL or TRZSL are measured in that setting.

    python bench/cap_ablation.py                  # ~40 demo runs (run times: docs/usage.md)
    python bench/cap_ablation.py --table-only     # re-print the table from runs/cap_ablation
    python bench/cap_ablation.py --jobs 12 --device cpu   # on a many-core machine; unknown flags go to cap.py
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import cap  # noqa: E402  (for RELEASE_BEHAVIOURS)
import demo  # noqa: E402  (for the world's VERSION and its mismatched classes)

# (run name, --mode, extra flags, the run it is compared with)
DESCRIBED_FILE = "described.json"  # written below: names the demo's two mismatched classes, as the release's file would
# In UL on the demo `desc-all` cannot change anything (no labeled images): its row is a check. `sigma-repeats`
# acts only through images drawn more than once in an epoch (measured: up to +1 point on one seed).
RUNS = (
    [("paper", "ul", [], None), ("as-released", "ul", ["--as-released"], "paper")]
    + [(b, "ul", ["--release", b], "paper") for b in ("margin-formula", "flip", "quirk", "no-low-t", "leaderboard")]
    + [
        ("described", "ul", ["--release", "described", "--descriptions", DESCRIBED_FILE], "paper"),
        ("trzsl-paper", "trzsl", [], None),
        ("trzsl-all", "trzsl", ["--release", "trzsl-all"], "trzsl-paper"),
        ("ssl-paper", "ssl", [], None),
        ("ssl-draw", "ssl", ["--release", "ssl-draw"], "ssl-paper"),
        ("sigma-repeats", "ul", ["--release", "sigma-repeats"], "paper"),
        ("desc-all", "ul", ["--release", "desc-all"], "paper"),
    ]
)
assert {r[0] for r in RUNS} >= set(cap.RELEASE_BEHAVIOURS) - {"eurosat-pool"}  # the demo has no EuroSAT bundle


def run_all(out, seeds, cache_dir, jobs=1, extra=()):
    out.mkdir(parents=True, exist_ok=True)
    stamp = out / "demo_version"  # finished runs are reused only on the same demo world
    if stamp.exists() and stamp.read_text().strip() != str(demo.VERSION):
        sys.exit(f"{out} holds runs of demo world v{stamp.read_text().strip()}, now v{demo.VERSION}: delete it first")
    stamp.write_text(f"{demo.VERSION}\n")
    (out / DESCRIBED_FILE).write_text(json.dumps({c: demo.DESCRIPTIONS[c] for c in demo.MISMATCHED}, indent=1))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

    def one(name, mode, flags, seed):
        run_dir = out / f"{name}-seed{seed}"
        flags_here = [str(out / f) if f == DESCRIBED_FILE else f for f in flags]
        cmd = [
            sys.executable,
            str(ROOT / "cap.py"),
            "--data",
            "demo",
            "--mode",
            mode,
            "--seed",
            str(seed),
            "--cache-dir",
            cache_dir,
            "--out-dir",
            str(run_dir),
            "--quiet",
            *flags_here,
            *extra,
        ]
        t0 = time.time()
        with open(out / f"{name}-seed{seed}.log", "w") as log:
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=True, cwd=ROOT)
        print(f"{name} seed {seed}: {time.time() - t0:.0f}s", flush=True)

    todo = [
        (name, mode, flags, seed)
        for name, mode, flags, _ in RUNS
        for seed in seeds
        if not (out / f"{name}-seed{seed}" / "results.json").exists()
    ]  # resumable: a finished run is kept
    with ThreadPoolExecutor(jobs) as pool:  # --jobs > 1 only where there are cores to spare (each run: 1 thread)
        for f in [pool.submit(one, *t) for t in todo]:
            f.result()


def score(out, name, mode):
    """Mean, std and values over seeds of test accuracy (TRZSL: harmonic mean), in %; and mean wall time."""
    key = "harmonic_mean" if mode == "trzsl" else "test_acc"
    res = [json.loads(p.read_text()) for p in sorted(out.glob(f"{name}-seed*/results.json"))]
    vals = [100 * r["metrics"][key] for r in res]
    if not vals:
        return None
    return (
        statistics.mean(vals),
        statistics.stdev(vals) if len(vals) > 1 else 0.0,
        vals,
        statistics.mean(r["elapsed_s"] for r in res),
    )


def table(out):
    def fmt(s):
        return f"{s[0]:.2f} ± {s[1]:.2f}" if s else "not run"

    zs = [json.loads(p.read_text())["metrics"]["zeroshot_test_acc"] for p in out.glob("paper-seed*/results.json")]
    print(
        f"demo world VERSION {demo.VERSION}; seeds {len(zs)} per row; zero-shot test acc "
        f"{100 * statistics.mean(zs):.2f}"
        if zs
        else f"demo world VERSION {demo.VERSION}"
    )
    print("| release behaviour (`--release NAME`) | setting | paper formulas | with it | Δ | wall s/run |")
    print("|---|---|---|---|---|---|")
    for name, mode, _, base in RUNS:
        if base is None:
            continue
        s, b = score(out, name, mode), score(out, base, mode)
        delta = f"{s[0] - b[0]:+.2f}" if s and b else ""
        what = "all at once (`--as-released`)" if name == "as-released" else f"`{name}`"
        metric = "H" if mode == "trzsl" else "acc"
        print(
            f"| {what} | {mode.upper()} {metric} | {fmt(b)} | {fmt(s)} | {delta} | {s[3]:.0f} |"
            if s
            else f"| {what} | {mode.upper()} | {fmt(b)} | not run | | |"
        )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/cap_ablation", help="where the runs go")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds")
    p.add_argument("--cache-dir", default="cache", help="cap.py --cache-dir (the demo CLIP is cached there)")
    p.add_argument("--table-only", action="store_true", help="print the table from finished runs")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (a machine with cores to spare)")
    args, extra = p.parse_known_args(argv)  # anything else goes to every cap.py run, e.g. --device cpu
    out = ROOT / args.out
    if not args.table_only:
        run_all(out, args.seeds.split(","), args.cache_dir, args.jobs, extra)
    table(out)


if __name__ == "__main__":
    main()
