"""Check a GPU and time it: first the CUDA tests (tests/test_cuda.py, in a subprocess), then the steps that set a
run's wall time, on random weights and random inputs, printed as one table and written as JSON.

    python tools/gpu_check.py                       # on a GPU: the papers' sizes, under 5 minutes
    python tools/gpu_check.py --small               # the CPU sizes (the default without CUDA): under a minute
    python tools/gpu_check.py --skip-tests --out /tmp/gpu_check.json

Rows, at the GPU size (CPU size):
  encode   ViT-B-32 image encoding at 224 px under common.autocast, no_grad: images/s (batch 256; 8)
  kmeans   common.kmeans, spherical, n_init 1, at most 25 iterations: 1.28 M x 512, K = 1,000 (20,000 x 512, K = 100)
  detect   cap.detect_mismatch fast=True, n_init 1: 1,000 classes x 100 images, D = 512 (50 classes)
  cap      one CAP training iteration (cap.train_step), ViT-B-32 at 224 px: s (16 classes, batch 32 per stream, the
           mean of 5 after 1 warm-up; 4 classes, batch 4, 1 after 1: the 16 class prompts alone take ~3 s of CPU)
  coreg    one Co-Reg epoch on --data demo (CPU: the tiny random CLIP on --data synthetic), features cached
Each row records its sizes and the step's peak GPU memory. Exit code 0 when no test and no step failed (tests
skipped with --skip-tests do not count), else 1.
"""

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as the scripts do

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the top-level scripts, from any folder

import cap  # noqa: E402
import common  # noqa: E402
import coreg  # noqa: E402
from bench.bench_detect import make_world  # noqa: E402  (its synthetic worlds)

