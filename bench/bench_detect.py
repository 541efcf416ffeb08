"""Mismatch detection (CAP §3.1) at scale: the fast removal loop (each K-Means warm-started from the last) against
the paper's from-scratch loop, on synthetic worlds with planted mismatched classes. A script, not a test.

A world: C classes of `per` images each, image features = class direction + noise on the unit sphere, text
features near their class direction, except for the planted classes (about C/20, at least 2), whose text
points in a random direction, unrelated to every image, as a wrong class name would. Per world it prints Y_MM of both
loops, whether they agree, and whether every planted class was found.

    python bench/bench_detect.py --classes 47 --worlds 20            # agreement at 47 classes
    python bench/bench_detect.py --classes 47 --worlds 20 --noise-floor   # + the exact loop with another seed
    python bench/bench_detect.py --classes 1000 --per 100 --dim 512 --worlds 1 --fast-only --n-init 1   # 1,000 classes

--noise-floor runs the from-scratch loop a second time with K-Means seed 1: how often the paper's own loop
agrees with itself on Y_MM bounds how often any other loop can agree with it.
"""

import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as the scripts do
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cap  # noqa: E402


def make_world(C, per, d, seed):
    """-> (image features [C*per, D], text features [C, D], planted class ids), sorted by class like a pool."""
    g = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(C, d, generator=g), dim=1)  # [C, D]
    y = torch.arange(C).repeat_interleave(per)  # [N]
    feats = F.normalize(means[y] + 1.5 / d**0.5 * torch.randn(len(y), d, generator=g), dim=1)  # [N, D] cos ~0.55
    text = F.normalize(means + 1.0 / d**0.5 * torch.randn(C, d, generator=g), dim=1)  # [C, D] cos ~0.7
    planted = torch.randperm(C, generator=g)[: max(2, C // 20)]
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
    p.add_argument("--noise-floor", action="store_true", help="also the from-scratch loop with K-Means seed 1")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    C = args.classes
    t = math.ceil(C / 10)
    agree = found = self_agree = 0
    times = {"exact": [], "fast": [], "exact-seed1": []}
    print(
        f"C={C} per={args.per} D={args.dim} t={t} n_init={args.n_init} threads={args.threads} "
        f"load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    for w in range(args.worlds):
        feats, text, planted = make_world(C, args.per, args.dim, seed=w)
        zs_pred = (feats @ text.T).argmax(1)
        res = {}
        modes = ["fast"] + ([] if args.fast_only else ["exact"]) + (["exact-seed1"] if args.noise_floor else [])
        for mode in modes:
            t0 = time.perf_counter()
            res[mode] = sorted(
                cap.detect_mismatch(
                    feats,
                    text,
                    zs_pred,
                    t,
                    seed=int(mode == "exact-seed1"),
                    n_init=args.n_init,
                    scale=args.scale,
                    fast=mode == "fast",
                )[0]
            )
            times[mode].append(time.perf_counter() - t0)
        same = "exact" not in res or res["exact"] == res["fast"]
        hit = set(planted) <= set(res["fast"])
        agree += same
        found += hit
        self_agree += "exact-seed1" in res and res["exact-seed1"] == res.get("exact")
        print(
            f"world {w}: planted {planted} fast {res['fast']} "
            + (f"exact {res['exact']} agree {same} " if "exact" in res else "")
            + (f"exact-seed1 {res['exact-seed1']} " if "exact-seed1" in res else "")
            + f"planted found {hit} | "
            + " ".join(f"{m} {v[-1]:.1f}s" for m, v in times.items() if v)
            + f" | load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    n = args.worlds
    print(
        f"summary C={C}: agreement {agree}/{n}"
        + (" (no exact runs)" if args.fast_only else "")
        + (f", exact loop with itself (K-Means seed 0 vs 1) {self_agree}/{n}" if args.noise_floor else "")
        + f", planted found (fast) {found}/{n}, mean time "
        + " ".join(f"{m} {sum(v) / len(v):.1f}s" for m, v in times.items() if v)
    )


if __name__ == "__main__":
    main()
