"""Shared pieces of zeroshot.py, cap.py and coreg.py, in the order a reader needs them: errors and the shared flags,
prompt templates, device and seeds, CLIP, image features and their cache, the hand-written K-Means, metrics, the
run and its results.json, and the one LLM request (with CAP's class descriptions).

This file imports no module of this project (data.py and demo.py build on it), only torch, torchvision, open_clip,
numpy and requests; `common.kmeans` and its helpers need torch alone."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle OpenMP threads sleep (docs/usage.md)

import argparse  # noqa: E402
import hashlib
import json
import logging
import math
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import numpy as np
import open_clip
import requests
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader
from tqdm import tqdm

CACHE_VERSION = 2  # bump when the feature-cache format or preprocessing changes


# -----------------------------------------------------------------------------
# Errors and the shared flags


class UserError(Exception):
    """A problem the user can fix (missing data or weights, a bad flag or path): run_cli prints one line, exit 2."""


def run_cli(main):
    """Entry point wrapper: UserError -> one line on stderr, exit 2; Ctrl-C -> 'interrupted', exit 130."""
    try:
        main()
    except UserError as e:
        msg = str(e).strip().splitlines()[-1]  # a DataLoader worker wraps the message in its traceback
        print(f"error: {msg.split('UserError: ', 1)[-1]}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # caches and results are written to a temp name first: nothing is half-written
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def _number_type(kind, low, strict=False, high=math.inf):
    """-> an argparse type: text -> `kind`, finite, >= low (> low if strict) and <= high, else a one-line usage
    error."""
    what, op = ("an integer" if kind is int else "a finite number"), (">" if strict else ">=")

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a{'n integer' if kind is int else ' number'}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {what} {op} {low}, got {text}")
        if value > high:
            raise argparse.ArgumentTypeError(f"must be {what} <= {high}, got {text}")
        return value

    return parse


positive_int = _number_type(int, 1)  # counts and sizes
nonneg_int = _number_type(int, 0)
positive_float = _number_type(float, 0.0, strict=True)  # learning rates, temperatures: nan, inf, 0 and -1 refused
nonneg_float = _number_type(float, 0.0)
seed_int = _number_type(int, 0, high=2**32 - 1)  # numpy's seeds: 0 to 2**32 - 1


def add_common_args(p, datasets):
    """The flags every script shares, with the same names and meanings; `datasets`: the --data choices."""
    # data
    p.add_argument("--data", default="dtd", choices=sorted(datasets), help="dataset name")
    p.add_argument("--data-dir", default="data", help="root folder holding the datasets")
    p.add_argument("--download", action="store_true", help="let torchvision download missing datasets")
    # CLIP
    p.add_argument("--clip-model", default="ViT-B-32", help="open_clip model (--data demo: tiny-demo)")
    p.add_argument(
        "--pretrained",
        default="openai",
        help="open_clip tag, a local weights file, 'none' (random init) or 'demo' (the demo CLIP)",
    )
    # system
    p.add_argument("--seed", type=seed_int, default=1, help="optimisation seed (the papers report seeds 1-3)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--workers", type=nonneg_int, default=0, help="DataLoader worker processes")
    p.add_argument("--cache-dir", default="cache", help="feature, weight and LLM response cache")
    p.add_argument("--no-cache", action="store_true", help="recompute features instead of reading the cache")
    p.add_argument("--out-dir", default=None, help="where results.json goes (default runs/<script>-<data>-...)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def add_ablation_switches(p, components):
    """One --NAME / --no-NAME flag per {NAME: what it is}, on by default: the ablations switch one component off."""
    for name, what in components.items():
        p.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=True, help=what)


def parse_args(p, argv, *dataset_defaults):
    """Parse argv with per-dataset defaults: tables {data: {dest: value}}, later tables win; typed flags win over
    all of them."""
    data_name = p.parse_known_args(argv)[0].data  # the defaults depend on --data
    for table in dataset_defaults:
        p.set_defaults(**table.get(data_name, {}))
    return p.parse_args(argv)


def release_settings(args, behaviours):
    """--as-released (all) or --release a,b (some) -> one bool per behaviour (--release no-low-t -> .no_low_t)."""
    chosen = set(behaviours) if getattr(args, "as_released", False) else set(filter(None, args.release.split(",")))
    if unknown := chosen - set(behaviours):
        raise UserError(f"--release: unknown behaviour(s) {sorted(unknown)}; choose from {', '.join(behaviours)}")
    return SimpleNamespace(**{b.replace("-", "_"): b in chosen for b in behaviours})


def cosine(t, total, warmup=0, floor=0.0):
    """Learning-rate multiplier: linear warm-up over `warmup` steps, then a cosine from 1 to `floor` at `total`."""
    if t < warmup:
        return (t + 1) / warmup
    return floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * min(t - warmup, total - warmup) / max(1, total - warmup)))


# -----------------------------------------------------------------------------
# Prompt templates

TEMPLATES_SINGLE = ["a photo of a {}."]  # the one prompt of FPL and CAP
# "imagenet_templates_small", exactly as Co-Reg's release annotates with them (utils/utils_experi.py): no full stop
TEMPLATES_SMALL = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
]
PROMPT_SET_NAMES = {"single": "1 template", "small": "27-template ensemble", "imagenet": "80-template ensemble"}


def get_templates(name):
    """'single' | 'small' (27) | 'imagenet' (the 80 OpenAI ImageNet templates shipped by open_clip)."""
    if name == "imagenet":
        return [t("{}") for t in open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES]
    return {"single": TEMPLATES_SINGLE, "small": TEMPLATES_SMALL}[name]


# -----------------------------------------------------------------------------
# Device and seeds


def get_device(name=None):
    """--device, default cuda when available; asking for a device this machine lacks is a one-line error."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"--device {name}: not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: Apple's MPS is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: not supported; use cpu, cuda or cuda:N")
    return device


