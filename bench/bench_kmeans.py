"""Benchmark common.kmeans against faiss.Kmeans and scikit-learn KMeans on CPU with 2 threads.

A script, not a test. Every peer gets the same data, the same K, the same 25 Lloyd iterations and
no early stopping (tol=0), and runs in a fresh subprocess so its peak memory can be read from
/proc/self/status (VmHWM). The final inertia of every peer is recomputed here, the same way, from
the centroids it returns: sum of squared Euclidean distances of each point to its nearest centroid,
in float64. Data: a Gaussian mixture on the unit sphere with a shared mean direction and uneven
cluster sizes in a low-rank subspace, like L2-normalised CLIP image features (see make_data).

Inertia is averaged over init seeds 0..S-1 (5 for case a, 1 for the heavy case b): with one seed the
same algorithm lands anywhere within about +-1% of its mean on this data, so a one-seed ratio
against sklearn mostly measures luck. Time is the best of --repeats runs per seed, averaged over
seeds; on a shared machine, repeat and read the numbers as noisy.

    python bench/bench_kmeans.py                 # case a (5,640 x 512, K=47) and case b (100,000 x 512, K=1,000)
    python bench/bench_kmeans.py --quick         # case a and a smaller b (20,000 x 512, K=200)
    python bench/bench_kmeans.py --cases a --repeats 5 --peers ours,faiss

Peers that are not installed are skipped with a message (pip install faiss-cpu scikit-learn).
Notes on the peers:
  - faiss.Kmeans seeds with k random points (no k-means++) and subsamples to
    max_points_per_centroid * K points (default 256); we set it to N so faiss uses every point.
    Its train() returns centroids only, so its time includes the index.search(x, 1) that gives the
    labels (ours and sklearn return labels too); the train-only time is printed below the table.
  - sklearn KMeans(init="k-means++", n_init=1, max_iter=25, tol=0, algorithm="lloyd"); it still stops
    early if the assignment stops changing (then it has converged, so this costs it nothing).
  - ours: common.kmeans(x, K, n_iter=25, tol=0), Euclidean (spherical=False) like the peers.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THREADS = 2
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = str(THREADS)  # before numpy/torch/faiss/sklearn load their thread pools

import numpy as np  # noqa: E402

CASES = {  # name: (N, D, K, default number of init seeds, targets checked against the peers' numbers)
    "a": (5_640, 512, 47, 5, ["time<=faiss", "inertia<=1.01*sklearn"]),  # DTD train+val scale, 47 classes
    "b": (100_000, 512, 1_000, 1, ["time<=sklearn", "inertia<=1.01*sklearn", "mem<1GB"]),
}
QUICK_B = (20_000, 512, 200)
PEERS = ["ours", "faiss", "sklearn"]


# -----------------------------------------------------------------------------
# Data and the shared inertia

def make_data(n, d, k_true, seed=0, rank=64):
    """L2-normalised mixture like CLIP image features -> [N, D] float32.

    Shared direction mu + (cluster centre + within-cluster noise) in a rank-64 subspace with a power-law
    spectrum + a little isotropic noise, then normalised. Within-class cosine ~0.78, between ~0.60, so
    clusters overlap and K-Means needs ~30 iterations to converge (unlike easy, separable blobs).
    """
    rng = np.random.default_rng(seed)
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
    mu = unit(rng.standard_normal(d))  # [D] direction every feature shares
    basis = np.linalg.qr(rng.standard_normal((d, rank)))[0].T  # [r, D] orthonormal rows
    s = np.arange(1, rank + 1) ** -0.5
    s /= np.linalg.norm(s)  # [r] power-law spectrum
    centres = rng.standard_normal((k_true, rank)) * s  # [K, r]
    sizes = rng.lognormal(0.0, 0.5, k_true)  # uneven cluster sizes
    y = rng.choice(k_true, n, p=sizes / sizes.sum())  # [N]
    latent = centres[y] + rng.standard_normal((n, rank)) * s  # [N, r]
    x = mu + 0.6 * latent @ basis + 0.15 * rng.standard_normal((n, d)) / np.sqrt(d)  # [N, D]
    return np.ascontiguousarray(unit(x), dtype=np.float32)


def inertia(x, c, chunk=8192):
    """Sum over points of the squared Euclidean distance to the nearest centroid, in float64."""
    c = c.astype(np.float64)
    c_sq = (c * c).sum(1)  # [K]
    total = 0.0
    for i in range(0, len(x), chunk):
        xb = x[i:i + chunk].astype(np.float64)  # [B, D]
        d = (xb * xb).sum(1, keepdims=True) - 2 * xb @ c.T + c_sq  # [B, K]
        total += d.min(1).clip(min=0).sum()
    return float(total)


# -----------------------------------------------------------------------------
# One peer in a fresh process: load data, warm up, reset the memory peak, time one fit

def _mem_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _fit_fn(peer, n_iter, seed, info):
    """-> fit(x, k) returning (centroids [K, D], labels [N]): every peer delivers both, as common.kmeans does."""
    if peer == "ours":
        import torch
        torch.set_num_threads(THREADS)
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        import common

        def fit(x, k):
            centroids, assign, _ = common.kmeans(torch.from_numpy(x), k, n_iter=n_iter, tol=0.0, seed=seed)
            return centroids.numpy(), assign.numpy()
        return fit
    if peer == "faiss":
        import faiss
        faiss.omp_set_num_threads(THREADS)

        def fit(x, k):
            km = faiss.Kmeans(x.shape[1], k, niter=n_iter, seed=seed, verbose=False,
                              max_points_per_centroid=len(x))  # use every point (no subsampling)
            t0 = time.perf_counter()
            km.train(x)
            info["train_only_seconds"] = time.perf_counter() - t0
            return km.centroids, km.index.search(x, 1)[1][:, 0]  # train() alone returns no labels
        return fit
    if peer == "sklearn":
        from sklearn.cluster import KMeans
        from threadpoolctl import threadpool_limits
        threadpool_limits(THREADS)

        def fit(x, k):
            km = KMeans(k, init="k-means++", n_init=1, max_iter=n_iter, tol=0.0, algorithm="lloyd",
                        random_state=seed).fit(x)
            return km.cluster_centers_.astype(np.float32), km.labels_
        return fit
    raise ValueError(peer)


def worker(peer, data_path, k, n_iter, seed, out_path):
    info = {}
    try:
        fit = _fit_fn(peer, n_iter, seed, info)
    except ImportError as e:
        print(json.dumps({"skipped": f"{peer} not installed ({e})"}))
        return
    x = np.load(data_path)  # [N, D] float32, resident
    fit(np.ascontiguousarray(x[:2000]), 8)  # warm-up: thread pools, BLAS, first-call overheads
    try:  # reset VmHWM to the current RSS (Linux >= 4.0); otherwise the peak so far is the baseline
        Path("/proc/self/clear_refs").write_text("5")
        base = _mem_kb("VmRSS")
    except OSError:
        base = _mem_kb("VmHWM")
    t0 = time.perf_counter()
    c, _ = fit(x, k)
    seconds = time.perf_counter() - t0
    peak_extra_mb = (_mem_kb("VmHWM") - base) / 1024
    np.save(out_path, np.ascontiguousarray(c, dtype=np.float32))
    print(json.dumps({"seconds": seconds, "peak_extra_mb": peak_extra_mb, **info}))


def run_peer(peer, data_path, k, n_iter, seed, tmp):
    out = Path(tmp) / f"{peer}_centroids.npy"
    cmd = [sys.executable, __file__, "--worker", peer, "--data", str(data_path), "--k", str(k),
           "--iters", str(n_iter), "--seed", str(seed), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"skipped": f"{peer} failed: {proc.stderr.strip().splitlines()[-1:]}"}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skipped" not in res:
        res["centroids"] = np.load(out)
    return res


# -----------------------------------------------------------------------------
# Table and targets

def check(target, r):
    """Evaluate one target string on the results dict r (peer -> result) -> 'PASS' / 'FAIL' / 'n/a'."""
    ours = r.get("ours", {})
    if "seconds" not in ours:
        return "n/a"
    if target == "mem<1GB":
        return "PASS" if ours["peak_extra_mb"] < 1024 else "FAIL"
    what, peer = target.split("<=")
    factor, peer = (1.01, peer.split("*")[1]) if "*" in peer else (1.0, peer)
    if "seconds" not in r.get(peer, {}):
        return "n/a"
    key = "seconds" if what == "time" else "inertia"
    return "PASS" if ours[key] <= factor * r[peer][key] else "FAIL"


def bench_case(name, n, d, k, targets, n_iter, seeds, repeats, peers=PEERS):
    """Every peer on the same data; runs interleaved (ours, faiss, sklearn, ours, ...) so load spikes
    on a shared machine hit all peers alike. Time: min over repeats, mean over seeds; inertia: mean over seeds."""
    print(f"\ncase {name}: N={n:,} D={d} K={k}, {n_iter} iterations, tol=0, {THREADS} threads, "
          f"init seeds {list(seeds)}, {repeats} repeat(s)")
    x = make_data(n, d, k, seed=0)
    runs = {p: [] for p in peers}  # peer -> list of (seed, result)
    with tempfile.TemporaryDirectory() as tmp:
        data_path = Path(tmp) / "x.npy"
        np.save(data_path, x)
        for seed in seeds:
            for _ in range(repeats):
                for p in peers:
                    if not any("skipped" in res for _, res in runs[p]):
                        runs[p].append((seed, run_peer(p, data_path, k, n_iter, seed, tmp)))
                        res = runs[p][-1][1]
                        print(f"  {p} seed {seed}: " + (f"{res['seconds']:.2f} s" if "seconds" in res else res["skipped"]),
                              flush=True)
    r = {}
    for p, rs in runs.items():
        if any("skipped" in res for _, res in rs):
            r[p] = rs[0][1]
            continue
        inertias = {seed: inertia(x, res["centroids"]) for seed, res in rs}  # same seed -> same centroids
        best = lambda key: np.mean([min(res[key] for s, res in rs if s == seed) for seed in seeds])
        r[p] = {"seconds": best("seconds"),
                "inertia": np.mean(list(inertias.values())),
                "peak_extra_mb": max(res["peak_extra_mb"] for _, res in rs)}
        if "train_only_seconds" in rs[0][1]:
            r[p]["train_only_seconds"] = best("train_only_seconds")
    print(f"{'peer':<8} {'time s':>8} {'inertia':>12} {'peak extra MB':>14} {'ours/peer time':>15} {'ours/peer inertia':>18}")
    for p, res in r.items():
        if "skipped" in res:
            print(f"{p:<8} skipped: {res['skipped']}")
            continue
        ours = r["ours"]
        t_ratio = ours["seconds"] / res["seconds"] if "seconds" in ours else float("nan")
        i_ratio = ours["inertia"] / res["inertia"] if "inertia" in ours else float("nan")
        print(f"{p:<8} {res['seconds']:>8.2f} {res['inertia']:>12.2f} {res['peak_extra_mb']:>14.0f} "
              f"{t_ratio:>15.3f} {i_ratio:>18.4f}")
    for p, res in r.items():
        if "train_only_seconds" in res:
            print(f"({p} train() alone, without the labels pass: {res['train_only_seconds']:.2f} s)")
    for t in targets:
        print(f"target {t:<22} {check(t, r)}")
    return r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="a,b", help="comma-separated subset of: " + ",".join(CASES))
    p.add_argument("--quick", action="store_true", help=f"case b at N={QUICK_B[0]:,}, K={QUICK_B[2]}")
    p.add_argument("--iters", type=int, default=25, help="Lloyd iterations for every peer (faiss default)")
    p.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset of: " + ",".join(PEERS))
    p.add_argument("--seeds", type=int, help="init seeds 0..S-1 per peer, averaged (default: 5 for a, 1 for b)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per seed and peer (the fastest counts)")
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # worker: the init seed
    # internal: run one peer in this (fresh) process
    p.add_argument("--worker", choices=PEERS, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.data, args.k, args.iters, args.seed, args.out)
    for name in args.cases.split(","):
        n, d, k, n_seeds, targets = CASES[name]
        if args.quick and name == "b":
            n, d, k = QUICK_B
        bench_case(name, n, d, k, targets, args.iters, range(args.seeds or n_seeds), args.repeats, args.peers.split(","))


if __name__ == "__main__":
    main()