TESTS_TIMEOUT = {"gpu": 200, "cpu": 45}  # seconds; the GPU figure leaves ~100 s of the 5 minutes to the timings


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    p.add_argument("--small", action="store_true", help="the CPU sizes even on a GPU (always on a CPU)")
    p.add_argument("--skip-tests", action="store_true", help="skip tests/test_cuda.py, time only")
    p.add_argument("--out", default="gpu_check.json", help="where the JSON report goes")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# Helpers: clocks, devices, the table


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """-> (seconds, fn()), synchronised on CUDA so the clock sees finished work."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M).group(1).strip()
    except (OSError, AttributeError):
        model = platform.processor() or platform.machine()
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def quietly(fn):
    """fn() with its stdout (the scripts' config and progress lines) dropped, so the table stays readable."""
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        return fn()


def print_table(report):
    print(
        f"\ngpu_check | {report['device_name']} | torch {report['torch']} | CUDA {report['cuda']}"
        f"{'' if report['cuda_available'] else ' build, no GPU'} | "
        f"{'small' if report['small'] else 'full'} sizes | {report['seconds_total']:.0f} s"
    )
    tests = report["tests"]
    if tests["status"] == "not run":
        print("tests  | not run (--skip-tests)")
    else:
        counts = ", ".join(f"{n} {k}" for k, n in tests["counts"].items()) or "no summary line"
        print(f"tests  | {tests['status']}: {counts} ({tests['seconds']:.0f} s) | {tests['command']}")
        for name, mib in tests["peak_gpu_mib"].items():
            print(f"       |   peak GPU memory {name}: {mib:.0f} MiB")
    print(f"{'step':6s} | {'figure':>18s} | {'seconds':>7s} | {'peak GPU MiB':>12s} | {'status':8s} | size")
    for row in report["rows"]:
        figure = f"{row['figure']:,.1f} {row['unit']}" if row["figure"] is not None else "-"
        seconds = f"{row['seconds']:.2f}" if row["seconds"] is not None else "-"
        peak = f"{row['peak_gpu_mib']:,.0f}" if row["peak_gpu_mib"] is not None else "-"
        size = ", ".join(f"{k} {v}" for k, v in row["size"].items())
        print(f"{row['step']:6s} | {figure:>18s} | {seconds:>7s} | {peak:>12s} | {row['status']:8s} | {size}")
        if row.get("note"):
            print(f"{'':6s} |   {row['note']}")


# -----------------------------------------------------------------------------
# Step 1: the CUDA tests


def run_tests(timeout):
    """tests/test_cuda.py in a subprocess (skips itself without CUDA). -> {status, counts, peak_gpu_mib, ...}"""
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-rs", "tests/test_cuda.py"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:  # what it printed so far (bytes, whatever text= says)
        rc, out = None, e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
    seconds = time.perf_counter() - start
    summary = [line for line in out.splitlines() if re.search(r"\b\d+ (passed|failed|skipped|errors?)\b", line)]
    counts = (
        {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", summary[-1])}
        if summary
        else {}
    )
    peaks = {name: float(mib) for name, mib in re.findall(r"peak GPU memory (.+): (\d+) MiB", out)}
    if rc is None:
        status = f"timed out after {timeout} s"
    elif rc == 0:
        status = "passed" if counts.get("passed") else "skipped"  # rc 0: nothing failed
    else:
        status = f"failed (exit code {rc})"
    return {
        "status": status,
        "exit_code": rc,
        "counts": counts,
        "seconds": seconds,
        "command": " ".join(cmd[1:]),
        "peak_gpu_mib": peaks,
        "output_tail": out.splitlines()[-40:],
    }


# -----------------------------------------------------------------------------
# Step 2: the timings, one function each (device, small) -> {figure, unit, seconds, note, ...}

SIZES = {  # step: (GPU sizes, CPU / --small sizes); each row records its own
    "encode": (
        {"model": "ViT-B-32", "px": 224, "batch": 256, "timed batches": 20, "warm-up batches": 3},
        {"model": "ViT-B-32", "px": 224, "batch": 8, "timed batches": 2, "warm-up batches": 1},
    ),
    "kmeans": ({"N": 1_281_167, "D": 512, "K": 1_000}, {"N": 20_000, "D": 512, "K": 100}),  # GPU: ImageNet's N
    "detect": ({"classes": 1_000, "per class": 100, "D": 512}, {"classes": 50, "per class": 100, "D": 512}),
    "cap": (  # batch: each stream's (cap.py's --batch-size), so D_PL, weak and strong views hold 3x batch images
        {"model": "ViT-B-32", "px": 224, "classes": 16, "batch": 32, "timed iterations": 5, "warm-up iterations": 1},
        {"model": "ViT-B-32", "px": 224, "classes": 4, "batch": 4, "timed iterations": 1, "warm-up iterations": 1},
    ),
    "coreg": (  # CPU: the demo takes ~20 s a run on 2 cores, and the step runs twice
        {"data": "demo", "epochs": 1, "warm-up": 0},
        {"data": "synthetic", "clip": "tiny", "arch": "narrow", "epochs": 1, "warm-up": 0},
    ),
}


@torch.no_grad()
def time_encode(device, small):
    """ViT-B-32 (random weights) image encoding at 224 px under common.autocast: images/s, images already on the
    device (no decoding, no transfer)."""
    size = SIZES["encode"][small]
    model, _, _ = common.load_clip(size["model"], "none", device)
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(size["batch"], 3, size["px"], size["px"], generator=g, device=device)  # [B, 3, 224, 224]
    with common.autocast(device):
        for _ in range(size["warm-up batches"]):
            model.encode_image(images)  # [B, 512]
        seconds, _ = timed(lambda: [model.encode_image(images) for _ in range(size["timed batches"])], device)
    n = size["batch"] * size["timed batches"]
    return {"figure": n / seconds, "unit": "images/s", "seconds": seconds, "note": f"{n} images in {seconds:.2f} s"}


def clip_like(n, d, k, device, seed=0, block=100_000):
    """n unit vectors around k random directions (cos ~0.55 to their centre, like CLIP features), made on the
    device in blocks of rows so the peak memory is the data's. -> [N, D]"""
    g = torch.Generator(device=device).manual_seed(seed)
    centres = F.normalize(torch.randn(k, d, generator=g, device=device), dim=1)  # [K, D]
    x = torch.empty(n, d, device=device)  # [N, D]
    for s in range(0, n, block):
        y = torch.randint(k, (min(block, n - s),), generator=g, device=device)  # [B]
        noise = torch.randn(len(y), d, generator=g, device=device)  # [B, D]
        x[s : s + len(y)] = F.normalize(centres[y] + 1.5 / d**0.5 * noise, dim=1)
    return x


def time_kmeans(device, small):
    """common.kmeans (spherical, n_init 1, the default n_iter and tol) on CLIP-like data: seconds."""
    size = SIZES["kmeans"][small]
    n, d, k = size["N"], size["D"], size["K"]
    x = clip_like(n, d, k, device)  # [N, D]
    seconds, (_, _, history) = timed(lambda: common.kmeans(x, k, seed=0, spherical=True, n_init=1), device)
    iters = len(history) - 1  # Lloyd updates run before a stopping rule (n_iter, no change, tol) fired
    return {
        "figure": seconds,
        "unit": "s",
        "seconds": seconds,
        "iterations": iters,
        "inertia": history[-1],
        "note": f"{iters} iterations, {seconds / max(iters, 1):.3f} s each incl. seeding, inertia {history[-1]:.1f}",
    }


def time_detect(device, small):
    """CAP §3.1 mismatch detection, the fast loop (warm-started K-Means, n_init 1), t = ceil(C / 10): seconds."""
    size = SIZES["detect"][small]
    C, per, d = size["classes"], size["per class"], size["D"]
    t = math.ceil(C / 10)  # the paper's t
    feats, text, planted = make_world(C, per, d, seed=0)
    feats, text = feats.to(device), text.to(device)  # [N, D], [C, D]
    zs_pred = (feats @ text.T).argmax(1)  # [N]
    seconds, (y_mm, _) = timed(lambda: cap.detect_mismatch(feats, text, zs_pred, t, n_init=1, fast=True), device)
    found = len(set(planted) & set(y_mm))
    return {
        "figure": seconds,
        "unit": "s",
        "seconds": seconds,
        "t": t,
        "planted": planted,
        "y_mm": sorted(y_mm),
        "note": f"t {t}: Y_MM holds {len(y_mm)} classes, {found} of the {len(planted)} planted",
    }


def time_cap_iteration(device, small):
    """One CAP training iteration (cap.train_step) on ViT-B-32 (random weights) with MaPLe prompts and adapters,
    SIZES["cap"]: seconds, the mean of the timed iterations after the warm-up. The prompts, adapters, SGD, schedule
    and GradScaler are built as cap.main builds them from cap.py's defaults, and train_step runs under
    common.autocast as in a run. A UL batch: `batch` D_PL images and `batch` unlabeled images in two views, no
    labeled stream (empty, as main passes it), already on the device (no decoding, no transfer); epoch 0's margin
    M = 0. The peak GPU memory is that of the timed iterations (reset after the warm-up)."""
    size = SIZES["cap"][small]
    C, B, px = size["classes"], size["batch"], size["px"]
    args = cap.parse_args([])  # the release's prompt depth, τ, lr, weight decay and schedule
    model, _, tokenizer = common.load_clip(size["model"], "none", device)
    model = model.requires_grad_(False)
    scale = model.logit_scale.exp().item()
    with torch.random.fork_rng(devices=[]):  # the prompts' and adapters' init, the same every run
        torch.manual_seed(0)
        learner, tokens = cap.build_maple(model.cpu(), tokenizer, [f"class {c}" for c in range(C)], args.prompt_depth)
        adapters = cap.build_adapters(model.text_projection.shape[1]).to(device)
    model, learner, tokens = model.to(device), learner.to(device), tokens.to(device)
    opt = torch.optim.SGD([*learner.parameters(), *adapters.parameters()], args.lr, momentum=0.9, weight_decay=args.wd)
    total = args.epochs * args.iters
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: common.cosine(s, total, warmup=args.iters))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported())
    tuner = cap.PromptTuner(model, learner, tokens, adapters, opt, sched, scaler, scale)
    g = torch.Generator(device=device).manual_seed(0)
    x_m, x_w, x_s = (torch.randn(B, 3, px, px, generator=g, device=device) for _ in range(3))  # [B, 3, px, px] each
    y_m = torch.randint(C, (B,), generator=g, device=device)  # [B] D_PL pseudolabels
    batch = ((x_m, y_m), (x_w, x_s), (x_m[:0], y_m[:0]))  # UL: no labeled images
    M = torch.zeros(C, C, device=device)
    weights = (float(args.main), float(args.pseudo))  # (w_PL, w_UL) = (1, 1): no ablation
    step = functools.partial(
        cap.train_step, tuner, tau=args.tau, ul_classes=torch.arange(C, device=device), weights=weights
    )

    def iterate(n):
        return [step(batch, M)[0] for _ in range(n)]  # the loss parts (floats: .item() syncs each iteration)

    iterate(size["warm-up iterations"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    n = size["timed iterations"]
    seconds, losses = timed(lambda: iterate(n), device)
    loss = sum(losses[-1])
    if not math.isfinite(loss):
        raise FloatingPointError(f"the CAP loss is {loss} after {n} timed iterations")
    peak = f", peak {torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MiB" if device.type == "cuda" else ""
    return {
        "figure": seconds / n,
        "unit": "s",
        "seconds": seconds / n,
        "seconds_timed": seconds,
        "loss": loss,
        "note": f"{n} timed iteration{'s' * (n > 1)} of {3 * B} images and {C} class prompts (depth "
        f"{args.prompt_depth}), {1000 * seconds / n:.0f} ms each, {3 * B * n / seconds:.1f} images/s{peak}; "
        f"loss {loss:.3f}",
    }


def time_coreg_epoch(device, small):
    """One Co-Reg epoch (no warm-up) through coreg.main: a first run fills the feature cache, the second is timed
    (data, annotation, the epoch, evaluation)."""
    size = SIZES["coreg"][small]
    flags = ["--data", size["data"]]
    if "clip" in size:
        flags += ["--clip-model", size["clip"], "--pretrained", "none", "--arch", size["arch"]]
    with tempfile.TemporaryDirectory() as tmp:
        argv = [*flags, "--epochs", str(size["epochs"]), "--warm-up", str(size["warm-up"]), "--device", str(device)]
        argv += ["--quiet", "--cache-dir", tmp, "--out-dir", tmp]
        cold, _ = timed(lambda: quietly(lambda: coreg.main(argv)), device)
        seconds, metrics = timed(lambda: quietly(lambda: coreg.main(argv)), device)
    return {
        "figure": seconds,
        "unit": "s",
        "seconds": seconds,
        "seconds_first_run": cold,
        "test_acc": metrics["test_acc"],
        "note": f"features cached; the first run (encoding too) took {cold:.1f} s",
    }


STEPS = {
    "encode": time_encode,
    "kmeans": time_kmeans,
    "detect": time_detect,
    "cap": time_cap_iteration,
    "coreg": time_coreg_epoch,
}


def measure(name, step, device, small):
    """One timing step and its peak GPU memory; an error -> 'failed', with its message."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    row = {"step": name, "status": "ok", "size": SIZES[name][small], "figure": None, "unit": None, "seconds": None}
    try:
        row |= step(device, small)
    except Exception as e:  # a broken step is reported in its row; the others still run
        traceback.print_exc()
        row |= {"status": "failed", "note": f"{type(e).__name__}: {e}"}
    row["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return row


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"gpu_check: --device {args.device}, but CUDA is not available here; use --device cpu")
    small = args.small or device.type != "cuda"
    not_run = {"status": "not run", "counts": {}, "seconds": 0.0, "peak_gpu_mib": {}}
    tests = not_run if args.skip_tests else run_tests(TESTS_TIMEOUT["gpu" if torch.cuda.is_available() else "cpu"])
    rows = [measure(name, step, device, small) for name, step in STEPS.items()]
    report = {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "small": small,
        "tests": tests,
        "rows": rows,
        "seconds_total": time.perf_counter() - start,
    }
    print_table(report)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"written {args.out}")
    failed = tests["status"] not in ("passed", "skipped", "not run") or any(r["status"] == "failed" for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
