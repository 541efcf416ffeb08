"""Benchmark common.kmeans against faiss.Kmeans and scikit-learn KMeans on CPU with 2 threads.

A script, not a test. Every peer gets the same data, the same K, the same 25 Lloyd iterations and
no early stopping (tol=0), and runs in a fresh subprocess so its peak memory can be read from
/proc/self/status (VmHWM). The final inertia of every peer is recomputed here, the same way, from
the centroids it returns: sum of squared Euclidean distances of each point to its nearest centroid,
with float64 sums. Data shapes (make_data): "clip", a Gaussian mixture on the unit sphere with a shared mean
direction and uneven cluster sizes in a low-rank subspace, like L2-normalised CLIP image features; "blobs",
well-separated isotropic blobs; "overlap", overlapping clusters of very unequal size and spread; "aniso",
clusters on the sphere each stretched along 4 directions of its own.

Inertia is averaged over init seeds 0..S-1 (8 for case a, 1 for the heavy cases): with one seed the
same algorithm lands anywhere within about +-1% of its mean, so a one-seed ratio against sklearn mostly
measures luck. All seeds of one peer run in one process, one after the other; time is the mean over seeds
(best of --repeats). Every peer of a case runs in turn, interleaved, and the 1-minute load average is printed
with each line: on a shared machine read the ratios, not the seconds.

    python bench/bench_kmeans.py                 # a: 5,640 x 512, K=47, 4 shapes x 8 seeds; b: 100,000 x 512, K=1,000
    python bench/bench_kmeans.py --cases c --iters 5   # c: ImageNet's 1,281,167 x 512, K=1,000 (ours and faiss)
    python bench/bench_kmeans.py --quick         # case a and a smaller b (20,000 x 512, K=200)

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
# Idle OpenMP threads sleep instead of spinning, for every peer: on a machine shared with other jobs a spinning
# thread holds a core that another's barrier is waiting for (measured under load ~6: one assignment pass of
# case a 380 ms with spinning threads, 10 ms without; faiss 80 ms and 12 ms). Set OMP_WAIT_POLICY=ACTIVE to compare.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

CASES = {  # name: (N, D, K, default number of init seeds, data shapes, peers, targets checked against the peers)
    "a": (
        5_640,
        512,
        47,
        8,
        ["clip", "blobs", "overlap", "aniso"],
        ["ours", "faiss", "sklearn"],
        ["time<=0.9*faiss", "inertia<=1.01*sklearn"],
    ),  # DTD train+val scale, 47 classes
    "b": (
        100_000,
        512,
        1_000,
        1,
        ["clip"],
        ["ours", "faiss", "sklearn"],
        ["time<=1.0*faiss", "inertia<=1.01*sklearn", "mem<1GB"],
    ),
    "c": (1_281_167, 512, 1_000, 1, ["clip"], ["ours", "faiss"], ["time<=1.0*faiss", "mem<4GB"]),  # ImageNet
}
QUICK_B = (20_000, 512, 200)
PEERS = ["ours", "faiss", "sklearn"]
BLOCK = 100_000  # rows generated at a time (case c would need 10 GB of float64 temporaries at once)


# -----------------------------------------------------------------------------
# Data and the shared inertia


def _unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def make_data(n, d, k_true, seed=0, shape="clip", rank=64):
    """-> [N, D] float32, generated in blocks of BLOCK rows (the same rows whatever N is cut into)."""
    rng = np.random.default_rng([seed, 0])
    if shape == "clip":  # shared direction mu + (centre + noise) in a rank-64 subspace with a power-law spectrum
        mu = _unit(rng.standard_normal(d))  # [D]; within-class cosine ~0.78, between ~0.60: clusters overlap
        basis = np.linalg.qr(rng.standard_normal((d, rank)))[0].T  # [r, D] orthonormal rows
        s = np.arange(1, rank + 1) ** -0.5
        s /= np.linalg.norm(s)  # [r]
        centres = rng.standard_normal((k_true, rank)) * s  # [K, r]
        p = rng.lognormal(0.0, 0.5, k_true)  # uneven cluster sizes
    elif shape == "blobs":  # well separated, equal sizes, isotropic
        centres, p = rng.standard_normal((k_true, d)), np.ones(k_true)
    elif shape == "overlap":  # overlapping, very unequal sizes and spreads
        centres, p, spread = (
            0.25 * rng.standard_normal((k_true, d)),
            rng.lognormal(0.0, 1.0, k_true),
            0.25 * rng.uniform(0.5, 1.5, k_true),
        )
    elif shape == "aniso":  # on the unit sphere, each cluster stretched along 4 directions of its own
        centres, p, axes = (
            _unit(rng.standard_normal((k_true, d))),
            np.ones(k_true),
            0.35 * rng.standard_normal((k_true, 4, d)),
        )
    x = np.empty((n, d), dtype=np.float32)
    for b, i in enumerate(range(0, n, BLOCK)):
        r = np.random.default_rng([seed, 1, b])
        m = min(BLOCK, n - i)
        y = r.choice(k_true, m, p=p / p.sum())  # [m]
        if shape == "clip":
            latent = centres[y] + r.standard_normal((m, rank)) * s  # [m, r]
            xb = _unit(mu + 0.6 * latent @ basis + 0.15 * r.standard_normal((m, d)) / np.sqrt(d))
        elif shape == "blobs":
            xb = centres[y] + 0.1 * r.standard_normal((m, d))
        elif shape == "overlap":
            xb = centres[y] + spread[y, None] * r.standard_normal((m, d))
        else:
            xb = _unit(
                centres[y]
                + np.einsum("nr,nrd->nd", r.standard_normal((m, 4)), axes[y])
                + 0.03 * r.standard_normal((m, d))
            )
        x[i : i + m] = xb
    return x


def inertia(x, c, chunk=16384):
    """Sum over points of the squared Euclidean distance to the nearest centroid (float32 products, float64 sum)."""
    import torch

    xt, ct = torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(c, dtype=np.float32))
    c_sq = (ct * ct).sum(1)  # [K]
    total = 0.0
    for i in range(0, len(xt), chunk):
        xb = xt[i : i + chunk]  # [B, D]
        d = torch.addmm(c_sq, xb, ct.T, alpha=-2).min(1).values + (xb * xb).sum(1)  # [B]
        total += d.clamp_min(0).double().sum().item()
    return total


# -----------------------------------------------------------------------------
# One peer in a fresh process: load data, warm up, then per seed reset the memory peak and time one fit


def _mem_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _fit_fn(peer, n_iter, info):
    """-> fit(x, k, seed) returning (centroids [K, D], labels [N]): every peer delivers both, as common.kmeans does."""
    if peer == "ours":
        import torch

        torch.set_num_threads(THREADS)
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        import common

        device = torch.device(os.environ.get("BENCH_DEVICE", "cpu"))  # --device: ours alone can run on a GPU

        def fit(x, k, seed):
            if device.type == "cpu":
                centroids, assign, _ = common.kmeans(torch.from_numpy(x), k, n_iter=n_iter, tol=0.0, seed=seed)
                return centroids.numpy(), assign.numpy()
            xd = torch.from_numpy(x).to(device)  # the copy is outside gpu_seconds (CAP's features live there already)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            centroids, assign, _ = common.kmeans(xd, k, n_iter=n_iter, tol=0.0, seed=seed)
            torch.cuda.synchronize()
            info.setdefault("gpu_seconds", []).append(time.perf_counter() - t0)
            info.setdefault("gpu_peak_extra_mb", []).append(
                (torch.cuda.max_memory_allocated() - xd.numel() * 4) / 2**20
            )  # beyond the data itself
            return centroids.cpu().numpy(), assign.cpu().numpy()

        return fit
    if peer == "faiss":
        import faiss

        faiss.omp_set_num_threads(THREADS)

        def fit(x, k, seed):
            km = faiss.Kmeans(
                x.shape[1], k, niter=n_iter, seed=seed, verbose=False, max_points_per_centroid=len(x)
            )  # use every point (no subsampling)
            t0 = time.perf_counter()
            km.train(x)
            info.setdefault("train_only_seconds", []).append(time.perf_counter() - t0)
            return km.centroids, km.index.search(x, 1)[1][:, 0]  # train() alone returns no labels

        return fit
    if peer == "sklearn":
        from sklearn.cluster import KMeans
        from threadpoolctl import threadpool_limits

        threadpool_limits(THREADS)

        def fit(x, k, seed):
            km = KMeans(
                k, init="k-means++", n_init=1, max_iter=n_iter, tol=0.0, algorithm="lloyd", random_state=seed
            ).fit(x)
            return km.cluster_centers_.astype(np.float32), km.labels_

        return fit
    raise ValueError(peer)


def worker(peer, data_path, k, n_iter, seeds, out_dir):
    info = {}
    try:
        fit = _fit_fn(peer, n_iter, info)
    except ImportError as e:
        print(json.dumps({"skipped": f"{peer} not installed ({e})"}))
        return
    x = np.load(data_path, mmap_mode="r")
    x = np.array(x)  # [N, D] float32, resident
    fit(np.ascontiguousarray(x[:2000]), 8, 0)  # warm-up: thread pools, BLAS, first-call overheads
    for key in ("train_only_seconds", "gpu_seconds", "gpu_peak_extra_mb"):
        info.pop(key, None)
    res = {"seconds": [], "peak_extra_mb": [], "load": []}
    for seed in seeds:
        try:  # reset VmHWM to the current RSS (Linux >= 4.0); otherwise the peak so far is the baseline
            Path("/proc/self/clear_refs").write_text("5")
            base = _mem_kb("VmRSS")
        except OSError:
            base = _mem_kb("VmHWM")
        t0 = time.perf_counter()
        c, _ = fit(x, k, seed)
        res["seconds"].append(time.perf_counter() - t0)
        res["peak_extra_mb"].append((_mem_kb("VmHWM") - base) / 1024)
        res["load"].append(os.getloadavg()[0])
        np.save(Path(out_dir) / f"{peer}_{seed}.npy", np.ascontiguousarray(c, dtype=np.float32))
    print(json.dumps({**res, **info}))


def run_peer(peer, data_path, k, n_iter, seeds, tmp):
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        peer,
        "--data",
        str(data_path),
        "--k",
        str(k),
        "--iters",
        str(n_iter),
        "--seed-list",
        ",".join(map(str, seeds)),
        "--out",
        str(tmp),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"skipped": f"{peer} failed: {proc.stderr.strip().splitlines()[-1:]}"}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skipped" not in res:
        res["centroids"] = [np.load(Path(tmp) / f"{peer}_{s}.npy") for s in seeds]
    return res


# -----------------------------------------------------------------------------
# Table and targets


def check(target, r):
    """Evaluate one target string on the results dict r (peer -> result) -> 'PASS' / 'FAIL' / 'n/a'."""
    ours = r.get("ours", {})
    if "seconds" not in ours:
        return "n/a"
    if target.startswith("mem<"):
        return "PASS" if ours["peak_extra_mb"] < 1024 * float(target[4:-2]) else "FAIL"
    what, rhs = target.split("<=")
    factor, peer = rhs.split("*")
    if "seconds" not in r.get(peer, {}):
        return "n/a"
    key = "seconds" if what == "time" else "inertia"
    return "PASS" if ours[key] <= float(factor) * r[peer][key] else "FAIL"


def bench_case(name, n, d, k, shape, targets, n_iter, seeds, repeats, peers):
    """Every peer on the same data, in turn (ours, faiss, sklearn, ours, ... with --repeats), so load spikes
    on a shared machine hit all peers alike. Time: mean over seeds of the best repeat; inertia: mean over seeds."""
    print(
        f"\ncase {name} [{shape}]: N={n:,} D={d} K={k}, {n_iter} iterations, tol=0, {THREADS} threads, "
        f"init seeds {list(seeds)}, {repeats} repeat(s), load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    x = make_data(n, d, k, seed=0, shape=shape)
    runs = {p: [] for p in peers}
    with tempfile.TemporaryDirectory() as tmp:
        data_path = Path(tmp) / "x.npy"
        np.save(data_path, x)
        for _ in range(repeats):
            for p in peers:
                if not any("skipped" in res for res in runs[p]):
                    runs[p].append(run_peer(p, data_path, k, n_iter, list(seeds), tmp))
                    res = runs[p][-1]
                    print(
                        f"  {p}: "
                        + (
                            f"{np.mean(res['seconds']):.2f} s a seed (load {np.mean(res['load']):.1f})"
                            if "seconds" in res
                            else res["skipped"]
                        ),
                        flush=True,
                    )
    r = {}
    for p, rs in runs.items():
        if any("skipped" in res for res in rs):
            r[p] = rs[0]
            continue

        def best(key):
            return float(np.mean(np.min([res[key] for res in rs], axis=0)))  # best repeat, mean over seeds

        r[p] = {
            "seconds": best("seconds"),
            "inertia": float(np.mean([inertia(x, c) for c in rs[0]["centroids"]])),
            "peak_extra_mb": float(np.max([res["peak_extra_mb"] for res in rs])),
            "load": float(np.mean([res["load"] for res in rs])),
        }
        if "train_only_seconds" in rs[0]:
            r[p]["train_only_seconds"] = best("train_only_seconds")
        if "gpu_seconds" in rs[0]:
            r[p]["gpu_seconds"] = best("gpu_seconds")
            r[p]["gpu_peak_extra_mb"] = float(np.max([res["gpu_peak_extra_mb"] for res in rs]))
    print(
        f"{'peer':<8} {'time s':>8} {'inertia':>14} {'peak extra MB':>14} {'load':>5} {'ours/peer time':>15} "
        f"{'ours/peer inertia':>18}"
    )
    for p, res in r.items():
        if "skipped" in res:
            print(f"{p:<8} skipped: {res['skipped']}")
            continue
        ours = r["ours"]
        t_ratio = ours["seconds"] / res["seconds"] if "seconds" in ours else float("nan")
        i_ratio = ours["inertia"] / res["inertia"] if "inertia" in ours else float("nan")
        print(
            f"{p:<8} {res['seconds']:>8.2f} {res['inertia']:>14.2f} {res['peak_extra_mb']:>14.0f} "
            f"{res['load']:>5.1f} "
            f"{t_ratio:>15.3f} {i_ratio:>18.4f}"
        )
    for p, res in r.items():
        if "train_only_seconds" in res:
            print(f"({p} train() alone, without the labels pass: {res['train_only_seconds']:.2f} s)")
        if "gpu_seconds" in res:
            print(
                f"({p} on {os.environ['BENCH_DEVICE']}: {res['gpu_seconds']:.3f} s a fit, synchronised, data already "
                f"there; peak GPU memory beyond the data {res['gpu_peak_extra_mb']:.0f} MB)"
            )
    for t in targets:
        if t.startswith("time") and shape != "clip":
            continue  # times are compared on the CLIP-like shape only
        print(f"target {t:<22} {check(t, r)}")
    return r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="a,b", help="comma-separated subset of: " + ",".join(CASES))
    p.add_argument("--quick", action="store_true", help=f"case b at N={QUICK_B[0]:,}, K={QUICK_B[2]}")
    p.add_argument("--iters", type=int, default=25, help="Lloyd iterations for every peer (faiss default)")
    p.add_argument("--peers", default=None, help="comma-separated subset of: " + ",".join(PEERS))
    p.add_argument("--shapes", default=None, help="comma-separated data shapes (default: the case's)")
    p.add_argument("--seeds", type=int, help="init seeds 0..S-1 per peer, averaged (default: 8 for a, 1 for b, c)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per peer (the fastest counts)")
    p.add_argument(
        "--device",
        default="cpu",
        help="where ours runs (cuda: time and peak memory on the GPU; the "
        "data is moved there before timing). The peers stay on the CPU",
    )
    # internal: run one peer in this (fresh) process
    p.add_argument("--worker", choices=PEERS, help=argparse.SUPPRESS)
    p.add_argument("--seed-list", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.data, args.k, args.iters, [int(s) for s in args.seed_list.split(",")], args.out)
    os.environ["BENCH_DEVICE"] = args.device  # read by the worker processes
    for name in args.cases.split(","):
        n, d, k, n_seeds, shapes, peers, targets = CASES[name]
        if args.quick and name == "b":
            n, d, k = QUICK_B
        for shape in args.shapes.split(",") if args.shapes else shapes:
            bench_case(
                name,
                n,
                d,
                k,
                shape,
                targets,
                args.iters,
                range(args.seeds or n_seeds),
                args.repeats,
                args.peers.split(",") if args.peers else peers,
            )


if __name__ == "__main__":
    main()
