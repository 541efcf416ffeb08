"""Shared pieces for zeroshot.py, cap.py and coreg.py, in the order a reader needs them: prompt templates,
images as a torch Dataset, device/seed helpers, CLIP loading, image features with their on-disk cache, metrics,
the results writer and the one LLM request. Every function is plain torch and can
be copied on its own. The dataset table is data.py; the flags the scripts share are in cli.py (no torch, so
bad flags are answered fast).
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle OpenMP threads sleep (docs/usage.md)

import argparse  # noqa: E402
import hashlib
import json
import random
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import data  # the dataset table
import demo  # the offline demo world; it imports nothing of ours

# -----------------------------------------------------------------------------
# Errors and the shared flags

# On a machine whose cores other jobs also use, torch's OpenMP threads spin-wait for each other at every
# parallel op; measured here under load: the demo CLIP's pre-training 24 s a step with 2 spinning threads,
# 1.8 s with PASSIVE (sleeping) waits. It is read once, when torch loads. An explicit setting wins.

class UserError(Exception):
    """A problem the user can fix (missing data, weights, bad flag): common.run_cli prints it as one line,
    no traceback, exit code 2."""




def _int_at_least(text, low):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value


def positive_int(text):
    """argparse type for counts and sizes: an int ≥ 1, else a one-line usage error at parse time."""
    return _int_at_least(text, 1)


def nonneg_int(text):
    return _int_at_least(text, 0)


def add_common_args(p):
    """The flags every script shares, with the same names and meanings."""
    # data
    p.add_argument("--data", default="dtd", choices=sorted(data.DATASETS), help="dataset name")
    p.add_argument("--data-dir", default="data", help="root folder holding the datasets")
    p.add_argument("--download", action="store_true", help="let torchvision download missing datasets")
    # CLIP
    p.add_argument("--clip-model", default=None, help="open_clip model (default ViT-B-32; tiny-demo for --data demo)")
    p.add_argument("--pretrained", default=None,
                   help="open_clip tag (default openai), a local weights file, or none (random init)")
    # system
    p.add_argument("--seed", type=int, default=1, help="optimisation seed (CAP runs seeds 1-3)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="training batch size (method default if unset)")
    p.add_argument("--workers", type=nonneg_int, default=0, help="DataLoader worker processes")
    p.add_argument("--cache-dir", default="cache", help="feature, weight and LLM response cache")
    p.add_argument("--no-cache", action="store_true", help="recompute features instead of reading the cache")
    p.add_argument("--out-dir", default=None, help="where results.json goes (default runs/<script>-<data>-...)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p

CACHE_VERSION = 1  # bump when the feature-cache format or preprocessing changes


def run_cli(main):
    """Entry point wrapper: UserError -> one line on stderr and exit code 2."""
    try:
        main()
    except UserError as e:
        msg = str(e).strip().splitlines()[-1]  # a DataLoader worker wraps the message in its traceback
        print(f"error: {msg.split('UserError: ', 1)[-1]}", file=sys.stderr)
        sys.exit(2)


# -----------------------------------------------------------------------------
# Prompt templates

TEMPLATES_SINGLE = ["a photo of a {}."]  # the one prompt of FPL and CAP
# "imagenet_templates_small": the 27 templates Co-Reg annotates with (docs/coreg.md)
TEMPLATES_SMALL = [
    "a photo of a {}.", "a rendering of a {}.", "a cropped photo of the {}.", "the photo of a {}.",
    "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.", "a photo of my {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a photo of the {}.", "a good photo of the {}.", "a photo of one {}.",
    "a close-up photo of the {}.", "a rendition of the {}.", "a photo of the clean {}.",
    "a rendition of a {}.", "a photo of a nice {}.", "a good photo of a {}.", "a photo of the nice {}.",
    "a photo of the small {}.", "a photo of the weird {}.", "a photo of the large {}.",
    "a photo of a cool {}.", "a photo of a small {}.",
]


def get_templates(name):
    """'single' | 'small' (27) | 'imagenet' (the 80 OpenAI ImageNet templates shipped by open_clip)."""
    if name == "imagenet":
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
        return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    return {"single": TEMPLATES_SINGLE, "small": TEMPLATES_SMALL}[name]


# -----------------------------------------------------------------------------
# Images as a torch Dataset (the dataset table itself is data.py)

class ImageList(Dataset):
    """Indexable (image, label, index) with a transform; reads paths lazily, names unreadable files."""

    def __init__(self, samples, labels, transform):
        self.samples, self.labels, self.transform = samples, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = self.samples[i]
        if isinstance(img, tuple):  # torchvision datasets return (image, label)
            img = img[0]
        if isinstance(img, str):
            from PIL import Image
            try:
                img = Image.open(img).convert("RGB")
            except Exception as e:  # unreadable image: stop and name it (documented choice)
                raise UserError(f"cannot read image {img}: {e}") from None
        elif hasattr(img, "convert"):
            img = img.convert("RGB")
        return self.transform(img), int(self.labels[i]), i


# -----------------------------------------------------------------------------
# Device and seeds

def get_device(name=None):
    """--device, default cuda when available; asking for CUDA on a machine without it is a one-line error."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"--device {name}: not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    return device


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def autocast(device):
    """Mixed precision on CUDA only, CPU runs in float32 (nanoGPT's `ctx`): bf16 where the GPU supports it,
    else fp16, whose prompt gradients through the frozen layers need a torch.amp.GradScaler (cap.py has one)."""
    if torch.device(device).type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