def set_seed(seed):
    """Seed Python's, numpy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def autocast(device):
    """Mixed precision on CUDA only: bf16 if supported, else fp16 (cap.py adds a GradScaler); CPU: nullcontext."""
    if torch.device(device).type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


def progress(iterable, desc, quiet=False, every=30.0):
    """A tqdm bar on a terminal; otherwise (a log file, CI) one plain line every `every` seconds; nothing if quiet."""
    if quiet:
        return iterable
    return tqdm(iterable, desc=desc, leave=False) if sys.stdout.isatty() else _every(iterable, desc, every)


def _every(iterable, desc, every):
    total = len(iterable) if hasattr(iterable, "__len__") else "?"
    start = last = time.time()
    for i, item in enumerate(iterable):
        yield item
        if time.time() - last >= every:
            last = time.time()
            print(f"{desc}: {i + 1}/{total} ({last - start:.0f}s)", flush=True)


# -----------------------------------------------------------------------------
# CLIP


def _hub_reachable(host="huggingface.co", timeout=3.0):
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _is_torchscript(path):
    """OpenAI's released CLIP files (e.g. ViT-B-32.pt) are TorchScript archives: a zip with a code/ folder."""
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n or n.endswith("/constants.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def clip_architecture(model_name, tag):
    """(open_clip model name, quick_gelu) that the weights were trained with. OpenAI's CLIPs use QuickGELU and open_clip
    only warns when a plain name gets such weights (then every activation and pseudolabel shifts), so the tag's config
    decides; a local TorchScript file is OpenAI's release; any other file keeps the name's own activation."""
    if tag is None or os.path.isfile(tag):
        return model_name, (tag is not None and _is_torchscript(tag)) or None
    base = model_name.removesuffix("-quickgelu")
    for name in (model_name, base):
        if cfg := open_clip.get_pretrained_cfg(name, tag):
            quick = bool(cfg.get("quick_gelu", False))
            return (name if quick or name == base else base), quick  # a -quickgelu name with a GELU tag: GELU
    return model_name, None


def load_clip(model_name="ViT-B-32", pretrained="openai", device="cpu"):
    """-> (model in eval mode, preprocess, tokenizer); `pretrained`: open_clip tag, local file or 'none' (random)."""
    if model_name not in open_clip.list_models():
        raise UserError(f"unknown CLIP model '{model_name}'; see open_clip.list_models()")
    tag = None if pretrained in (None, "", "none") else str(pretrained)
    local = tag is not None and os.path.isfile(tag)
    if (
        tag
        and not local
        and not open_clip.get_pretrained_cfg(model_name.removesuffix("-quickgelu"), tag)
        and tag not in open_clip.list_pretrained_tags_by_model(model_name)
    ):
        if os.path.sep in tag or tag.endswith((".pt", ".pth", ".bin", ".safetensors")):
            raise UserError(f"weights file {tag} not found; check --pretrained <file>")
        raise UserError(
            f"'{tag}' is not a pretrained tag of {model_name} "
            f"({open_clip.list_pretrained_tags_by_model(model_name)}) nor a file; use --pretrained <file>"
        )
    root, level = logging.getLogger(), logging.getLogger().level
    if tag and not local and not _hub_reachable():  # the local Hugging Face cache only, not a minute of retries
        huggingface_hub.constants.HF_HUB_OFFLINE = True
        logging.getLogger("huggingface_hub").setLevel(logging.CRITICAL)
        root.setLevel(logging.CRITICAL)  # open_clip logs its own copy of the error
    if tag is None:  # open_clip's "No pretrained weights loaded ... initialized randomly" is our intent here
        root.setLevel(max(level, logging.ERROR))
    name, quick = clip_architecture(model_name, tag)
    try:
        with torch.random.fork_rng(devices=[]):  # leaves the caller's global RNG state as it was
            torch.manual_seed(0)  # 'none' = random init, the same for every run (feature caches stay valid)
            model, _, preprocess = open_clip.create_model_and_transforms(
                name,
                pretrained=tag,
                device=device,
                force_quick_gelu=bool(quick),
                weights_only=not (local and _is_torchscript(tag)),
            )  # TorchScript: jit.load
    except Exception as e:
        if local:  # e.g. random bytes: torch's own advice (weights_only=False) is wrong here
            raise UserError(
                f"cannot load weights file {tag} for {name} ({type(e).__name__}): truncated, not an "
                f"open_clip/OpenAI checkpoint, or the weights of another model than {name}"
            ) from None
        if isinstance(e, RuntimeError) and ("download" in str(e).lower() or "connect" in str(e).lower()):
            raise UserError(
                f"could not download CLIP weights '{tag}' for {name} (offline?); pass --pretrained <local weights file>"
            ) from None
        raise
    finally:
        root.setLevel(level)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


@torch.no_grad()
def zero_shot_weights(model, tokenizer, classnames, templates, device="cpu"):
    """Template-averaged text classifier (CLIP's prompt ensembling). -> [C, D], L2-normalised float32."""
    weights = []
    for name in classnames:
        tokens = tokenizer([t.format(name) for t in templates]).to(device)  # [T, L]
        with autocast(device):
            emb = F.normalize(model.encode_text(tokens).float(), dim=-1)  # [T, D]
        weights.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(weights)  # [C, D]


# -----------------------------------------------------------------------------
# Image features and their cache


def file_key(path, block=1 << 20):
    """Content key of a weights file (size, first and last MiB): a copy keeps it, an edit changes it, and it is fast."""
    size, h = os.path.getsize(path), hashlib.sha1()
    with open(path, "rb") as f:
        h.update(f.read(block))
        f.seek(max(0, size - block))
        h.update(f.read(block))
    return f"{Path(path).stem}-{h.hexdigest()[:10]}-{size}"


def cache_path(cache_dir, data_key, split, model_name, pretrained):
    """Feature-cache file keyed by dataset, split, model, weights (by content when a file) and format version."""
    p = file_key(pretrained) if os.path.isfile(str(pretrained)) else str(pretrained)
    return Path(cache_dir) / f"{data_key}_{split}_{model_name}_{p}_eval_v{CACHE_VERSION}.pt".replace("/", "-")


def save_atomic(obj, path):
    """torch.save `obj` (a str: write it as text) to a temp file in path's folder, then rename it to path: never a
    half-written cache or results.json. -> the Path"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        Path(tmp).write_text(obj, encoding="utf-8") if isinstance(obj, str) else torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_cached(path, keys):
    """Load a cache file with weights_only=True; None if there is none (path None or missing), or, with a one-line
    warning, if it is corrupt."""
    if path is None or not Path(path).exists():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or any(k not in obj for k in keys):
            raise ValueError("missing keys")
        return obj
    except Exception as e:
        print(f"warning: cache {Path(path).name} is unreadable ({type(e).__name__}); recomputing", file=sys.stderr)
        return None


@torch.no_grad()
def encode_images(model, dataset, device="cpu", batch_size=256, workers=0, cache_file=None, quiet=False):
    """(image, label, index) items -> (features [N, D] float32 L2-normalised, labels [N]), cached in cache_file."""
    hit = load_cached(cache_file, ("features", "labels"))
    if hit is not None and len(hit["labels"]) == len(dataset):
        print(f"feature cache hit: {Path(cache_file).name}")
        return hit["features"], hit["labels"]
    device = torch.device(device)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),
    )  # its own generator: a cache miss draws nothing global
    feats, labels = [], []
    for images, y, _ in progress(loader, "encode", quiet):
        with autocast(device):
            f = model.encode_image(images.to(device, non_blocking=True))
        feats.append(F.normalize(f.float(), dim=-1).cpu())  # [B, D]
        labels.append(y)
    features, labels = torch.cat(feats), torch.cat(labels)  # [N, D], [N]
    if cache_file is not None:
        save_atomic({"features": features, "labels": labels, "version": CACHE_VERSION}, cache_file)
    return features, labels


# -----------------------------------------------------------------------------
# K-Means (hand-written, on the data's device)


def _assign(x, x_sq, c, chunk):
    """Nearest centroid per row via |x|² − 2x·cᵀ + |c|², in row chunks, and the per-cluster sums and counts
    the next update needs. -> (assign [N], squared distance [N], sums [K, D], counts [K])"""
    K = len(c)
    # MKL's CPU GEMM is ~1.5x slower when K is not a multiple of 8: pad with centres at infinite distance
    pad = -K % 8
    c_sq = F.pad((c * c).sum(1), (0, pad), value=float("inf"))  # [K']
    c = F.pad(c, (0, 0, 0, pad))  # [K', D], K' = K rounded up to a multiple of 8
    assign = torch.empty(len(x), dtype=torch.long, device=x.device)  # [N]
    dist = torch.empty(len(x), dtype=x.dtype, device=x.device)  # [N]
    sums = torch.zeros(K, x.shape[1], dtype=x.dtype, device=x.device)  # [K, D]
    for s in range(0, len(x), chunk):  # memory O(chunk * K)
        xb, a = x[s : s + chunk], assign[s : s + chunk]  # [B, D], [B]
        d = torch.addmm(c_sq, xb, c.T, alpha=-2)  # [B, K'] |c|² − 2x·cᵀ (|x|² can't move the argmin)
        torch.min(d, 1, out=(dist[s : s + chunk], a))
        sums.index_add_(0, a, xb)  # summed while the chunk is still in cache: one pass over x per iteration, not two
    counts = torch.bincount(assign, minlength=K)  # [K]
    return assign, dist.add_(x_sq).clamp_min_(0), sums, counts  # float32 round-off can dip just below 0


def _dists_to(x, x_sq, ids):
    """Squared distance of every row of x to the rows ids. -> [L, N]"""
    d = torch.addmm(x_sq, x[ids], x.T, alpha=-2).add_(x_sq[ids, None]).clamp_min_(0)  # [L, N]
    d[torch.arange(len(ids), device=x.device), ids] = 0  # exactly 0 at the point itself (round-off would not be)
    return d


def _kmeans_pp(x, x_sq, k, g, n_trials=None):
    """Greedy k-means++ (Arthur & Vassilvitskii 2007, as scikit-learn runs it): a uniform first centre, then each next
    one the best (lowest total squared distance) of n_trials = 2 + ⌊ln k⌋ points drawn ∝ squared distance to the
    nearest centre so far; plain k-means++ (n_trials=1) more often puts two centres in one cluster. -> [K, D]"""
    n, L = len(x), n_trials or 2 + int(np.log(k))
    i = torch.randint(n, (1,), generator=g).to(x.device)  # [1]
    draws = torch.rand(k - 1, L, generator=g, dtype=x.dtype).to(x.device)  # [K-1, L], one copy to the device
    idx, d2 = [i], _dists_to(x, x_sq, i)[0]  # d2 [N]: squared distance to the nearest centre so far
    for step in range(k - 1):
        cdf = d2.cumsum(0)  # [N] (on CPU torch accumulates float32 cumsums in float64)
        u = draws[step] * cdf[-1]  # [L]
        cand = torch.searchsorted(cdf, u, right=True).clamp_max_(n - 1)  # [L] first j with cdf[j] > u
        d_cand = torch.minimum(_dists_to(x, x_sq, cand), d2)  # [L, N] d2 with each candidate added
        best = d_cand.sum(1).argmin()  # if every d2 is 0 (k > distinct points) any pick is as good
        idx.append(cand[best, None])
        d2 = d_cand[best]
    return x[torch.cat(idx)]  # [K, D] (advanced indexing copies)


def _update_centroids(x, sums, counts, dist, c, spherical):
    """Cluster means from _assign's sums and counts; empty clusters re-seeded at the points farthest from a centre."""
    new = sums / counts.clamp_min(1).to(x.dtype)[:, None]  # [K, D]
    empty = (counts == 0).nonzero().flatten()  # [E], E <= K <= N
    if len(empty):  # explicit re-seed, never NaN and never the origin
        new[empty] = x[dist.topk(len(empty)).indices]
    if spherical:
        norm = new.norm(dim=1, keepdim=True)  # [K, 1]
        new = torch.where(norm > 1e-12, new / norm.clamp_min(1e-12), c)  # antipodal mean: keep old centre
    return new


def kmeans(x, k, n_iter=25, tol=1e-4, seed=0, spherical=False, n_init=1, init=None, chunk=None, seed_rows=None):
    """Lloyd's K-Means with greedy k-means++ seeding, in torch on x's device. x [N, D]; stops after n_iter updates, when
    no assignment changes, or when the relative inertia drop is <= tol. spherical: unit centroids (cosine K-Means).
    init [k, D]: warm start (one run). seed_rows: seed on this many random rows (default 16k), then iterate on all.
    chunk: rows per distance block. -> (centroids [k, D], assign [N], inertia_history), best of n_init seedings."""
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kmeans: k={k} clusters needs 1 <= k <= number of points ({n})")
    x = x.float()
    x_sq = torch.linalg.vector_norm(x, dim=1) ** 2  # [N], without an [N, D] temporary
    chunk = chunk or max(64, min(2**20 // x.shape[1], 2**22 // k))  # x block ≤ 4 MB, distance block ≤ 16 MB
    m = min(n, seed_rows or 16 * k)
    g = torch.Generator().manual_seed(seed)  # draws on the CPU: the same seeds on a GPU as on the CPU
    best = None
    for _ in range(n_init if init is None else 1):
        if init is None:  # k-means++ on m random rows
            rows = torch.randperm(n, generator=g)[:m].to(x.device) if m < n else slice(None)  # [M]
        c = init.float() if init is not None else _kmeans_pp(x[rows], x_sq[rows], k, g)  # [K, D]
        if spherical:
            c = F.normalize(c, dim=1)
        assign, dist, sums, counts = _assign(x, x_sq, c, chunk)  # [N], [N], [K, D], [K]
        history = [dist.sum().item()]
        for _ in range(n_iter):
            c = _update_centroids(x, sums, counts, dist, c, spherical)
            prev, (assign, dist, sums, counts) = assign, _assign(x, x_sq, c, chunk)
            history.append(dist.sum().item())
            if torch.equal(assign, prev) or history[-2] - history[-1] <= tol * history[-2]:
                break
        if best is None or history[-1] < best[2][-1]:
            best = (c, assign, history)
    return best


# -----------------------------------------------------------------------------
# Metrics, the run's prologue and epilogue, and results.json


def accuracy(pred, labels):
    """Fraction of pred equal to labels (NaN when there are none)."""
    return (pred == labels).float().mean().item() if len(labels) else float("nan")


def per_class_accuracy(pred, labels, num_classes):
    """-> [C] accuracy per class (NaN for classes absent from `labels`)."""
    hit = torch.zeros(num_classes).index_add_(0, labels, (pred == labels).float())
    return hit / torch.bincount(labels, minlength=num_classes).float()


def check_folder(folder, flag):
    """Fail at start-up, in one line, if `folder` cannot hold our files: never after the work is done."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} is a file, not a folder")
    here = next(p for p in (folder, *folder.absolute().parents) if p.exists())  # created only when written to
    try:
        if not here.is_dir():
            raise NotADirectoryError(20, f"{here} is a file")
        fd, probe = tempfile.mkstemp(dir=here, suffix=".tmp")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{flag} {folder} is not writable ({e.strerror or type(e).__name__})") from None


def start_run(args, out_default):
    """main()'s prologue: config as one JSON line, folders checked, device, seed. -> (config, start, device, out_dir)"""
    config = vars(args).copy()
    print(json.dumps(config))
    out_dir = Path(args.out_dir or out_default)
    check_folder(out_dir, "--out-dir")
    check_folder(args.cache_dir, "--cache-dir")
    device = get_device(args.device)
    set_seed(args.seed)
    return SimpleNamespace(config=config, start=time.time(), device=device, out_dir=out_dir)


PAPER_RESULTS = Path(__file__).resolve().parent / "docs" / "paper_results.json"  # every published cell, sourced


def check_zeroshot(measured, args, prompt_set, setting="ul", tol=1.5):
    """Print zero-shot accuracy (a fraction; TRZSL: the harmonic mean) beside the published one (OpenAI weights, 1
    template), warn if they differ by > `tol` points. -> {measured, published, source, differs} for results.json"""
    cell = None
    if args.pretrained == "openai" and prompt_set == "1 template" and PAPER_RESULTS.exists():
        zs = json.loads(PAPER_RESULTS.read_text(encoding="utf-8")).get("zeroshot", {})
        cell = zs.get(setting, {}).get(args.data, {}).get(args.clip_model.removesuffix("-quickgelu"))
    out = {
        "measured": round(100 * measured, 2),
        "published": cell and cell.get("value"),
        "source": cell and cell.get("source"),
        "differs": False,
    }
    if out["published"] is None:
        print(
            f"zero-shot {out['measured']:.2f} ({prompt_set}); no published row for {args.data} / "
            f"{args.clip_model} / {args.pretrained} / {setting}"
        )
        return out
    out["differs"] = abs(out["measured"] - out["published"]) > tol
    print(f"zero-shot {out['measured']:.2f} ({prompt_set}) | published {out['published']:.2f} ({out['source']})")
    if out["differs"]:
        print(
            f"warning: zero-shot differs from the published {out['published']:.2f} by "
            f"{out['measured'] - out['published']:+.2f} points (> {tol}); usual causes: activation (QuickGELU for "
            f"OpenAI weights), split or data layout, prompt templates, preprocessing, library versions "
            f"(docs/usage.md)",
            file=sys.stderr,
        )
    return out


def check_finite(value, what):
    """Stop a diverging run with one line instead of training on NaNs. value: a float (e.g. an epoch's loss)."""
    if not math.isfinite(value):
        raise UserError(f"{what} is {value}: the run diverged; lower --lr")


def versions():
    """Python, torch, torchvision, open_clip and CUDA versions, threads and the git commit, for results.json."""
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or None
        )
    except Exception:
        commit = None
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "open_clip": open_clip.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
        "git_commit": commit,
    }


def strict_json(obj):
    """Tensors and numpy numbers -> Python values, NaN and ±inf -> None: results.json is strict JSON."""
    if isinstance(obj, dict):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, (torch.Tensor, np.generic, np.ndarray)):
        return strict_json(obj.tolist())
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def finish_run(run, metrics, summary, extra=None):
    """main()'s epilogue: results.json {config, metrics, elapsed_s, versions, **extra} (an old one kept), summary."""
    res = {
        "config": run.config,
        "metrics": metrics,
        "elapsed_s": round(time.time() - run.start, 2),
        "versions": versions(),
        **(extra or {}),
    }
    path = run.out_dir / "results.json"
    if path.exists():
        kept = path.with_name(time.strftime("results-%Y%m%d-%H%M%S.json", time.localtime(path.stat().st_mtime)))
        os.replace(path, kept)
        print(f"note: {path} existed; the earlier run's results were moved to {kept.name}")
    save_atomic(json.dumps(strict_json(res), indent=2, allow_nan=False), path)
    print(f"{summary} | {time.time() - run.start:.0f}s | {path}")
    return metrics


