"""CAP: Handling Imbalanced Pseudolabels for Vision-Language Models with Concept Alignment and
Confusion-Aware Calibrated Margin (Wang et al., ICML 2025, arXiv 2505.02056).

CLIP's zero-shot pseudolabels are imbalanced for two reasons, and CAP treats each one:
  §3.1 concept mismatch (class names that do not match their images): iterative K-Means on the image features
       removes the best-matched (class, cluster) pair until t classes remain; those also among the t least-predicted
       are "mismatched", and the LLM description of each nearest a leftover cluster relabels that class's images.
  §3.2 concept confusion: a margin matrix M = S ⊙ m, from class similarity S and how rarely each class is
       predicted, is added to the non-target logits of a margin cross-entropy.
  §3.3 MaPLe prompt tuning with three residual adapters, all off at inference: main visual (on the high-precision
       pseudolabels D_PL), pseudo (FixMatch-style pseudolabels on the unlabeled pool) and text (both).
The file follows the paper: the settings and zero-shot CLIP's initial D_PL, §3.1, §3.2, §3.3, evaluation, main.
The defaults are the paper's formulas; --as-released switches to the released code's behaviour wherever the
two differ (RELEASE_BEHAVIOURS; docs/cap.md measures each).

    python cap.py --data dtd --mode ul
    python cap.py --data eurosat --mode trzsl --llm-url http://localhost:11434 --llm-model llama3.1
    python cap.py --data demo --mode ul          # offline demo world on a CPU
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle OpenMP threads sleep (docs/usage.md)

import argparse  # noqa: E402
import functools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from torch.utils.data import DataLoader, RandomSampler

import common
import data

# Per-dataset values of the release (docs/cap.md); ImageNet's fast detection; the demo's CPU-sized budget: 32 of its
# 300 images per class (the paper's 16 of ~100-1000), crops keeping half of its 32-px patterns (demo.py).
DATASET_DEFAULTS = {
    "flowers102": {"n_main": 6},
    "fgvc_aircraft": {"tau": 0.5, "max_main_ratio": 0.6},
    "imagenet": {"detect": "fast", "kmeans_restarts": 1},
    "demo": {"mismatch_t": 2, "epochs": 10, "iters": 20, "n_main": 32, "crop_min": 0.5},
}
# Where the released code (Noahwangyuchen/CAP) does something other than the paper's text. The paper's
# formulas are the default; --as-released turns on all of these, --release a,b some.
RELEASE_BEHAVIOURS = {
    "margin-formula": "calibrated margin: S rows rescaled, weight Δ(1−r)/(1+r)",
    "flip": "strong view always flipped (p = 1, not 0.5)",
    "quirk": "initial pseudolabels and detection from the prompt 'a photo of a {}<class>' (f-string slip)",
    "no-low-t": "mismatched classes = Y_final, without ∩ Y_low-t",
    "leaderboard": "initial D_PL from FPL's streaming top-K leaderboard (images overflow to other classes)",
    "described": "--descriptions FILE decides which classes are described, detected or not",
    "desc-all": "a described class takes its top-K images among all training images, labeled ones too",
    "trzsl-all": "TRZSL: L_UL pseudolabels over all classes; seen-class predictions count in σ",
    "sigma-repeats": "σ counts every confident prediction of the epoch (an image drawn twice counts twice)",
    "ssl-draw": "SSL shots: numpy reseeded with 0 before each class",
    "eurosat-pool": "EuroSAT: the test images stay in the unlabeled pool (data.py)",
}
# The ablations: each --no-NAME switches off one component (all on in the paper; bench/cap_components.sh).
ABLATIONS = {
    "alignment": "§3.1 concept alignment",
    "margin": "§3.2 margin (off: plain CE)",
    "pseudo": "pseudo adapter (L_UL)",
    "main": "main adapter (L_PL)",
    "expansion": "§4.6 D_PL expansion",
}
RELEASE_PROMPT = "a photo of a {{}}{}"  # .format(name) -> "a photo of a {}name", the release's f"{template}{name}"


def parse_args(argv=None):
    """The shared flags (common.add_common_args) and CAP's; a dataset's DATASET_DEFAULTS apply unless typed."""
    p = argparse.ArgumentParser(description="CAP (ICML 2025)")
    common.add_common_args(p, data.DATASETS)
    modes = ["ul", "ssl", "trzsl"]  # no labels, 2 labels per class, labels for the seen classes only (§4.1)
    p.add_argument("--mode", default="ul", choices=modes, help="setting: ul, ssl or trzsl (§4.1)")
    p.add_argument("--split-seed", type=int, default=500, help="TRZSL seen/unseen split seed (§1.2: 500, 0, 200)")
    # §3.1 concept alignment
    p.add_argument("--mismatch-t", type=common.nonneg_int, default=None, help="stop removal at t classes (⌈C/10⌉)")
    p.add_argument("--detect", default="exact", choices=["exact", "fast"], help="§3.1 K-Means: from scratch or warm")
    p.add_argument("--kmeans-restarts", type=common.positive_int, default=20, help="§3.1 K-Means seedings kept best of")
    p.add_argument("--n-main", type=common.positive_int, default=16, help="K: initial D_PL images per class (§4.2)")
    p.add_argument("--llm-url", default=None, help="OpenAI-compatible server base URL for class descriptions")
    p.add_argument("--llm-model", default="gpt-4o-mini", help="LLM model name (paper: GPT-4o-mini)")
    p.add_argument("--n-descriptions", type=common.positive_int, default=5, help="descriptions per class (paper: 5)")
    p.add_argument("--descriptions", default=None, help="JSON {classname: [descriptions]} used instead of the LLM")
    p.add_argument("--domain", default=None, help="what the images are, for the LLM prompt (e.g. 'texture')")
    # §3.2 calibrated margin and §3.3 training
    p.add_argument("--margin-scale", type=common.nonneg_float, default=12.0, help="margin scale m (paper: 12.0)")
    p.add_argument("--prompt-depth", type=common.positive_int, default=8, help="MaPLe depth (≤ the model's layers)")
    p.add_argument("--tau", type=common.nonneg_float, default=0.85, help="confidence threshold τ (§4.4)")
    p.add_argument("--epochs", type=common.positive_int, default=50, help="epochs (§4.7)")
    p.add_argument("--iters", type=common.positive_int, default=50, help="iterations per epoch (§4.7)")
    p.add_argument("--batch-size", type=common.positive_int, default=32, help="batch size of each stream (§4.7)")
    p.add_argument("--crop-min", type=common.positive_float, default=0.08, help="strong view's smallest crop (§4.4)")
    p.add_argument("--lr", type=common.positive_float, default=0.01, help="SGD learning rate (§4.7)")
    p.add_argument("--wd", type=common.nonneg_float, default=0.1, help="SGD weight decay (§4.7)")
    p.add_argument("--expand-every", type=common.positive_int, default=5, help="D_PL expansion period (§4.6)")
    p.add_argument("--max-main-ratio", type=common.positive_float, default=0.8, help="D_PL growth cap ratio (§4.6)")
    # ablations (ABLATIONS)
    common.add_ablation_switches(p, ABLATIONS)
    p.add_argument("--checkpoint", default=None, help="prompt checkpoint to evaluate (with --eval-only)")
    p.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint on the test split and exit")
    # the released code (default: the paper's formulas)
    p.add_argument("--as-released", action="store_true", help="every behaviour of the released code at once")
    p.add_argument("--release", default="", help="comma-separated subset of: " + ", ".join(RELEASE_BEHAVIOURS))
    args = common.parse_args(p, argv, data.CLIP_DEFAULTS, DATASET_DEFAULTS)
    if args.eval_only and not args.checkpoint:
        p.error("--eval-only needs --checkpoint FILE (written by a training run as cap_prompts.pt)")
    try:
        common.release_settings(args, RELEASE_BEHAVIOURS)
    except common.UserError as e:
        p.error(str(e))
    return args


# -----------------------------------------------------------------------------
# §4.1 The settings: which training images are labeled (UL, SSL, TRZSL)


def protocol_ssl(labels, num_classes, shots=2, seed=0, reseed_per_class=False):
    """SSL: `shots` labeled images per class, drawn without replacement from numpy seeded with `seed` (0 as
    released): one stream for all classes, or reseeded before each class as the release does. -> idx tensor."""
    rng = np.random.RandomState(seed)
    idx = []
    for c in range(num_classes):
        rng = np.random.RandomState(seed) if reseed_per_class else rng
        idx.append(rng.choice(np.where(labels.numpy() == c)[0], shots, replace=False))
    return torch.as_tensor(np.concatenate(idx))


def protocol_trzsl(num_classes, split_seed=500, ratio=0.62):
    """TRZSL: seen classes = np.random.choice(C, int(0.62 C)) after seeding with split_seed. -> (seen, unseen)"""
    if num_classes < 2 or int(ratio * num_classes) < 1 or int(ratio * num_classes) >= num_classes:
        raise common.UserError(f"TRZSL needs at least one seen and one unseen class; {num_classes} classes is too few")
    rng = np.random.RandomState(split_seed)
    seen = torch.as_tensor(np.sort(rng.choice(num_classes, int(ratio * num_classes), replace=False)))
    unseen = torch.as_tensor([c for c in range(num_classes) if c not in set(seen.tolist())])
    return seen, unseen


def split_setting(mode, labels, num_classes, split_seed, ssl_reseed=False):
    """-> (labeled idx, unlabeled idx, pseudolabeled classes, seen classes) for UL, SSL or TRZSL."""
    all_idx = torch.arange(len(labels))
    classes = torch.arange(num_classes)
    if mode == "ul":
        return all_idx[:0], all_idx, classes, classes[:0]
    if mode == "ssl":
        lab = protocol_ssl(labels, num_classes, reseed_per_class=ssl_reseed)
        return lab, all_idx[~torch.isin(all_idx, lab)], classes, classes[:0]
    seen, unseen = protocol_trzsl(num_classes, split_seed)
    is_seen = torch.isin(labels, seen)
    return all_idx[is_seen], all_idx[~is_seen], unseen, seen


# -----------------------------------------------------------------------------
# Zero-shot CLIP and the initial pseudolabels D_PL (§4.2)


def zero_shot_classifiers(model, tokenizer, classnames, quirk, device):
    """Zero-shot CLIP's text classifiers: W from 'a photo of a {}.' (the baseline) and W_pl, the prompt the
    pseudolabels come from (the same, or the release's slip with quirk). -> (W [C, D], W_pl [C, D])"""
    W = common.zero_shot_weights(model, tokenizer, classnames, common.TEMPLATES_SINGLE, device).cpu()
    if not quirk:
        return W, W
    return W, common.zero_shot_weights(model, tokenizer, classnames, [RELEASE_PROMPT], device).cpu()


def pseudolabel_probs(f_train, W_pl, pseudo_classes, scale):
    """CLIP's softmax over the pseudolabeled classes (TRZSL: the unseen ones). f_train [N, D] -> [N, C]"""
    not_pl = torch.ones(len(W_pl), dtype=torch.bool)  # [C]
    not_pl[pseudo_classes] = False
    return (scale * f_train @ W_pl.T).masked_fill(not_pl, float("-inf")).softmax(1)  # [N, C]


def initial_pseudolabels(probs, classes, K):
    """High-precision D_PL (§4.2): per class, the K most confident images predicted as that class,
    filled from the highest-probability remaining images if fewer are predicted. -> {class: idx [≤K]}"""
    pred = classes[probs[:, classes].argmax(1)]  # [N] restricted to the pseudolabeled classes
    return {
        c: (probs[:, c] + (pred == c).float()).topk(min(K, len(probs))).indices  # predicted as c first
        for c in classes.tolist()
    }


def streaming_leaderboard(probs, classes, K):
    """Initial D_PL as released (FPL's leaderboard). Images arrive in pool order and join the board of their
    predicted class if it has room or they beat its last entry (which drops out, never re-offered); otherwise
    they are offered to every other class by decreasing probability, joining each board with room or whose last
    entry they beat (so one image may sit on several). Appending with room does not re-sort. -> {class: idx [≤K]}"""
    cols = classes.tolist()
    boards = {c: [] for c in cols}
    for n, row in enumerate(probs[:, classes].tolist()):  # row [C'] over the pseudolabeled classes
        order = sorted(range(len(cols)), key=lambda j: -row[j])  # predicted class first
        b = boards[cols[order[0]]]
        p = row[order[0]]
        if len(b) < K or b[-1][0] < p:
            boards[cols[order[0]]] = sorted(b + [(p, n)], reverse=True)[:K]
            continue
        for j in order[1:]:
            b = boards[cols[j]]
            if len(b) < K:
                b.append((row[j], n))
            elif b[-1][0] < row[j]:
                boards[cols[j]] = sorted(b + [(row[j], n)], reverse=True)[:K]
    return {c: torch.tensor([n for _, n in b], dtype=torch.long) for c, b in boards.items()}


def flatten(dpl):
    """{class: idx} -> (pool indices [n], pseudolabels [n])."""
    idx = torch.cat(list(dpl.values()))
    return idx, torch.cat([torch.full((len(v),), c, dtype=torch.long) for c, v in dpl.items()])


def dpl_accuracy(dpl, labels):
    """Fraction of D_PL's pseudolabels {class: idx} that match the true labels."""
    idx, y = flatten(dpl)
    return common.accuracy(y, labels[idx])


# -----------------------------------------------------------------------------
# §3.1 Concept alignment: mismatch detection by iterative K-Means, class descriptions, the relabelled D_PL


def match_log_odds(logits):
    """log P/(1−P) of P = softmax over clusters (dim 1) of logits [R, R]. Ranks pairs exactly as P does,
    but stays finite where P rounds to 1.0 in floating point (common at CLIP's scale 100)."""
    lse = logits.logsumexp(1, keepdim=True)  # [R, 1]
    log_p = logits - lse  # [R, R] log P
    # log(1 − P): off each row's top entry P ≤ 1/2, so log1p(−P) is exact; at the top entry 1 − P is the sum
    # of the other entries, taken directly (no [R, R, R] tensor: R = 1,000 classes would need 4 GB)
    top = logits.argmax(1, keepdim=True)  # [R, 1]
    log_rest = torch.log1p(-log_p.exp())  # [R, R]
    log_rest.scatter_(1, top, logits.scatter(1, top, float("-inf")).logsumexp(1, keepdim=True) - lse)
    return log_p - log_rest  # [R, R]


def detect_mismatch(image_features, text_features, zs_pred, t, seed=0, n_init=20, scale=100.0, fast=False):
    """Iterative clustering (§3.1): remove the best-matched (class, cluster) pair until ≤ t classes remain.
    image_features [N, D], text_features [C, D] unit rows, zs_pred [N] zero-shot labels, on any device; scale:
    CLIP's logit scale. Each K-Means keeps the best of n_init seedings (release: scikit-learn's 10), from scratch as
    in the paper and the release. fast (1,000 classes): the first K-Means is from scratch, each later one goes on
    from the last centres less the removed one with common.kmeans(init=...)'s passes and stopping rule, recomputing
    only the rows and cluster sums that a removal or a moved centre can change; the zero-shot logits once for all.
    -> (Y_MM = Y_final ∩ Y_low-t, or Y_final for zs_pred None as released; leftover centres [|Y_final|, D])"""
    N = len(image_features)
    C = len(text_features)
    dev = image_features.device
    avg_size = N // C
    classes = list(range(C))  # the classes left
    images = torch.arange(N, device=dev)  # the images left
    if not fast:  # the paper's loop: K-Means from scratch after each removal
        while len(classes) > t and len(images) >= len(classes):
            R = len(classes)
            f = image_features[images]  # [n, D]
            centres, assign, _ = common.kmeans(f, R, seed=seed, spherical=True, n_init=n_init)
            odds = match_log_odds(scale * text_features[classes] @ centres.T)  # [R, R], monotone in P
            i, j = divmod(odds.argmax().item(), R)  # the global best (class i*, cluster j*) pair
            # images zero-shot predicts as i* (among remaining classes), most confident first as in the release
            # (log-softmax ranks as its softmax does, without ties where P rounds to 1); cluster j* first, ≤ avg_size
            z = scale * f @ text_features[classes].T  # [n, R] zero-shot logits
            ranked = (z.argmax(1) == i).nonzero().flatten()  # [m]
            ranked = ranked[z[ranked].log_softmax(1)[:, i].argsort(descending=True, stable=True)]
            in_j = assign[ranked] == j  # [m]
            used = torch.zeros(len(images), dtype=torch.bool, device=images.device)  # on the features' device
            used[torch.cat([ranked[in_j], ranked[~in_j]])[:avg_size]] = True
            images = images[~used]
            classes = classes[:i] + classes[i + 1 :]
    else:  # the same loop over all N rows, `alive` marking the images left; the state is patched, not rebuilt
        x = image_features.float()  # [N, D]
        alive = torch.ones(N, dtype=torch.bool, device=dev)  # [N]
        x_sq = torch.linalg.vector_norm(x, dim=1) ** 2  # [N], as common.kmeans has it
        chunk = max(64, 2**22 // C)  # rows per distance block
        z = scale * image_features @ text_features.T  # [N, C] zero-shot logits (−inf: a removed class)
        pred = z.argmax(1)  # [N] zero-shot class among the remaining ones
        c = common.kmeans(x, C, seed=seed, spherical=True, n_init=n_init)[0]  # [R, D] centres
        assign, dist, sums, counts = common._assign(x, x_sq, c, chunk)  # [N], [N] squared distance, [R, D], [R]
        dirty = torch.zeros(C, dtype=torch.bool, device=dev)  # [R] clusters whose sums are out of date
        while len(classes) > t and int(alive.sum()) >= len(classes):
            R = len(classes)
            # after a removal, K-Means from the centres less j* (as they are: kmeans would re-normalise them, a
            # round-off change): pass 0 re-assigns cluster j*'s rows; an update moves few centres, and a row can
            # change cluster only if its own centre moved or a moved one is now as near as its own
            history = []
            for step in range(26 if R < C else 0):  # pass 0, then ≤ 25 updates (common.kmeans's n_iter, tol)
                if step:
                    xa = x[alive] if (counts == 0).any() else x  # read only to re-seed empty clusters (as kmeans does)
                    new = common._update_centroids(xa, sums, counts, dist[alive], c, True)  # [R, D]
                    moved = (new != c).any(1)  # [R]; none moved: the same assignment, K-Means stops
                    if not moved.any():
                        break
                    c = new
                    cm = new[moved]  # [M, D] the centres that moved
                    near = torch.addmm((cm * cm).sum(1), x, cm.T, alpha=-2).amin(1).add_(x_sq).clamp_min_(0)  # [N]
                    stale = alive & (moved[assign] | (near <= dist))
                rows = stale.nonzero().flatten()  # [r] rows to re-assign
                a, d, _, _ = common._assign(x[rows], x_sq[rows], c, chunk)  # [r], [r]
                same = torch.equal(a, assign[rows])
                dirty[assign[rows]] = True  # the clusters these rows leave or join: their sums are redone
                dirty[a] = True
                assign[rows] = a
                dist[rows] = d
                members = (alive & dirty[assign]).nonzero().flatten()  # [s] summed in row order, as _assign does
                sums[dirty] = 0
                sums.index_add_(0, assign[members], x[members])
                counts = torch.bincount(assign[alive], minlength=R)  # [R]
                dirty = torch.zeros_like(dirty)
                history.append(dist[alive].sum().item())
                if step and (same or history[-2] - history[-1] <= 1e-4 * history[-2]):
                    break
            odds = match_log_odds(scale * text_features[classes] @ c.T)  # [R, R]
            i, j = divmod(odds.argmax().item(), R)
            keep = torch.tensor(classes, device=dev)  # [R] remaining class ids
            ranked = (alive & (pred == classes[i])).nonzero().flatten()  # [m]
            ranked = ranked[z[ranked][:, keep].log_softmax(1)[:, i].argsort(descending=True, stable=True)]
            in_j = assign[ranked] == j  # [m]
            used = torch.cat([ranked[in_j], ranked[~in_j]])[:avg_size]  # [≤ avg_size]
            alive[used] = False
            z[:, classes[i]] = float("-inf")  # i* leaves: the images it was predicted for take their next class
            again = (alive & (pred == classes.pop(i))).nonzero().flatten()  # [g]
            pred[again] = z[again].argmax(1)
            dirty[assign[used]] = True
            stale = alive & (assign == j)  # [N] the rows pass 0 re-assigns
            c, sums, dirty = (torch.cat([v[:j], v[j + 1 :]]) for v in (c, sums, dirty))  # [R-1, D], .., [R-1]
            assign = (assign - (assign > j).long()).masked_fill_(stale | ~alive, 0)  # [N] ids without j* (0: none)
        images = alive.nonzero().flatten()
    k = min(len(classes), len(images))  # the leftover images' clusters, one per leftover class
    centres = image_features[:0]  # [0, D] when nothing is left
    if k:
        centres = common.kmeans(image_features[images], k, seed=seed, spherical=True, n_init=n_init)[0]  # [k, D]
    return (classes if zs_pred is None else intersect_low_t(classes, zs_pred, t, C)), centres


def intersect_low_t(final, zs_pred, t, num_classes):
    """Y_MM = Y_final ∩ Y_low-t, Y_low-t the t classes zero-shot predicts least (zs_pred [N]). -> class ids"""
    counts = torch.bincount(zs_pred, minlength=num_classes)  # [C]
    low_t = set(counts.argsort(stable=True)[:t].tolist())  # Y_low-t
    return [c for c in final if c in low_t]


def load_descriptions(path):
    """Read a JSON file {classname: [descriptions]} (a string counts as a 1-list). Malformed -> UserError."""
    try:
        found = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise common.UserError(f"descriptions file {path}: cannot read it as JSON ({type(e).__name__}: {e})") from None
    if not isinstance(found, dict):
        raise common.UserError(
            f"descriptions file {path}: expected an object {{classname: [descriptions]}}, not a {type(found).__name__}"
        )
    out = {}
    for name, v in found.items():
        v = [v] if isinstance(v, str) else v
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise common.UserError(f"descriptions file {path}: {name!r} must map to a string or a list of strings")
        out[name] = [s.strip() for s in v if s.strip()]
    return out


def class_descriptions(
    classnames, domain, n, *, url=None, model=None, descriptions_file=None, cache_dir=None, shipped=None
):
    """Where descriptions come from, first match wins: (1) --descriptions FILE; (2) the LLM at --llm-url;
    (3) `shipped` (a dataset's own answers, data.SHIPPED_DESCRIPTIONS), also when the LLM fails; (4) nothing:
    one warning, and the method goes on with class-name prompts. -> ({classname: [descriptions]}, source)"""
    if descriptions_file:
        found = load_descriptions(descriptions_file)  # may describe more classes than those asked for
        if missing := [c for c in classnames if not found.get(c)]:
            why = f"{descriptions_file} has no descriptions for {missing}; they keep class-name prompts"
            print(f"warning: {why}", file=sys.stderr)
        return {c: d for c, d in found.items() if c in classnames and d}, f"file {descriptions_file}"
    if url and not model:
        raise common.UserError("--llm-url needs --llm-model (the model name the server serves)")
    why = "no --llm-url/--llm-model (an OpenAI-compatible server) and no --descriptions FILE"
    try:
        if url:
            found = common.describe_classes(classnames, domain, n, url=url, model=model, cache_dir=cache_dir)
            return found, f"llm {model}"
    except common.LLMError as e:
        why = f"the LLM failed: {e}"
    if shipped is not None:
        print(f"note: using the shipped descriptions ({why})", file=sys.stderr)
        return {c: shipped[c] for c in classnames if shipped.get(c)}, "shipped"
    print(f"warning: no class descriptions ({why}); going on with class-name prompts", file=sys.stderr)
    return {}, "none"


def choose_descriptions(desc_features, centres):
    """Per mismatched class, the description nearest a leftover cluster centre (§3.1); clusters go greedily, one
    per class, best cosine first. desc_features {class: [n, D]}, centres [R, D]. -> {class: (description, cluster)}"""
    cand = []  # (cosine, class, description, cluster)
    for c, f in desc_features.items():
        cand += [(float(f[i] @ centres[j]), c, i, j) for i in range(len(f)) for j in range(len(centres))]
    cand.sort(reverse=True)
    chosen = {}
    taken = set()
    for _, c, i, j in cand:
        if c not in chosen and j not in taken:
            chosen[c] = (i, j)
            taken.add(j)
    return chosen


def align_pseudolabels(dpl, image_features, description_features, K, ids=None):
    """Replace a mismatched class's D_PL by the top-K images by cosine to its chosen description.
    ids [N] maps a row of image_features to the index D_PL uses (default: the row itself)."""
    dpl = dict(dpl)
    for c, f in description_features.items():
        top = (image_features @ f).topk(min(K, len(image_features))).indices  # [K]
        dpl[c] = top if ids is None else ids[top]
    return dpl


# -----------------------------------------------------------------------------
# §3.2 Confusion-aware calibrated margin: M = S ⊙ m and the margin losses


def class_similarity(text_features, prototypes):
    """S_ij = max(sim(v̄_i, v̄_j), sim(w_i, w_j)) from L2-normalised prototypes [C, D] and text [C, D]."""
    return torch.maximum(text_features @ text_features.T, prototypes @ prototypes.T)  # [C, C]


def calibrated_margin(S, sigma, m, released_formula=False):
    """Margin matrix M [C, C] from similarity S [C, C] and prediction counts σ [C] (§3.2).
    paper:    δ_c = 1 − σ(c)/max σ, Δ = max δ, m_c = m·Δ·δ_c, M_yc = m_y·S_yc.
    released: S rows rescaled onto [min_i, 1], r = σ/max σ, Δ = (max r − min r)·m, M_yc = Δ(1−r_y)/(1+r_y)·S_yc."""
    if sigma.max() <= 0:  # nothing confidently predicted yet: no margin
        return torch.zeros_like(S)
    r = sigma.float() / sigma.max()  # [C]
    if not released_formula:  # δ = 1 − r
        return (m * (1 - r).max() * (1 - r))[:, None] * S
    lo = S.min(1, keepdim=True).values  # [C, 1]
    hi = S.max(1, keepdim=True).values  # [C, 1]
    S = lo + (S - lo) / (hi - lo).clamp_min(1e-12) * (1 - lo)
    w = (r.max() - r.min()) * m * (1 - r) / (1 + r)  # [C]
    return w[:, None] * S


def prediction_counts(seen_pl, counts, seen, repeats=False):
    """σ [C] for the margin (§3.2): last epoch's confident predictions per class, one per image (paper:
    "samples"), or all of them, an image drawn twice counting twice (release). Never-pseudolabeled classes count
    too (TRZSL as released); seen classes are then set to max σ: r = 1, no margin, as released."""
    if repeats:
        sigma = counts.clone()
    else:
        sigma = torch.bincount(torch.tensor([c for c, _ in seen_pl.values()], dtype=torch.long), minlength=len(counts))
        sigma = sigma.float()
    sigma[seen] = sigma.max()
    return sigma  # [C]


def margin_cross_entropy(logits, targets, M, reduction="mean"):
    """L_m(y, z) = −log e^{z_y} / (e^{z_y} + Σ_{c≠y} e^{z_c + M_yc}). logits [B, C], targets [B], M [C, C]."""
    off_target = 1 - F.one_hot(targets, logits.shape[1]).to(logits.dtype)  # margin only on c ≠ y
    return F.cross_entropy(logits + M[targets] * off_target, targets, reduction=reduction)


def weak_pseudolabels(logits_w, classes, tau):
    """L_UL's FixMatch pseudolabels from weak-view logits [B, C], softmax over `classes` only: the
    pseudolabeled classes (paper; TRZSL: unseen), or all classes (TRZSL as released). -> conf, ŷ, mask [B]"""
    allowed = torch.full_like(logits_w[0], float("-inf"))  # [C]
    allowed[classes] = 0
    conf, y_hat = (logits_w + allowed).softmax(1).max(1)  # [B], [B]
    return conf, y_hat, (conf > tau).float()


def fixmatch_loss(logits_s, y_hat, mask, M):
    """L_UL: margin CE on the strong view against weak-view pseudolabels, averaged over masked samples
    (sum / Σmask, as released, rather than FixMatch's / B). 0 when nothing passes τ."""
    loss = margin_cross_entropy(logits_s, y_hat, M, reduction="none")  # [B]
    return (loss * mask).sum() / mask.sum().clamp_min(1)


# -----------------------------------------------------------------------------
# §3.3 The model: MaPLe multimodal prompts on a frozen open_clip ViT, plus three residual adapters


def build_maple(model, tokenizer, classnames, depth, n_ctx=2, ctx_init="a photo of a"):
    """MaPLe prompt learner (as released): n_ctx text context tokens initialised from ctx_init, coupled to vision
    prompts by Linear(text width → vision width), and depth−1 deep prompt pairs. -> (learner, tokens [C, L])"""
    w_txt = model.token_embedding.embedding_dim
    w_vis = model.visual.conv1.out_channels
    depth = max(1, min(depth, len(model.transformer.resblocks), len(model.visual.transformer.resblocks)))
    with torch.no_grad():
        init = model.token_embedding(tokenizer([ctx_init]))[0, 1 : 1 + n_ctx].float()  # [n_ctx, Wt]: "a photo"
    deep = [nn.Parameter(torch.randn(n_ctx, w_txt) * 0.02) for _ in range(depth - 1)]
    learner = nn.ModuleDict(
        {
            "ctx": nn.ParameterList([nn.Parameter(init.clone())]),
            "proj": nn.Linear(w_txt, w_vis),  # shallow text→vision coupling
            "deep_text": nn.ParameterList(deep),
            "deep_proj": nn.ModuleList([nn.Linear(w_txt, w_vis) for _ in range(depth - 1)]),
        }
    )
    tokens = tokenizer([f"{ctx_init} {name}." for name in classnames])  # [C, L]
    return learner, tokens


def encode_text_maple(model, learner, tokens):
    """Text encoder with the context tokens replaced by learned prompts at layer 0 and deep layers. -> [C, D]"""
    C = len(tokens)
    n_ctx = learner["ctx"][0].shape[0]
    x = model.token_embedding(tokens)  # [C, L, Wt]
    x = torch.cat([x[:, :1], learner["ctx"][0].expand(C, -1, -1), x[:, 1 + n_ctx :]], 1)
    x = x + model.positional_embedding
    for i, block in enumerate(model.transformer.resblocks):
        if 1 <= i <= len(learner["deep_text"]):  # deep compound prompts replace the context slots
            x = torch.cat([x[:, :1], learner["deep_text"][i - 1].expand(C, -1, -1), x[:, 1 + n_ctx :]], 1)
        x = block(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    x = x[torch.arange(C), tokens.argmax(-1)] @ model.text_projection  # EOT token, [C, D]
    return F.normalize(x.float(), dim=-1)


def encode_image_maple(model, learner, images):
    """Vision encoder with n_ctx prompt tokens appended after the patches (before ln_pre, as released; open_clip's
    patch dropout, off in eval mode, is left out) and replaced at deep layers. -> [B, D]"""
    visual = model.visual
    shallow = learner["proj"](learner["ctx"][0])  # [n_ctx, Wv]: the text prompts projected (MaPLe's coupling)
    deep = [proj(t) for proj, t in zip(learner["deep_proj"], learner["deep_text"])]  # one [n_ctx, Wv] per layer
    x = visual.conv1(images).flatten(2).transpose(1, 2)  # [B, P, Wv] patch embeddings
    B = x.shape[0]
    n_ctx = shallow.shape[0]
    x = torch.cat([visual.class_embedding.to(x.dtype).expand(B, 1, -1), x], 1)  # [B, 1+P, Wv]
    x = x + visual.positional_embedding.to(x.dtype)
    x = torch.cat([x, shallow.to(x.dtype).expand(B, -1, -1)], 1)  # [B, 1+P+n_ctx, Wv]
    x = visual.ln_pre(x)
    for i, block in enumerate(visual.transformer.resblocks):
        if 1 <= i <= len(deep):
            x = torch.cat([x[:, :-n_ctx], deep[i - 1].to(x.dtype).expand(B, -1, -1)], 1)
        x = block(x)
    pooled, _ = visual._pool(x)  # class token
    return F.normalize((pooled @ visual.proj).float(), dim=-1)


def build_adapters(dim, hidden=128):
    """Main visual, pseudo visual and text adapters: Linear(d→128) → ReLU → Linear(128→d) (§4.3)."""

    def make():
        return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    return nn.ModuleDict({"main": make(), "pseudo": make(), "text": make()})


def adapt(adapter, x, training=True, scale=0.01):
    """Residual adapter on L2-normalised embeddings: x + 0.01·A(x), re-normalised. Identity at inference."""
    return F.normalize(x + scale * adapter(x), dim=-1) if training else x


# -----------------------------------------------------------------------------
# §3.3 Dual-adapter training: the views, the batch streams, one step of L_PL + L_UL (+ L_L), the epoch, D_PL growth


def strong_view(size, normalize, crop_min=0.08, flip_p=0.5):
    """RandomResizedCrop(scale crop_min-1) + horizontal flip (§4.4: 0.08; the release flips always, p = 1)."""
    crop = T.RandomResizedCrop(size, scale=(crop_min, 1.0), interpolation=T.InterpolationMode.BICUBIC)
    return T.Compose([crop, T.RandomHorizontalFlip(flip_p), T.ToTensor(), normalize])


def two_views(img, weak, strong):
    """(weak view, strong view) of one image, for L_UL."""
    return weak(img), strong(img)


def subset(samples, idx, labels, transform):
    """The images `idx` of `samples` with the given (pseudo)labels, as (image, label, position) items."""
    return data.ImageList([samples[i] for i in idx.tolist()], labels, transform)


def endless_batches(dataset, batch_size, seed, workers=0):
    """Endless shuffled batches from a seeded sampler (no `iterator.next()` tricks)."""
    g = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(dataset, generator=g)
    loader = DataLoader(
        dataset, batch_size=min(batch_size, len(dataset)), sampler=sampler, drop_last=True, num_workers=workers
    )
    while True:
        yield from loader


@dataclass
class PromptTuner:
    """What §3.3 trains and with what, kept across iterations."""

    model: nn.Module  # the frozen open_clip CLIP
    learner: nn.ModuleDict  # MaPLe's prompts (build_maple)
    tokens: torch.Tensor  # [C, L] the class prompts' tokens, on the training device
    adapters: nn.ModuleDict  # main, pseudo and text adapters (build_adapters)
    opt: torch.optim.Optimizer  # SGD over the prompts and the adapters
    sched: torch.optim.lr_scheduler.LRScheduler  # warm-up + cosine, stepped every iteration
    scaler: torch.amp.GradScaler  # fp16 on CUDA: scaled losses, so small gradients survive; else a no-op
    scale: float  # CLIP's logit scale (100 for OpenAI's CLIP)


@torch.no_grad()
def class_prototypes(tuner, dataset, labels, text_features, batch_size=256):
    """v̄_c: mean main-adapter feature of each class's D_PL images, L2-normalised; text if a class has none."""
    device = tuner.tokens.device
    sums = torch.zeros_like(text_features)  # [C, D]
    for x, _, i in DataLoader(dataset, batch_size=batch_size):
        with common.autocast(device):
            v = adapt(tuner.adapters["main"], encode_image_maple(tuner.model, tuner.learner, x.to(device)))
        sums.index_add_(0, labels[i], v.float().cpu())
    empty = sums.norm(dim=1) == 0
    sums[empty] = text_features[empty]
    return F.normalize(sums, dim=-1)  # [C, D]


def epoch_margin(tuner, dataset, labels, sigma, m, released_formula=False):
    """§3.2 at the start of an epoch: S from the prompts' text features (no adapter) and the D_PL prototypes,
    then M = S ⊙ m from σ. dataset: the prototypes' images, labels [n] their classes. -> M [C, C] on the CPU"""
    with torch.no_grad(), common.autocast(tuner.tokens.device):
        t_plain = encode_text_maple(tuner.model, tuner.learner, tuner.tokens).float().cpu()  # [C, D]
    prototypes = class_prototypes(tuner, dataset, labels, t_plain)  # [C, D]
    return calibrated_margin(class_similarity(t_plain, prototypes), sigma, m, released_formula)


def train_step(tuner, batch, M, tau, ul_classes, weights=(1.0, 1.0)):
    """One iteration of L = w_PL·L_PL + w_UL·L_UL (+ L_L), logits z = scale·<v, t>. batch: ((x_main, y_main) from
    D_PL, (x_weak, x_strong) two views of unlabeled images, (x_labeled, y_labeled), empty outside SSL/TRZSL);
    M [C, C] on the device; ul_classes: the classes L_UL may pseudolabel; weights (w_PL, w_UL): 1, or 0 in the
    ablations --no-main / --no-pseudo. -> ((L_PL, L_UL, L_L) as floats, conf, ŷ, mask [B] on the CPU)"""
    (x_m, y_m), (x_w, x_s), (x_l, y_l) = batch
    device = tuner.tokens.device
    s = tuner.scale
    w_pl, w_ul = weights
    with common.autocast(device):
        t = adapt(tuner.adapters["text"], encode_text_maple(tuner.model, tuner.learner, tuner.tokens))  # [C, D]
        with torch.no_grad():  # pseudolabels from the main adapter on the weak view
            v_w = adapt(tuner.adapters["main"], encode_image_maple(tuner.model, tuner.learner, x_w.to(device)))
            conf, y_hat, mask = weak_pseudolabels(s * v_w @ t.T, ul_classes, tau)  # [B] each
        v = encode_image_maple(tuner.model, tuner.learner, torch.cat([x_m, x_l, x_s]).to(device))  # 3 views, 1 pass
        n_m = len(x_m)
        n_l = len(x_l)
        v_m = adapt(tuner.adapters["main"], v[: n_m + n_l])  # main adapter: D_PL and labeled images
        v_p = adapt(tuner.adapters["pseudo"], v[n_m + n_l :])  # pseudo adapter: strong view of unlabeled
        logits = s * v_m @ t.T  # [n_m + n_l, C]
        y = torch.cat([y_m, y_l]).to(device)  # [n_m + n_l]
        loss_pl = margin_cross_entropy(logits[:n_m], y[:n_m], M)
        loss_l = margin_cross_entropy(logits[n_m:], y[n_m:], M) if n_l else logits.sum() * 0
        loss_u = fixmatch_loss(s * v_p @ t.T, y_hat, mask, M)
    tuner.opt.zero_grad(set_to_none=True)
    tuner.scaler.scale(w_pl * loss_pl + w_ul * loss_u + loss_l).backward()
    tuner.scaler.step(tuner.opt)
    tuner.scaler.update()
    tuner.sched.step()
    losses = (w_pl * loss_pl.item(), w_ul * loss_u.item(), loss_l.item())
    return losses, conf.cpu(), y_hat.cpu(), mask.cpu()


def train_epoch(step, streams, M, iters, quiet=False):
    """One epoch of `iters` steps; step(batch, M) is train_step with its tuner and options bound. streams: endless
    batches "main" (D_PL), "unlabeled" (two views) and, in SSL/TRZSL, "labeled". -> stats (mean loss parts, mask
    rate, pl-acc counts, counts [C] of every confident prediction) and {pool position: (class, confidence)}, each
    image's most confident prediction of the epoch."""
    stats = {"pl": 0.0, "ul": 0.0, "l": 0.0, "mask": 0.0, "hit": 0, "n_conf": 0, "counts": torch.zeros(M.shape[0])}
    seen_pl = {}
    for _ in common.progress(range(iters), "train", quiet):
        x_m, y_m, _ = next(streams["main"])
        (x_w, x_s), y_u, u_pos = next(streams["unlabeled"])
        x_l, y_l, _ = next(streams["labeled"]) if "labeled" in streams else (x_m[:0], y_m[:0], None)
        losses, conf, y_hat, mask = step(((x_m, y_m), (x_w, x_s), (x_l, y_l)), M)
        keep = mask.bool()
        stats["counts"] += torch.bincount(y_hat[keep], minlength=M.shape[0]).float()
        for pos, c, p in zip(u_pos[keep].tolist(), y_hat[keep].tolist(), conf[keep].tolist()):
            seen_pl[pos] = max(seen_pl.get(pos, (c, p)), (c, p), key=lambda cp: cp[1])
        for key, v in zip(("pl", "ul", "l"), losses):
            stats[key] += v / iters
        stats["mask"] += mask.mean().item() / iters
        stats["hit"] += (y_hat[keep] == y_u[keep]).sum().item()
        stats["n_conf"] += int(keep.sum())
    return stats, seen_pl


def expand_dpl(dpl, seen_pl, pool_size, n_main, epoch, epochs, ratio):
    """D_PL expansion (§4.6): k_e = K + ⌊(min(1000, ⌊⌊|U|/C'⌋·ratio⌋) − K)·min(1, e / 0.7E)⌋ per class, from
    seen_pl {pool index: (class, confidence)}. As released, a class takes its top-k_e new images by confidence,
    then tops up with its old entries in order, so old entries drop out once there are k_e new ones."""
    k_max = min(1000, int(pool_size // len(dpl) * ratio))
    k_e = n_main + int((k_max - n_main) * min(1.0, epoch / (0.7 * epochs)))
    taken = set(torch.cat(list(dpl.values())).tolist())
    new = {}
    for c, old in dpl.items():
        fresh = sorted(((conf, i) for i, (cls, conf) in seen_pl.items() if cls == c and i not in taken), reverse=True)
        fresh = torch.tensor([i for _, i in fresh[:k_e]], dtype=torch.long)  # [≤ k_e]
        new[c] = torch.cat([fresh, old[: k_e - len(fresh)]])
    return new


# -----------------------------------------------------------------------------
# Evaluation: the test split with MaPLe's prompts only, scored per setting


@torch.no_grad()
def evaluate(model, learner, tokens, dataset, device, batch_size=256):
    """Test predictions with MaPLe prompts only: every adapter is off at inference (§3.3). -> pred [M]"""
    with common.autocast(device):
        t = encode_text_maple(model, learner, tokens.to(device))  # [C, D]
        loader = DataLoader(dataset, batch_size=batch_size)
        preds = [(encode_image_maple(model, learner, x.to(device)) @ t.T).argmax(1).cpu() for x, _, _ in loader]
    return torch.cat(preds)  # [M]


def harmonic_mean(a, b):
    """2ab / (a + b), 0 when both are 0 (TRZSL's seen/unseen summary)."""
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def setting_metrics(pred, labels, seen):
    """Test accuracy, plus seen / unseen accuracy and their harmonic mean in TRZSL (§1.2; `seen` empty otherwise)."""
    out = {"test_acc": common.accuracy(pred, labels)}
    if len(seen):
        is_seen = torch.isin(labels, seen)
        out["seen_acc"] = common.accuracy(pred[is_seen], labels[is_seen])
        out["unseen_acc"] = common.accuracy(pred[~is_seen], labels[~is_seen])
        out["harmonic_mean"] = harmonic_mean(out["seen_acc"], out["unseen_acc"])
    return out


# -----------------------------------------------------------------------------
# main: the steps in paper order


def main(argv=None):
    """CAP end to end (§4.1 split, zero-shot D_PL, §3.1 → §3.3, then the test set). -> the final metrics dict"""
    args = parse_args(argv)
    rel = common.release_settings(args, RELEASE_BEHAVIOURS)  # the released code's behaviours (default: none)
    run = common.start_run(args, f"runs/cap-{args.data}-{args.mode}-seed{args.seed}")
    device = run.device
    d = data.prepare(args, device, keep_test_in_pool=rel.eurosat_pool)
    names = d.classnames
    C = len(names)
    model = d.model.requires_grad_(False)
    scale = model.logit_scale.exp().item()  # CLIP's own logit scale: 100 for OpenAI's CLIP and the demo CLIP
    L, U, pseudo_classes, seen = split_setting(args.mode, d.y_train, C, args.split_seed, rel.ssl_draw)

    # zero-shot CLIP on the same split: the baseline and the source of the initial pseudolabels
    W, W_pl = zero_shot_classifiers(model, d.tokenizer, names, rel.quirk, device)  # [C, D] each
    zs = setting_metrics((d.f_test @ W.T).argmax(1), d.y_test, seen)
    probs = pseudolabel_probs(d.f_train, W_pl, pseudo_classes, scale)  # [N, C]
    zs_check = common.check_zeroshot(zs.get("harmonic_mean", zs["test_acc"]), args, "1 template", args.mode)
    zs_line = f"zero-shot {100 * zs['test_acc']:.2f}, 1 template"
    learner, tokens = build_maple(model.cpu(), d.tokenizer, names, args.prompt_depth)
    model = model.to(device)
    learner = learner.to(device)
    tokens = tokens.to(device)
    test_set = data.ImageList(d.test, d.y_test, d.preprocess)
    if args.eval_only:  # the prompts a training run saved, on the test split
        learner.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True)["learner"])
        metrics = setting_metrics(evaluate(model, learner, tokens, test_set, device), d.y_test, seen)
        print(f"eval-only | test acc {100 * metrics['test_acc']:.2f} ({zs_line})")
        return metrics
    initial = streaming_leaderboard if rel.leaderboard else initial_pseudolabels
    dpl = {c: U[i] for c, i in initial(probs[U], pseudo_classes, args.n_main).items()}  # D_PL, pool indices
    initial_dpl = {names[c]: v.tolist() for c, v in dpl.items()}
    dpl_acc_before = dpl_accuracy(dpl, d.y_train)

    # §3.1 concept alignment: mismatched classes, their descriptions, the relabelled D_PL
    mismatched = []
    source = "off"
    descriptions = {}
    chosen = {}
    if args.alignment:
        t = args.mismatch_t if args.mismatch_t is not None else math.ceil(len(pseudo_classes) / 10)
        zs_pool = None if rel.no_low_t else probs[U][:, pseudo_classes].argmax(1)  # [n] ids within pseudo_classes
        fast = args.detect == "fast"
        detect_kw = {"seed": args.seed, "n_init": args.kmeans_restarts, "scale": scale, "fast": fast}
        found, centres = detect_mismatch(d.f_train[U], W_pl[pseudo_classes], zs_pool, t, **detect_kw)
        mismatched = [pseudo_classes[i].item() for i in found]
        print(f"mismatch detection (t={t}): {[names[c] for c in mismatched] or 'none'}")
        named = load_descriptions(args.descriptions) if rel.described and args.descriptions else None
        described = mismatched if named is None else [c for c in pseudo_classes.tolist() if named.get(names[c])]
        source = "none"
        if described:
            domain = args.domain or data.DOMAINS.get(args.data, "object")
            shipped = data.SHIPPED_DESCRIPTIONS.get(args.data)
            llm = {"url": args.llm_url, "model": args.llm_model, "cache_dir": args.cache_dir}
            described_names = [names[c] for c in described]
            descriptions, source = class_descriptions(
                described_names,
                domain,
                args.n_descriptions,
                descriptions_file=args.descriptions,
                shipped=shipped,
                **llm,
            )
        desc_feats = {  # bare sentences, no template
            c: common.zero_shot_weights(model, d.tokenizer, descriptions[names[c]], ["{}"], device).cpu()
            for c in described
            if descriptions.get(names[c])
        }
        chosen = choose_descriptions(desc_feats, centres)  # {class: (description, cluster)}
        chosen.update({c: (0, None) for c in desc_feats if c not in chosen})  # no leftover cluster: the first one
        feats, ids = (d.f_train, torch.arange(len(d.f_train))) if rel.desc_all else (d.f_train[U], U)
        dpl = align_pseudolabels(dpl, feats, {c: desc_feats[c][i] for c, (i, _) in chosen.items()}, args.n_main, ids)
        for c, (i, _) in chosen.items():
            print(f"  {names[c]}: '{descriptions[names[c]][i]}'")
    alignment = {
        "dpl_acc_before_alignment": dpl_acc_before,
        "mismatched_classes": [names[c] for c in mismatched],
        "descriptions_source": source,
        "chosen_descriptions": {names[c]: descriptions[names[c]][i] for c, (i, _) in chosen.items()},
        "dpl_acc_after_alignment": dpl_accuracy(dpl, d.y_train),
    }
    aligned_dpl = {names[c]: v.tolist() for c, v in dpl.items()}

    # §3.3 the batch streams (unlabeled pool U: weak and strong views; labeled L, if any), prompts and adapters
    flip_p = 1.0 if rel.flip else 0.5
    strong = strong_view(model.visual.image_size[0], d.preprocess.transforms[-1], args.crop_min, flip_p=flip_p)
    pair = functools.partial(two_views, weak=d.preprocess, strong=strong)
    unlabeled = subset(d.train, U, d.y_train[U], pair)
    streams = {"unlabeled": endless_batches(unlabeled, args.batch_size, args.seed, args.workers)}
    if len(L):
        labeled = subset(d.train, L, d.y_train[L], d.preprocess)
        streams["labeled"] = endless_batches(labeled, args.batch_size, args.seed + 1, args.workers)
    adapters = build_adapters(d.f_train.shape[1]).to(device)
    opt = torch.optim.SGD([*learner.parameters(), *adapters.parameters()], args.lr, momentum=0.9, weight_decay=args.wd)
    total = args.epochs * args.iters
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: common.cosine(s, total, warmup=args.iters))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported())
    tuner = PromptTuner(model, learner, tokens, adapters, opt, sched, scaler, scale)
    ul_classes = (torch.arange(C) if rel.trzsl_all else pseudo_classes).to(device)  # what L_UL may pseudolabel
    weights = (float(args.main), float(args.pseudo))  # w_PL, w_UL: 0 in the ablations --no-main, --no-pseudo
    step = functools.partial(train_step, tuner, tau=args.tau, ul_classes=ul_classes, weights=weights)
    extra_protos = {c.item(): L[d.y_train[L] == c][: args.n_main] for c in seen}  # TRZSL: labeled seen images

    # §3.2-§3.3 the epochs: M rebuilt from σ and S (zero in epoch 0), one epoch, then D_PL's expansion (§4.6)
    M = torch.zeros(C, C)
    sigma = torch.zeros(C)
    expansions = []
    for epoch in range(args.epochs):
        t0 = time.time()
        idx, y_pl = flatten(dpl)
        dpl_set = subset(d.train, idx, y_pl, d.preprocess)
        streams["main"] = endless_batches(dpl_set, args.batch_size, args.seed + 2 + epoch, args.workers)
        if epoch > 0 and args.margin:
            p_idx, p_y = flatten({**dpl, **extra_protos}) if extra_protos else (idx, y_pl)
            proto_set = subset(d.train, p_idx, p_y, d.preprocess)
            M = epoch_margin(tuner, proto_set, p_y, sigma, args.margin_scale, rel.margin_formula)
        stats, seen_pl = train_epoch(step, streams, M.to(device), args.iters, args.quiet)
        sigma = prediction_counts(seen_pl, stats["counts"], seen, rel.sigma_repeats)
        pl_acc = stats["hit"] / max(1, stats["n_conf"])
        loss = stats["pl"] + stats["ul"] + stats["l"]
        common.check_finite(loss, f"the loss of epoch {epoch + 1}")
        print(
            f"epoch {epoch + 1}/{args.epochs} | loss {loss:.3f} (pl {stats['pl']:.3f}, ul {stats['ul']:.3f}, "
            f"l {stats['l']:.3f}) | mask {stats['mask']:.2f} | pl-acc {100 * pl_acc:.1f} | dpl {len(idx)} (acc "
            f"{100 * dpl_accuracy(dpl, d.y_train):.1f}) | margin max {M.max():.2f} mean {M.mean():.2f} | "
            f"{time.time() - t0:.1f}s",
            flush=True,
        )
        if args.expansion and epoch % args.expand_every == 0:  # §4.6: from confident predictions, epochs 0, 5, ...
            seen_pool = {U[pos].item(): v for pos, v in seen_pl.items()}
            dpl = expand_dpl(dpl, seen_pool, len(U), args.n_main, epoch, args.epochs, args.max_main_ratio)
            expansions.append({"epoch": epoch + 1, **{names[c]: v.tolist() for c, v in dpl.items()}})

    # test accuracy with the adapters off, next to zero-shot and the pseudolabels' accuracy
    pred = evaluate(model, learner, tokens, test_set, device)
    metrics = setting_metrics(pred, d.y_test, seen)
    metrics.update({f"zeroshot_{k}": v for k, v in zs.items()})
    metrics.update(pseudolabel_acc=pl_acc, mask_rate=stats["mask"], final_loss=loss)
    metrics.update(dpl_acc_final=dpl_accuracy(dpl, d.y_train))
    metrics.update({k: alignment[k] for k in ("dpl_acc_before_alignment", "dpl_acc_after_alignment")})
    prompts = {"learner": learner.state_dict(), "classnames": names, "clip_model": args.clip_model}
    common.save_atomic({**prompts, "prompt_depth": args.prompt_depth}, run.out_dir / "cap_prompts.pt")
    pseudolabels = {
        "initial_dpl": initial_dpl,
        "mismatched": alignment["mismatched_classes"],
        "descriptions": alignment["chosen_descriptions"],
        "dpl_after_alignment": aligned_dpl,
        "dpl_expansions": expansions,
        "classnames": names,
    }
    common.save_atomic(pseudolabels, run.out_dir / "pseudolabels.pt")
    summary = f"cap {args.mode} | test acc {100 * metrics['test_acc']:.2f} ({zs_line})"
    if len(seen):
        summary += f" | H {100 * metrics['harmonic_mean']:.2f}"
    summary += f" | pl-acc {100 * metrics['pseudolabel_acc']:.1f}"
    per_class = common.per_class_accuracy(pred, d.y_test, C)  # [C]
    extra = {
        "clip": {"model": args.clip_model, "pretrained": d.pretrained},
        "split": d.split_info,
        "zeroshot_check": zs_check,
        "concept_alignment": alignment,
        "release_behaviours": sorted(k for k, v in vars(rel).items() if v),
        "per_class_test_acc": dict(zip(names, per_class.tolist())),
    }
    return common.finish_run(run, metrics, summary, extra=extra)


if __name__ == "__main__":
    common.run_cli(main)