def progress(iterable, desc, quiet=False, every=30.0):
    """The one progress rule: a tqdm bar on a terminal; otherwise (a log file, CI) one plain line every
    `every` seconds, so long work is never silent and logs hold no carriage-return bars; nothing if quiet."""
    if quiet:
        return iterable
    if sys.stdout.isatty():
        from tqdm import tqdm
        return tqdm(iterable, desc=desc, leave=False)
    return _every(iterable, desc, every)


def _every(iterable, desc, every):
    total, start = (len(iterable) if hasattr(iterable, "__len__") else "?"), time.time()
    last = start
    for i, item in enumerate(iterable):
        yield item
        if time.time() - last >= every:
            last = time.time()
            print(f"{desc}: {i + 1}/{total} ({last - start:.0f}s)", flush=True)


# -----------------------------------------------------------------------------
# CLIP

TINY_CONFIGS = {  # 32-px width-64 models registered in-process (no download)
    "tiny": {"embed_dim": 64,  # 2 layers, 4x4 patches of 8 px, ~3.4 M parameters (mostly the token table): tests
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
             "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}},
    "tiny-demo": demo.CLIP_CONFIG,  # 3 layers, 8x8 patches of 4 px: the demo world's CLIP
}


def register_tiny():
    import open_clip
    for name, cfg in TINY_CONFIGS.items():
        if name not in open_clip.list_models():
            path = Path(tempfile.mkdtemp()) / f"{name}.json"
            path.write_text(json.dumps(cfg))
            open_clip.add_model_config(path)


def _hub_reachable(host="huggingface.co", timeout=3.0):
    import socket
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _go_offline():
    import logging
    import huggingface_hub.constants
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    logging.getLogger("huggingface_hub").setLevel(logging.CRITICAL)
    logging.getLogger().setLevel(logging.CRITICAL)  # open_clip logs its own copy of the error


def _is_torchscript(path):
    """OpenAI's released CLIP files (e.g. ViT-B-32.pt) are TorchScript archives: a zip with a code/ folder."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n or n.endswith("/constants.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def clip_architecture(model_name, tag):
    """(open_clip model name, quick_gelu) that the weights were trained with.

    OpenAI's CLIPs (and a few others) were trained with QuickGELU, x·σ(1.702x), and open_clip only *warns*
    when a plain model name gets such weights: activations, so zero-shot and every pseudolabel, then shift.
    The pretrained tag's config says which activation it needs; a local TorchScript file is OpenAI's release.
    Any other local file keeps the model name's own activation (pass e.g. ViT-B-32-quickgelu if it needs it).
    """
    import open_clip
    if tag is None or os.path.isfile(tag):
        return model_name, (tag is not None and _is_torchscript(tag)) or None
    base = model_name.removesuffix("-quickgelu")
    for name in (model_name, base):
        cfg = open_clip.get_pretrained_cfg(name, tag)
        if cfg:
            quick = bool(cfg.get("quick_gelu", False))
            return (name if quick or name == base else base), quick  # a -quickgelu name with a GELU tag: GELU
    return model_name, None


def load_clip(model_name="ViT-B-32", pretrained="openai", device="cpu"):
    """-> (model in eval mode, preprocess, tokenizer). `pretrained`: open_clip tag, local file, or 'none'.
    The activation follows the weights (QuickGELU for OpenAI's), whatever model name is given."""
    import open_clip
    register_tiny()
    if model_name not in open_clip.list_models():
        raise UserError(f"unknown CLIP model '{model_name}'; choose one of open_clip.list_models(), 'tiny' or 'tiny-demo'")
    tag = None if pretrained in (None, "", "none") else str(pretrained)
    if tag and not os.path.isfile(tag) and not open_clip.get_pretrained_cfg(model_name.removesuffix("-quickgelu"), tag) \
            and tag not in open_clip.list_pretrained_tags_by_model(model_name):
        if os.path.sep in tag or tag.endswith((".pt", ".pth", ".bin", ".safetensors")):
            raise UserError(f"weights file {tag} not found; check --pretrained <file>")
        raise UserError(f"'{tag}' is not a pretrained tag of {model_name} "
                        f"({open_clip.list_pretrained_tags_by_model(model_name)}) nor a file; use --pretrained <file>")
    if tag and not os.path.isfile(tag) and not _hub_reachable():
        _go_offline()  # use the local Hugging Face cache only, instead of a minute of retries
    name, quick = clip_architecture(model_name, tag)
    import logging
    root, level = logging.getLogger(), logging.getLogger().level
    if tag is None:  # open_clip's "No pretrained weights loaded ... initialized randomly" is our intent here
        root.setLevel(max(level, logging.ERROR))
    torch.manual_seed(0)  # 'none' = random init, the same for every run (feature caches stay valid)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=tag, device=device, force_quick_gelu=bool(quick),
            weights_only=not (tag and os.path.isfile(tag) and _is_torchscript(tag)))  # TorchScript: torch.jit.load
    except Exception as e:
        if tag and os.path.isfile(tag):  # e.g. random bytes: torch's own advice (weights_only=False) is wrong here
            raise UserError(f"cannot load weights file {tag} for {name} ({type(e).__name__}): not an open_clip/OpenAI "
                            f"checkpoint or state_dict, or one of another model (check --clip-model)") from None
        if isinstance(e, RuntimeError) and ("download" in str(e).lower() or "connect" in str(e).lower()):
            raise UserError(f"could not download CLIP weights '{tag}' for {name} (offline?); "
                            f"pass --pretrained <local weights file>") from None
        raise
    finally:
        root.setLevel(level)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


@torch.no_grad()
def zero_shot_weights(model, tokenizer, classnames, templates, device="cpu"):
    """Template-averaged text classifier (CLIP's prompt ensembling). -> [C, D], L2-normalised float32."""
    device = torch.device(device)
    weights = []
    for name in classnames:
        tokens = tokenizer([t.format(name) for t in templates]).to(device)  # [T, L]
        with autocast(device):
            emb = F.normalize(model.encode_text(tokens).float(), dim=-1)  # [T, D]
        weights.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(weights)  # [C, D]


def clip_choice(data, clip_model=None, pretrained=None, cache_dir="cache", quiet=False):
    """Resolve --clip-model/--pretrained defaults: ViT-B-32/openai, or the demo world's own tiny CLIP,
    pre-trained once by demo.pretrain and cached as <cache_dir>/demo_clip_v<VERSION>.pt (delete it to redo)."""
    if not (data == "demo" and clip_model in (None, "tiny-demo") and pretrained in (None, "demo")):
        return clip_model or "ViT-B-32", pretrained or "openai"
    path = Path(cache_dir) / f"demo_clip_v{demo.VERSION}.pt"
    if path.exists():
        print(f"demo CLIP: loading pre-trained weights from {path}")
        return "tiny-demo", str(path)
    print(f"demo CLIP: pre-training a tiny CLIP on synthetic image-caption pairs (once; cached at {path}); "
          f"about 3 min on 2 idle cores")
    start = time.time()
    model, _, tokenizer = load_clip("tiny-demo", "none")
    with torch.random.fork_rng():  # leave the caller's global RNG as it was
        demo.pretrain(model, tokenizer, progress=lambda it: progress(it, "pre-train demo CLIP", quiet))
    save_atomic(model.state_dict(), path)
    print(f"demo CLIP: pre-trained in {time.time() - start:.0f}s")
    return "tiny-demo", str(path)


# -----------------------------------------------------------------------------
# Image features and their cache

def cache_path(cache_dir, data, split, model_name, pretrained):
    """File name keyed by dataset, split, model, pretrained (hashed when it is a file) and format."""
    p = str(pretrained)
    if os.path.isfile(p):
        st = os.stat(p)
        p = Path(p).stem + "-" + hashlib.sha1(f"{os.path.abspath(p)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:8]
    key = f"{data}_{split}_{model_name}_{p}_eval_v{CACHE_VERSION}"  # "eval": the eval preprocess.replace("/", "-")
    return Path(cache_dir) / f"{key}.pt"


def save_atomic(obj, path):
    """torch.save to a temp file in the same folder, then rename: never a half-written cache."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(text, path):
    """Write text to a temp file in the same folder, then rename (results.json, LLM replies)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def load_cached(path, keys):
    """Load a cache file with weights_only=True; None (with a one-line warning) if missing or corrupt."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or any(k not in obj for k in keys):
            raise ValueError("missing keys")
        return obj
    except Exception as e:
        print(f"warning: cache {path.name} is unreadable ({type(e).__name__}); recomputing", file=sys.stderr)
        return None


@torch.no_grad()
def encode_images(model, dataset, device="cpu", batch_size=256, workers=0, cache_file=None, quiet=False):
    """Encode a dataset of (image, label, index). -> (features [N, D] float32 L2-normalised, labels [N]).

    With `cache_file`, a valid cache is loaded instead (one line printed) and a fresh result is saved.
    """
    if cache_file is not None:
        hit = load_cached(cache_file, ("features", "labels"))
        if hit is not None and len(hit["labels"]) == len(dataset):
            print(f"feature cache hit: {Path(cache_file).name}")
            return hit["features"], hit["labels"]
    device = torch.device(device)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")
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


def prepare(args, device, transform=None):
    """Load the dataset and CLIP, then encode both splits once (cached). -> dict of everything scripts share."""
    train, y_train, test, y_test, classnames, *info = data.load_dataset(args.data, args.data_dir, args.download)
    model_name, pretrained = clip_choice(args.data, args.clip_model, args.pretrained, args.cache_dir, args.quiet)
    model, preprocess, tokenizer = load_clip(model_name, pretrained, device)
    data_key = args.data  # a folder dataset is keyed by its path too: two folders must not share a cache
    if args.data == "folder":
        data_key += "-" + hashlib.sha1(str(Path(args.data_dir).resolve()).encode()).hexdigest()[:8]
    feats = {}
    for split, samples, labels in (("train", train, y_train), ("test", test, y_test)):
        cache = None if args.no_cache else cache_path(args.cache_dir, data_key, split, model_name, pretrained)
        feats[split] = encode_images(model, ImageList(samples, labels, transform or preprocess), device,
                                     workers=args.workers, cache_file=cache, quiet=args.quiet)[0]
    return dict(train=train, y_train=y_train, test=test, y_test=y_test, classnames=classnames,
                model=model, preprocess=preprocess, tokenizer=tokenizer, model_name=model_name,
                pretrained=pretrained, f_train=feats["train"], f_test=feats["test"])


# -----------------------------------------------------------------------------
# K-Means (hand-written, on the data's device)


def _assign(x, x_sq, c, chunk):
    """Nearest centroid per row via |x|² − 2x·cᵀ + |c|², in row chunks, and the per-cluster sums and counts
    the next update needs. -> (assign [N], squared distance [N], sums [K, D], counts [K])"""
    K = len(c)
    # MKL's CPU GEMM is ~1.5x slower when K is not a multiple of 8 (K=47: 6.0 ms, padded to 48: 3.8 ms,
    # one core), so pad with dummy centres at infinite distance, which the argmin never picks
    pad = -K % 8
    c_sq = F.pad((c * c).sum(1), (0, pad), value=float("inf"))  # [K']
    c = F.pad(c, (0, 0, 0, pad))  # [K', D], K' = K rounded up to a multiple of 8
    assign = torch.empty(len(x), dtype=torch.long, device=x.device)  # [N]
    dist = torch.empty(len(x), dtype=x.dtype, device=x.device)  # [N]
    sums = torch.zeros(K, x.shape[1], dtype=x.dtype, device=x.device)  # [K, D]
    for s in range(0, len(x), chunk):  # memory O(chunk * K)
        xb, a = x[s:s + chunk], assign[s:s + chunk]  # [B, D], [B]
        d = torch.addmm(c_sq, xb, c.T, alpha=-2)  # [B, K'] |c|² − 2x·cᵀ (|x|² can't move the argmin)
        torch.min(d, 1, out=(dist[s:s + chunk], a))
        sums.index_add_(0, a, xb)  # summed while the chunk is still in cache: one pass over x per iteration, not two
    counts = torch.bincount(assign, minlength=K)  # [K]
    return assign, dist.add_(x_sq).clamp_min_(0), sums, counts  # float32 round-off can dip just below 0


def _dists_to(x, x_sq, ids):
    """Squared distance of every row of x to the rows ids. -> [L, N]"""
    d = torch.addmm(x_sq, x[ids], x.T, alpha=-2).add_(x_sq[ids, None]).clamp_min_(0)  # [L, N]
    d[torch.arange(len(ids), device=x.device), ids] = 0  # exactly 0 at the point itself (round-off would not be)
    return d


def _kmeans_pp(x, x_sq, k, g, n_trials=None):
    """Greedy k-means++ (Arthur & Vassilvitskii 2007, as scikit-learn runs it): the first centre is a uniform
    draw; each next one is the best of n_trials = 2 + ⌊ln k⌋ points drawn with probability ∝ squared distance
    to the nearest centre so far, best = lowest total squared distance once added. Plain k-means++
    (n_trials=1) more often puts two centres in one cluster and none in another (4x the inertia on
    well-separated blobs, measured). -> [K, D]"""
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
    """Cluster means from the sums and counts of _assign; empty clusters re-seeded at the points farthest
    from their centre."""
    new = sums / counts.clamp_min(1).to(x.dtype)[:, None]  # [K, D]
    empty = (counts == 0).nonzero().flatten()  # [E], E <= K <= N
    if len(empty):  # explicit re-seed, never NaN and never the origin
        new[empty] = x[dist.topk(len(empty)).indices]
    if spherical:
        norm = new.norm(dim=1, keepdim=True)  # [K, 1]
        new = torch.where(norm > 1e-12, new / norm.clamp_min(1e-12), c)  # antipodal mean: keep old centre
    return new


def kmeans(x, k, n_iter=25, tol=1e-4, seed=0, spherical=False, n_init=1, init=None, chunk=None, seed_rows=None):
    """Lloyd's K-Means with greedy k-means++ seeding, in torch on x's device.

    x [N, D] float; k clusters; stops after n_iter updates, when no assignment changes, or when the
    relative inertia drop is <= tol (tol=0: only at convergence).
    spherical=True: for L2-normalised features, centroids re-normalised (cosine K-Means).
    init [k, D]: start from these centroids (a warm start; one run, no seeding).
    seed_rows: seed on a random subset of this many rows (default 16k): seeding reads its rows k times, which
    at N = 100,000 and k = 1,000 took longer than the 25 Lloyd iterations; the iterations then use every row
    (final inertia within 0.3% of seeding on every row, mean of 8 seeds on 3 data shapes, measured).
    chunk: rows per distance block (default: a block of x stays about 4 MB, in cache).
    Returns (centroids [k, D], assign [N], inertia_history list of floats); best of n_init seeds.
    """
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
        if init is not None:
            c = init.float()  # [K, D]
        else:
            rows = torch.randperm(n, generator=g)[:m].to(x.device) if m < n else slice(None)  # [M]
            c = _kmeans_pp(x[rows], x_sq[rows], k, g)  # [K, D]
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
# Metrics

def accuracy(pred, labels):
    return (pred == labels).float().mean().item() if len(labels) else float("nan")


def per_class_accuracy(pred, labels, num_classes):
    """-> [C] accuracy per class (NaN for classes absent from `labels`)."""
    hit = torch.zeros(num_classes).index_add_(0, labels, (pred == labels).float())
    count = torch.bincount(labels, minlength=num_classes).float()
    return hit / count


def harmonic_mean(a, b):
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


# -----------------------------------------------------------------------------
# Results

def versions():
    import open_clip
    import torchvision
    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except Exception:
        pass
    return {"python": sys.version.split()[0], "torch": torch.__version__, "torchvision": torchvision.__version__,
            "open_clip": open_clip.__version__, "cuda": torch.version.cuda if torch.cuda.is_available() else None,
            "git_commit": commit}


def write_results(out_dir, config, metrics, start_time, extra=None):
    """results.json = {config, metrics, elapsed_s, versions, **extra}, written atomically."""
    res = {"config": config, "metrics": metrics, "elapsed_s": round(time.time() - start_time, 2),
           "versions": versions(), **(extra or {})}
    path = Path(out_dir) / "results.json"
    if path.exists():  # a rerun into the same --out-dir keeps the earlier result, and says so
        kept = path.with_name(time.strftime("results-%Y%m%d-%H%M%S.json", time.localtime(path.stat().st_mtime)))
        os.replace(path, kept)
        print(f"note: {path} existed; the earlier run's results were moved to {kept.name}")
    return write_text_atomic(json.dumps(res, indent=2, default=float), path)


# -----------------------------------------------------------------------------
# LLM: one chat-completions request with `requests`, retried, cached on disk

class LLMError(Exception):
    """The LLM server gave no usable answer (unreachable, refused, malformed); callers may fall back."""


def _chat_once(endpoint, body, timeout, max_bytes):
    """One POST -> (reply texts, None), or (None, why) when a retry may help (network, 429, 5xx); anything
    else raises LLMError. No error carries the request or the key (`from None`; an echoed key is blanked)."""
    import requests  # only the LLM path needs it
    key = os.environ.get("OPENAI_API_KEY")
    try:
        with requests.post(endpoint, json=body, headers={"Authorization": f"Bearer {key}"} if key else {},
                           timeout=timeout, stream=True) as r:
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
    text = raw.decode("utf-8", "replace")
    if key:  # should a server echo it
        text = text.replace(key, "***")
    if r.status_code == 429 or r.status_code >= 500:
        return None, f"HTTP {r.status_code}"
    if r.status_code in (401, 403):
        raise LLMError(f"HTTP {r.status_code} from {endpoint}: not authorised, check OPENAI_API_KEY")
    if "html" in r.headers.get("Content-Type", "").lower() or text.lstrip().startswith("<"):
        raise LLMError(f"{endpoint} sent an HTML page (HTTP {r.status_code}), not JSON: "
                       f"is it an OpenAI-compatible server?")
    return _reply_contents(text, r.status_code, endpoint), None


def _reply_contents(text, status, endpoint):
    """A chat-completions reply -> its non-empty message contents, one per choice; else LLMError."""
    snippet = repr(" ".join(text.split())[:160])
    if status != 200:
        raise LLMError(f"HTTP {status} from {endpoint}: {snippet}")
    try:
        data = json.loads(text)
    except ValueError:
        raise LLMError(f"{endpoint} returned malformed JSON: {snippet}") from None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices:
        raise LLMError(f"{endpoint} reply has no 'choices': {snippet}")
    contents = [c["message"]["content"] for c in choices
                if isinstance(c, dict) and isinstance(c.get("message"), dict)]
    contents = [c.strip() for c in contents if isinstance(c, str) and c.strip()]
    if not contents:
        raise LLMError(f"{endpoint} returned {len(choices)} choice(s), all with empty content")
    return contents


def llm_complete(prompt, *, url, model, n=1, temperature=0.7, timeout=30.0, retries=3, cache_dir=None,
                 max_bytes=1_000_000, backoff=0.5):
    """POST one user message to an OpenAI-compatible {url}/v1/chat/completions -> list of reply texts.

    Servers that ignore n > 1 (llama.cpp, Ollama) send fewer choices. `retries` counts attempts in all;
    network errors, 429 and 5xx are retried after backoff·2^i s (≤ 8 s). The key comes from $OPENAI_API_KEY.
    With cache_dir, replies are kept in cache_dir/llm/<sha256 of the request>.json: reruns are offline.
    """
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
        write_text_atomic(json.dumps({**body, "contents": contents}, indent=1), cache_file)
    return contents