# -----------------------------------------------------------------------------
# LLM: one chat-completions request with `requests`, retried, cached on disk


class LLMError(Exception):
    """The LLM server gave no usable answer (unreachable, refused, malformed); callers may fall back."""


def _chat_once(endpoint, body, timeout, max_bytes):
    """One POST -> (its non-empty message contents, one per choice; None), or (None, why) when a retry may help
    (network, 429, 5xx); anything else raises LLMError. No error carries the request or the key (`from None`; an
    echoed key is blanked)."""
    key = os.environ.get("OPENAI_API_KEY")
    try:
        with requests.post(
            endpoint, json=body, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=timeout, stream=True
        ) as r:
            raw, deadline = b"", time.monotonic() + timeout
            for chunk in r.iter_content(1 << 16):  # streamed: a huge or endless reply is cut off
                raw += chunk
                if len(raw) > max_bytes:
                    raise LLMError(f"reply from {endpoint} is over {max_bytes} bytes; stopped reading")
                if time.monotonic() > deadline:  # `timeout` bounds each read; this bounds the whole body
                    return None, f"timed out after {timeout:g}s"
    except (requests.Timeout, requests.ConnectionError) as e:  # a stall mid-body is a ConnectionError
        if isinstance(e, requests.Timeout) or "timed out" in str(e).lower():
            return None, f"timed out after {timeout:g}s"
        return None, "cannot connect (is the server running at this URL?)"
    except requests.RequestException as e:
        raise LLMError(f"request to {endpoint} failed ({type(e).__name__})") from None
    text, status = raw.decode("utf-8", "replace"), r.status_code
    text = text.replace(key, "***") if key else text  # should a server echo it
    snippet = repr(" ".join(text.split())[:160])
    if status == 429 or status >= 500:
        return None, f"HTTP {status}"
    if status in (401, 403):
        raise LLMError(f"HTTP {status} from {endpoint}: not authorised, check OPENAI_API_KEY")
    if "html" in r.headers.get("Content-Type", "").lower() or text.lstrip().startswith("<"):
        raise LLMError(f"{endpoint} sent an HTML page (HTTP {status}), not JSON: is it an OpenAI-compatible server?")
    if status != 200:
        raise LLMError(f"HTTP {status} from {endpoint}: {snippet}")
    try:
        reply = json.loads(text)
    except ValueError:
        raise LLMError(f"{endpoint} returned malformed JSON: {snippet}") from None
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if not isinstance(choices, list) or not choices:
        raise LLMError(f"{endpoint} reply has no 'choices': {snippet}")
    contents = [
        c["message"].get("content") for c in choices if isinstance(c, dict) and isinstance(c.get("message"), dict)
    ]
    contents = [c.strip() for c in contents if isinstance(c, str) and c.strip()]
    if not contents:
        raise LLMError(f"{endpoint} returned {len(choices)} choice(s), all with empty content")
    return contents, None


