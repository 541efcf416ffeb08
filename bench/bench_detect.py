"""Mismatch detection (CAP §3.1) at scale: the fast removal loop (warm-started, incremental K-Means) against
the paper's from-scratch loop, on synthetic worlds with planted mismatched classes. A script, not a test.

A world: C classes of `per` images each, image features = class direction + noise on the unit sphere, text
features near their class direction, except for the planted classes (about C/20, at least 2), whose text
points in a random direction, unrelated to every image, as a wrong class name would. Per world it prints Y_MM of both
loops, whether they agree, and whether every planted class was found.

    python bench/bench_detect.py --classes 47 --worlds 20            # agreement at 47 classes
    python bench/bench_detect.py --classes 1000 --per 100 --worlds 1 --fast-only   # the 1,000-class timing
"""
import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cap  # noqa: E402


def make_world(C, per, d, seed):
    """-> (image features [C*per, D], text features [C, D], planted class ids), sorted by class like a pool."""
    g = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(C, d, generator=g), dim=1)  # [C, D]
    y = torch.arange(C).repeat_interleave(per)  # [N]
    feats = F.normalize(means[y] + 1.5 / d ** 0.5 * torch.randn(len(y), d, generator=g), dim=1)  # [N, D] cos ~0.55
    text = F.normalize(means + 1.0 / d ** 0.5 * torch.randn(C, d, generator=g), dim=1)  # [C, D] cos ~0.7
    planted = torch.randperm(C, generator=g)[:max(2, C // 20)]
    text[planted] = F.normalize(torch.randn(len(planted), d, generator=g), dim=1)  # a wrong name: unrelated text
    return feats, text, sorted(planted.tolist())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=47)
    p.add_argument("--per", type=int, default=40, help="images per class")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--worlds", type=int, default=10)
    p.add_argument("--n-init", type=int, default=20, help="K-Means restarts (the exact loop: every clustering)")
    p.add_argument("--scale", type=float, default=100.0)
    p.add_argument("--fast-only", action="store_true", help="skip the from-scratch loop (too slow at 1,000 classes)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    C = args.classes
    t = math.ceil(C / 10)
    agree = found = 0
    times = {"exact": [], "fast": []}
    print(f"C={C} per={args.per} D={args.dim} t={t} n_init={args.n_init} threads={args.threads} "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    for w in range(args.worlds):
        feats, text, planted = make_world(C, args.per, args.dim, seed=w)
        zs_pred = (feats @ text.T).argmax(1)
        res = {}
        for mode in ["fast"] + ([] if args.fast_only else ["exact"]):
            t0 = time.perf_counter()
            res[mode] = cap.detect_mismatch(feats, text, zs_pred, t, seed=0, n_init=args.n_init, scale=args.scale,
                                            fast=mode == "fast")[0]
            times[mode].append(time.perf_counter() - t0)
        same = "exact" not in res or sorted(res["exact"]) == sorted(res["fast"])
        hit = set(planted) <= set(res["fast"])
        agree += same
        found += hit
        print(f"world {w}: planted {planted} fast {sorted(res['fast'])} "
              + (f"exact {sorted(res['exact'])} agree {same} " if "exact" in res else "")
              + f"planted found {hit} | " + " ".join(f"{m} {v[-1]:.1f}s" for m, v in times.items() if v)
              + f" | load {os.getloadavg()[0]:.1f}", flush=True)
    n = args.worlds
    print(f"summary C={C}: agreement {agree}/{n}" + (" (no exact runs)" if args.fast_only else "")
          + f", planted found (fast) {found}/{n}, mean time "
          + " ".join(f"{m} {sum(v) / len(v):.1f}s" for m, v in times.items() if v))


if __name__ == "__main__":
    main()
