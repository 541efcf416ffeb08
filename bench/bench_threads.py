"""Torch threads on a busy 2-core machine: the demo CLIP's pre-training (demo.pretrain, shortened) and a
tiny-model CAP iteration (bench/bench_cap.py), with 1 and 2 threads, OpenMP's default wait policy and
OMP_WAIT_POLICY=PASSIVE, alone and beside one CPU-bound process of ours (`while True: pass`). A script, not a test.

Each configuration runs in a fresh process (the wait policy is read when torch loads), in turn, and the
configurations are repeated in rounds so that the machine's background load hits all alike; the 1-minute
load average is printed with every time. Read the ratios: "alone" means no competitor *of ours*.

    python bench/bench_threads.py                  # pre-training, 20 steps a run, 2 rounds
    python bench/bench_threads.py --what cap --rounds 1
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(what, threads, steps):
    """Runs in the fresh process: -> seconds per step (pre-training) or per iteration (CAP)."""
    import torch

    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(threads)
    if what == "pretrain":
        import common
        import demo

        demo.PRETRAIN_THREADS = threads
        model, _, tokenizer = common.load_clip("tiny-demo", "none")
        stamps = []

        def clock(it):  # pretrain's progress hook: a time stamp before each step (data generation excluded)
            for i in it:
                stamps.append(time.perf_counter())
                yield i
            stamps.append(time.perf_counter())

        demo.pretrain(model, tokenizer, steps=steps + 2, progress=clock)
        return (stamps[-1] - stamps[2]) / steps  # the first 2 steps warm up (first-call overheads, thread pools)
    sys.path.insert(0, str(ROOT / "bench"))
    import io
    from contextlib import redirect_stdout

    import bench_cap

    buf = io.StringIO()
    t0 = time.perf_counter()
    with redirect_stdout(buf):
        bench_cap.main(["--clip-model", "tiny", "--iters", str(steps)])
    return (time.perf_counter() - t0) / steps


def run(what, threads, policy, compete, steps):
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if compete else None
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--child", what, "--threads", str(threads), "--steps", str(steps)],
            env=env,
            capture_output=True,
            text=True,
            timeout=3000,
        )
    finally:
        if hog:
            hog.kill()  # only the competitor this run started, by its own handle
            hog.wait()
    if out.returncode:
        return float("nan")
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--what", default="pretrain", choices=["pretrain", "cap"])
    p.add_argument(
        "--steps", type=int, default=20, help="timed pre-training steps (700 in the real run) or CAP iterations"
    )
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--policies", default="default,PASSIVE")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        threads = int(os.environ.get("BT_THREADS", 0)) or args_threads(argv)
        print(json.dumps({"seconds": child(args.child, threads, args.steps)}))
        return
    configs = [
        (t, pol, c)
        for pol in args.policies.split(",")
        for t in map(int, args.threads.split(","))
        for c in (False, True)
    ]
    times = {cfg: [] for cfg in configs}
    for r in range(args.rounds):
        for cfg in configs:
            s = run(args.what, *cfg, args.steps)
            times[cfg].append(s)
            who = "+1 competitor" if cfg[2] else "alone"
            print(
                f"round {r} {args.what} threads {cfg[0]} policy {cfg[1]:<8} {who:<13} "
                f"{s:.3f} s/step  load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    print(f"\n{args.what}: best of {args.rounds} rounds, s/step (ratio with one competitor / alone)")
    for t in map(int, args.threads.split(",")):
        for pol in args.policies.split(","):
            a, c = min(times[(t, pol, False)]), min(times[(t, pol, True)])
            print(f"threads {t} policy {pol:<8} alone {a:.3f}  +1 competitor {c:.3f}  ratio {c / a:.2f}")


def args_threads(argv):
    argv = sys.argv[1:] if argv is None else argv
    return int(argv[argv.index("--threads") + 1])


if __name__ == "__main__":
    main()