def llm_complete(
    prompt,
    *,
    url,
    model,
    n=1,
    temperature=0.7,
    timeout=30.0,
    retries=3,
    cache_dir=None,
    max_bytes=1_000_000,
    backoff=0.5,
):
    """POST one user message to an OpenAI-compatible {url}/v1/chat/completions -> list of reply texts (servers that
    ignore n > 1 send fewer). `retries` attempts in all, network errors, 429 and 5xx retried after backoff·2^i s
    (≤ 8 s); the key comes from $OPENAI_API_KEY; with cache_dir, replies are kept in cache_dir/llm/<sha256>.json."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "n": n, "temperature": temperature}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    cache_file = None if cache_dir is None else Path(cache_dir) / "llm" / f"{digest}.json"
    if cache_file is not None and cache_file.exists():
        try:
            contents = json.loads(cache_file.read_text(encoding="utf-8"))["contents"]
            if isinstance(contents, list) and contents and all(isinstance(c, str) for c in contents):
                return contents
        except (OSError, ValueError, KeyError, TypeError):
            pass
        print(f"warning: LLM cache {cache_file.name} is unreadable; asking again", file=sys.stderr)
    base = url.rstrip("/")
    endpoint = base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")
    attempts = max(1, retries)
    why = None  # why the last attempt failed
    for i in range(attempts):
        if i:
            wait = min(backoff * 2 ** (i - 1), 8.0)  # 0.5, 1, 2, ... s by default
            print(f"LLM: {why}; retry {i}/{attempts - 1} in {wait:g}s", file=sys.stderr)
            time.sleep(wait)
        contents, why = _chat_once(endpoint, body, timeout, max_bytes)
        if contents:
            break
    else:
        raise LLMError(f"{endpoint}: {why} (after {attempts} attempts)")
    if cache_file is not None:  # temp file + rename: never a half-written cache
        save_atomic(json.dumps({**body, "contents": contents}, indent=1), cache_file)
    return contents


# CAP's class descriptions (§3.1): the request (the paper publishes no prompt; this one is ours) and its parsing

DESCRIBE_PROMPT = (
    'Give {n} short visual descriptions of "{classname}", {article} {domain}. Each is one sentence '
    "about what it looks like in an image. Answer as a numbered list, one per line, nothing else."
)


def parse_descriptions(text):
    """Reply -> descriptions from a JSON array or numbered/bulleted lines (else all lines), deduped ignoring case."""
    body = re.sub(r"^```\w*|```$", "", text.strip()).strip()  # a markdown code fence around the answer
    try:
        items = json.loads(body)
        items = [str(s) for s in items] if isinstance(items, list) else [body]
    except ValueError:
        lines = [line.strip() for line in body.splitlines() if line.strip()]
        items = [m.group(1) for line in lines if (m := re.match(r"(?:\d+[.):]|[-*•])\s+(.*)", line))] or lines
    return _dedupe(s.strip().strip("\"'").strip() for s in items)


def _dedupe(items):
    """Drop empties and case-insensitive repeats, keeping the first spelling and the order."""
    out = {}
    for s in filter(None, items):
        out.setdefault(s.lower(), s)
    return list(out.values())


def describe_classes(classnames, domain, n=5, *, url, model, cache_dir=None, choices=1, **kw):
    """{classname: ≤ n descriptions}: one DESCRIBE_PROMPT request per class, choices merged; kw to llm_complete."""
    out, article = {}, "an" if domain[:1].lower() in "aeiou" else "a"
    for name in classnames:
        prompt = DESCRIBE_PROMPT.format(n=n, classname=name, article=article, domain=domain)
        replies = llm_complete(prompt, url=url, model=model, n=choices, cache_dir=cache_dir, **kw)
        out[name] = _dedupe(d for r in replies for d in parse_descriptions(r))[:n]
    return out
