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
The defaults are the paper's formulas; --as-released switches to the released code's behaviour wherever the
two differ (RELEASE_BEHAVIOURS; docs/cap.md measures each).

    python cap.py --data dtd --mode ul
    python cap.py --data eurosat --mode trzsl --llm-url http://localhost:11434 --llm-model llama3.1
    python cap.py --data demo --mode ul          # offline demo world, CPU, under a minute
"""
import os
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle OpenMP threads sleep (docs/usage.md)

import argparse  # noqa: E402
import functools
import math
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from torch.utils.data import DataLoader

import common
import data

# Per-dataset values of the release (docs/cap.md); ImageNet's fast detection; the demo's CPU-sized budget: 32 of its
# 300 images per class (the paper's 16 of ~100-1000), crops keeping half of its 32-px patterns (demo.py).
DATASET_DEFAULTS = {"flowers102": {"n_main": 6}, "fgvc_aircraft": {"tau": 0.5, "max_main_ratio": 0.6},
                    "imagenet": {"detect": "fast", "kmeans_restarts": 1},
                    "demo": {"mismatch_t": 2, "epochs": 10, "iters": 20, "n_main": 32, "crop_min": 0.5}}
# Where the released code (Noahwangyuchen/CAP) does something other than the paper's text. The paper's
# formulas are the default; --as-released turns on all of these, --release a,b some.
RELEASE_BEHAVIOURS = {
    "margin": "calibrated margin: S rows rescaled, weight Δ(1−r)/(1+r)",
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
RELEASE_PROMPT = "a photo of a {{}}{}"  # .format(name) -> "a photo of a {}name", the release's f"{template}{name}"

def parse_args(argv=None):
    """The shared flags (common.add_common_args) and CAP's; a dataset's DATASET_DEFAULTS apply unless typed."""
    p = argparse.ArgumentParser(description="CAP (ICML 2025)")
    common.add_common_args(p)
    p.add_argument("--mode", default="ul", choices=["ul", "ssl", "trzsl"],
                   help="ul (no labels), ssl (2 labels per class), trzsl (labels for the seen classes only)")
    p.add_argument("--split-seed", type=int, default=500, help="TRZSL seen/unseen split seed (§1.2: 500, 0, 200)")
    # §3.1 concept alignment
    p.add_argument("--mismatch-t", type=common.nonneg_int, default=None, help="stop removal at t classes (⌈C/10⌉)")
    p.add_argument("--detect", default="exact", choices=["exact", "fast"],
                   help="§3.1 K-Means after each removal: from scratch (paper) or warm-started (fast)")
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
    # ablations: each switches off one component of the method (all on in the paper; bench/cap_components.sh)
    common.add_ablation_switches(p, {"alignment": "§3.1 concept alignment", "margin": "§3.2 margin (off: plain CE)",
                                     "pseudo": "pseudo adapter (L_UL)", "main": "main adapter (L_PL)",
                                     "expansion": "§4.6 D_PL expansion"})
    p.add_argument("--checkpoint", default=None, help="prompt checkpoint to evaluate (with --eval-only)")
    p.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint on the test split and exit")
    # the released code (default: the paper's formulas)
    p.add_argument("--as-released", action="store_true", help="every behaviour of the released code at once")
    p.add_argument("--release", default="", help="comma-separated subset of: " + ", ".join(RELEASE_BEHAVIOURS))
    args = common.parse_args(p, argv, DATASET_DEFAULTS)
    if args.eval_only and not args.checkpoint:
        p.error("--eval-only needs --checkpoint FILE (written by a training run as cap_prompts.pt)")
    try:
        common.release_settings(args, RELEASE_BEHAVIOURS)
    except common.UserError as e:
        p.error(str(e))
    return args


# -----------------------------------------------------------------------------
# §3.1 Concept alignment: mismatch detection by iterative K-Means, class descriptions, relabelled D_PL

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
    in the paper and the release; fast (1,000 classes) warm-starts it from the last centres less the removed one.
    -> (Y_MM = Y_final ∩ Y_low-t, or Y_final for zs_pred None as released; leftover centres [|Y_final|, D])"""
    N, C = len(image_features), len(text_features)
    avg_size = N // C
    classes, images, init = list(range(C)), torch.arange(N, device=image_features.device), None
    while len(classes) > t and len(images) >= len(classes):
        R, f = len(classes), image_features[images]  # f [n, D]
        centres, assign, _ = common.kmeans(f, R, seed=seed, spherical=True, n_init=n_init, init=init)
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
        images, classes = images[~used], classes[:i] + classes[i + 1:]
        init = torch.cat([centres[:j], centres[j + 1:]]) if fast else None  # [R-1, D]
    k = min(len(classes), len(images))  # the leftover images' clusters, one per leftover class
    centres = common.kmeans(image_features[images], k, seed=seed, spherical=True, n_init=n_init)[0] if k else \
        image_features[:0]
    return (classes if zs_pred is None else intersect_low_t(classes, zs_pred, t, C)), centres

def intersect_low_t(final, zs_pred, t, num_classes):
    """Y_MM = Y_final ∩ Y_low-t, Y_low-t the t classes zero-shot predicts least (zs_pred [N]). -> class ids"""
    counts = torch.bincount(zs_pred, minlength=num_classes)  # [C]
    low_t = set(counts.argsort(stable=True)[:t].tolist())  # Y_low-t
    return [c for c in final if c in low_t]

# §3.1 class descriptions (the LLM request and its parsing: common.describe_classes) and the relabelled D_PL
def class_descriptions(classnames, domain, n, *, url=None, model=None, descriptions_file=None, cache_dir=None,
                       shipped=None):
    """Where descriptions come from, first match wins: (1) --descriptions FILE; (2) the LLM at --llm-url;
    (3) `shipped` (a dataset's own answers, data.shipped_descriptions), also when the LLM fails; (4) nothing:
    one warning, and the method goes on with class-name prompts. -> ({classname: [descriptions]}, source)"""
    if descriptions_file:
        found = data.load_descriptions(descriptions_file)  # may describe more classes than those asked for
        if missing := [c for c in classnames if not found.get(c)]:
            print(f"warning: {descriptions_file} has no descriptions for {missing}; they keep class-name prompts",
                  file=sys.stderr)
        return {c: d for c, d in found.items() if c in classnames and d}, f"file {descriptions_file}"
    if url and not model:
        raise common.UserError("--llm-url needs --llm-model (the model name the server serves)")
    why = "no --llm-url/--llm-model (an OpenAI-compatible server) and no --descriptions FILE"
    try:
        if url:
            return common.describe_classes(classnames, domain, n, url=url, model=model, cache_dir=cache_dir), \
                f"llm {model}"
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
    cand = sorted(((float(f[i] @ centres[j]), c, i, j) for c, f in desc_features.items()
                   for i in range(len(f)) for j in range(len(centres))), reverse=True)
    chosen, taken = {}, set()
    for _, c, i, j in cand:
        if c not in chosen and j not in taken:
            chosen[c] = (i, j)
            taken.add(j)
    return chosen

def initial_pseudolabels(probs, classes, K):
    """High-precision D_PL (§4.2): per class, the K most confident images predicted as that class,
    filled from the highest-probability remaining images if fewer are predicted. -> {class: idx [≤K]}"""
    pred = classes[probs[:, classes].argmax(1)]  # [N] restricted to the pseudolabeled classes
    return {c: (probs[:, c] + (pred == c).float()).topk(min(K, len(probs))).indices  # predicted as c first
            for c in classes.tolist()}

def streaming_leaderboard(probs, classes, K):
    """Initial D_PL as released (FPL's leaderboard). Images arrive in pool order and join the board of their
    predicted class if it has room or they beat its last entry (which drops out, never re-offered); otherwise
    they are offered to every other class by decreasing probability, joining each board with room or whose last
    entry they beat (so one image may sit on several). Appending with room does not re-sort. -> {class: idx [≤K]}"""
    cols = classes.tolist()
    boards = {c: [] for c in cols}
    for n, row in enumerate(probs[:, classes].tolist()):  # row [C'] over the pseudolabeled classes
        order = sorted(range(len(cols)), key=lambda j: -row[j])  # predicted class first
        b, p = boards[cols[order[0]]], row[order[0]]
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

def align_pseudolabels(dpl, image_features, description_features, K, ids=None):
    """Replace a mismatched class's D_PL by the top-K images by cosine to its chosen description.
    ids [N] maps a row of image_features to the index D_PL uses (default: the row itself)."""
    dpl = dict(dpl)
    for c, f in description_features.items():
        top = (image_features @ f).topk(min(K, len(image_features))).indices  # [K]
        dpl[c] = top if ids is None else ids[top]
    return dpl

def dpl_accuracy(dpl, labels):
    """Fraction of D_PL's pseudolabels {class: idx} that match the true labels."""
    idx, y = flatten(dpl)
    return common.accuracy(y, labels[idx])


# -----------------------------------------------------------------------------
# §3.3 Model: MaPLe multimodal prompts on a frozen open_clip ViT, plus three residual adapters

def build_maple(model, tokenizer, classnames, depth, n_ctx=2, ctx_init="a photo of a"):
    """MaPLe prompt learner (as released): n_ctx text context tokens initialised from ctx_init, coupled to vision
    prompts by Linear(text width → vision width), and depth−1 deep prompt pairs. -> (learner, tokens [C, L])"""
    w_txt, w_vis = model.token_embedding.embedding_dim, model.visual.conv1.out_channels
    depth = max(1, min(depth, len(model.transformer.resblocks), len(model.visual.transformer.resblocks)))
    with torch.no_grad():
        init = model.token_embedding(tokenizer([ctx_init]))[0, 1:1 + n_ctx].float()  # [n_ctx, Wt]: "a photo"
    deep = [nn.Parameter(torch.randn(n_ctx, w_txt) * 0.02) for _ in range(depth - 1)]
    learner = nn.ModuleDict({"ctx": nn.ParameterList([nn.Parameter(init.clone())]),
                             "proj": nn.Linear(w_txt, w_vis),  # shallow text→vision coupling
                             "deep_text": nn.ParameterList(deep),
                             "deep_proj": nn.ModuleList([nn.Linear(w_txt, w_vis) for _ in range(depth - 1)])})
    tokens = tokenizer([f"{ctx_init} {name}." for name in classnames])  # [C, L]
    return learner, tokens

def encode_text_maple(model, learner, tokens):
    """Text encoder with the context tokens replaced by learned prompts at layer 0 and deep layers. -> [C, D]"""
    C, n_ctx = len(tokens), learner["ctx"][0].shape[0]
    x = model.token_embedding(tokens)  # [C, L, Wt]
    x = torch.cat([x[:, :1], learner["ctx"][0].expand(C, -1, -1), x[:, 1 + n_ctx:]], 1)
    x = x + model.positional_embedding
    for i, block in enumerate(model.transformer.resblocks):
        if 1 <= i <= len(learner["deep_text"]):  # deep compound prompts replace the context slots
            x = torch.cat([x[:, :1], learner["deep_text"][i - 1].expand(C, -1, -1), x[:, 1 + n_ctx:]], 1)
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
    B, n_ctx = x.shape[0], shallow.shape[0]
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
    make = lambda: nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
    return nn.ModuleDict({"main": make(), "pseudo": make(), "text": make()})

def adapt(adapter, x, training=True, scale=0.01):
    """Residual adapter on L2-normalised embeddings: x + 0.01·A(x), re-normalised. Identity at inference."""
    return F.normalize(x + scale * adapter(x), dim=-1) if training else x


# -----------------------------------------------------------------------------
# §3.2 Confusion-aware calibrated margin (Eq. for L_m and M = S ⊙ m)

def class_similarity(text_features, prototypes):
    """S_ij = max(sim(v̄_i, v̄_j), sim(w_i, w_j)) from L2-normalised prototypes [C, D] and text [C, D]."""
    return torch.maximum(text_features @ text_features.T, prototypes @ prototypes.T)  # [C, C]

def calibrated_margin(S, sigma, m, as_released=False):
    """Margin matrix M [C, C] from similarity S [C, C] and prediction counts σ [C] (§3.2).
    paper:    δ_c = 1 − σ(c)/max σ, Δ = max δ, m_c = m·Δ·δ_c, M_yc = m_y·S_yc.
    released: S rows rescaled onto [min_i, 1], r = σ/max σ, Δ = (max r − min r)·m, M_yc = Δ(1−r_y)/(1+r_y)·S_yc."""
    if sigma.max() <= 0:  # nothing confidently predicted yet: no margin
        return torch.zeros_like(S)
    r = sigma.float() / sigma.max()  # [C]
    if not as_released:  # δ = 1 − r
        return (m * (1 - r).max() * (1 - r))[:, None] * S
    lo, hi = S.min(1, keepdim=True).values, S.max(1, keepdim=True).values
    S = lo + (S - lo) / (hi - lo).clamp_min(1e-12) * (1 - lo)
    w = (r.max() - r.min()) * m * (1 - r) / (1 + r)
    return w[:, None] * S

def margin_cross_entropy(logits, targets, M, reduction="mean"):
    """L_m(y, z) = −log e^{z_y} / (e^{z_y} + Σ_{c≠y} e^{z_c + M_yc}). logits [B, C], targets [B], M [C, C]."""
    off_target = 1 - F.one_hot(targets, logits.shape[1]).to(logits.dtype)  # margin only on c ≠ y
    return F.cross_entropy(logits + M[targets] * off_target, targets, reduction=reduction)

def fixmatch_loss(logits_s, y_hat, mask, M):
    """L_UL: margin CE on the strong view against weak-view pseudolabels, averaged over masked samples
    (sum / Σmask, as released, rather than FixMatch's / B). 0 when nothing passes τ."""
    loss = margin_cross_entropy(logits_s, y_hat, M, reduction="none")  # [B]
    return (loss * mask).sum() / mask.sum().clamp_min(1)


# -----------------------------------------------------------------------------
# §3.3 Dual-adapter training (paper §4; released settings in docs/cap.md)

def strong_view(size, normalize, crop_min=0.08, flip_p=0.5):
    """RandomResizedCrop(scale crop_min-1) + horizontal flip (§4.4: 0.08; the release flips always, p = 1)."""
    return T.Compose([T.RandomResizedCrop(size, scale=(crop_min, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(flip_p), T.ToTensor(), normalize])

def two_views(img, weak, strong):
    """(weak view, strong view) of one image, for L_UL."""
    return weak(img), strong(img)

def flatten(dpl):
    """{class: idx} -> (pool indices [n], pseudolabels [n])."""
    idx = torch.cat(list(dpl.values()))
    return idx, torch.cat([torch.full((len(v),), c, dtype=torch.long) for c, v in dpl.items()])

@torch.no_grad()
def class_prototypes(tr, dataset, labels, text_features, batch_size=256):
    """v̄_c: mean main-adapter feature of each class's D_PL images, L2-normalised; text if a class has none."""
    sums = torch.zeros_like(text_features)  # [C, D]
    for x, _, i in DataLoader(dataset, batch_size=batch_size):
        with common.autocast(tr.device):
            v = adapt(tr.adapters["main"], encode_image_maple(tr.model, tr.learner, x.to(tr.device)))
        sums.index_add_(0, labels[i], v.float().cpu())
    empty = sums.norm(dim=1) == 0
    sums[empty] = text_features[empty]
    return F.normalize(sums, dim=-1)  # [C, D]

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
        new[c] = torch.cat([fresh, old[:k_e - len(fresh)]])
    return new

def prediction_counts(seen_pl, counts, seen, repeats=False):
    """σ [C] for the margin (§3.2): last epoch's confident predictions per class, one per image (paper:
    "samples"), or all of them, an image drawn twice counting twice (release). Never-pseudolabeled classes count
    too (TRZSL as released); seen classes are then set to max σ: r = 1, no margin, as released."""
    sigma = counts.clone() if repeats else \
        torch.bincount(torch.tensor([c for c, _ in seen_pl.values()], dtype=torch.long), minlength=len(counts)).float()
    sigma[seen] = sigma.max()
    return sigma  # [C]

def weak_pseudolabels(logits_w, classes, tau):
    """L_UL's FixMatch pseudolabels from weak-view logits [B, C], softmax over `classes` only: the
    pseudolabeled classes (paper; TRZSL: unseen), or all classes (TRZSL as released). -> conf, ŷ, mask [B]"""
    allowed = torch.full_like(logits_w[0], float("-inf"))  # [C]
    allowed[classes] = 0
    conf, y_hat = (logits_w + allowed).softmax(1).max(1)  # [B], [B]
    return conf, y_hat, (conf > tau).float()

def train_step(tr, M):
    """One iteration of L = L_PL + L_UL (+ L_L), logits z = scale·<v, t>, on tr (training_state).
    -> (losses, conf, ŷ, mask, y_u, pool positions)"""
    dev, s = tr.device, tr.scale
    x_m, y_m, _ = next(tr.batches["main"])
    (x_w, x_s), y_u, u_pos = next(tr.batches["unlabeled"])
    x_l, y_l, _ = next(tr.batches["labeled"]) if "labeled" in tr.batches else (x_m[:0], y_m[:0], None)
    with common.autocast(dev):
        t = adapt(tr.adapters["text"], encode_text_maple(tr.model, tr.learner, tr.tokens))  # [C, D]
        with torch.no_grad():  # pseudolabels from the main adapter on the weak view
            v_w = adapt(tr.adapters["main"], encode_image_maple(tr.model, tr.learner, x_w.to(dev)))
            conf, y_hat, mask = weak_pseudolabels(s * v_w @ t.T, tr.ul_classes, tr.tau)  # [B] each
        v = encode_image_maple(tr.model, tr.learner, torch.cat([x_m, x_l, x_s]).to(dev))  # one pass, 3 views
        n_m, n_l = len(x_m), len(x_l)
        v_m = adapt(tr.adapters["main"], v[:n_m + n_l])  # main adapter: D_PL and labeled images
        v_p = adapt(tr.adapters["pseudo"], v[n_m + n_l:])  # pseudo adapter: strong view of unlabeled
        logits, y = s * v_m @ t.T, torch.cat([y_m, y_l]).to(dev)
        loss_pl = margin_cross_entropy(logits[:n_m], y[:n_m], M)
        loss_l = margin_cross_entropy(logits[n_m:], y[n_m:], M) if n_l else logits.sum() * 0
        loss_u = fixmatch_loss(s * v_p @ t.T, y_hat, mask, M)
    tr.opt.zero_grad(set_to_none=True)
    w_pl, w_ul = float(tr.use_main), float(tr.use_pseudo)  # 1, or 0 in the ablations --no-main / --no-pseudo
    tr.scaler.scale(w_pl * loss_pl + w_ul * loss_u + loss_l).backward()  # fp16 on CUDA: scaled, small gradients survive
    tr.scaler.step(tr.opt)
    tr.scaler.update()
    tr.sched.step()
    return (w_pl * loss_pl.item(), w_ul * loss_u.item(), loss_l.item()), conf.cpu(), y_hat.cpu(), mask.cpu(), y_u, u_pos

def train_epoch(tr, M, iters, quiet):
    """One epoch. -> stats (mean loss parts, mask rate, pl-acc counts, counts [C] of every confident prediction)
    and {pool position: (class, confidence)}, each image's most confident prediction of the epoch."""
    stats, seen_pl = {"pl": 0.0, "ul": 0.0, "l": 0.0, "mask": 0.0, "hit": 0, "n_conf": 0}, {}
    stats["counts"], M = torch.zeros(M.shape[0]), M.to(tr.device)
    for _ in common.progress(range(iters), "train", quiet):
        losses, conf, y_hat, mask, y_u, u_pos = train_step(tr, M)
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

@torch.no_grad()
def evaluate(model, learner, tokens, dataset, device, batch_size=256):
    """Test predictions with MaPLe prompts only: every adapter is off at inference (§3.3). -> pred [M]"""
    with common.autocast(device):
        t = encode_text_maple(model, learner, tokens.to(device))  # [C, D]
        return torch.cat([(encode_image_maple(model, learner, x.to(device)) @ t.T).argmax(1).cpu()
                          for x, _, _ in DataLoader(dataset, batch_size=batch_size)])  # [M]


# -----------------------------------------------------------------------------
# main: the steps in paper order

def zero_shot(d, pseudo_classes, seen, quirk, device):
    """Zero-shot CLIP with 'a photo of a {}.' (the baseline) and the pseudolabel softmax over the pseudolabeled
    classes, from the release's prompt with quirk. -> (test metrics, probs [N, C], W_pl [C, D])"""
    W = common.zero_shot_weights(d.model, d.tokenizer, d.classnames, common.TEMPLATES_SINGLE, device).cpu()
    W_pl = common.zero_shot_weights(d.model, d.tokenizer, d.classnames, [RELEASE_PROMPT], device).cpu() if quirk else W
    not_pl = torch.ones(len(d.classnames), dtype=torch.bool)
    not_pl[pseudo_classes] = False  # TRZSL: the softmax covers the unseen classes only
    probs = (d.scale * d.f_train @ W_pl.T).masked_fill(not_pl, float("-inf")).softmax(1)  # [N, C]
    return data.setting_metrics((d.f_test @ W.T).argmax(1), d.y_test, seen), probs, W_pl

def concept_alignment(args, d, U, pseudo_classes, probs, W_pl, rel, device):
    """§3.1 end to end: D_PL, mismatch detection, LLM descriptions, relabelled D_PL. -> (dpl, report)
    probs [N, C] and W_pl [C, D] come from the pseudolabel prompt (the release's quirk changes it)."""
    f_u, names = d.f_train[U], d.classnames
    initial = streaming_leaderboard if rel.leaderboard else initial_pseudolabels
    dpl = {c: U[i] for c, i in initial(probs[U], pseudo_classes, args.n_main).items()}  # pool indices
    by_name = lambda dpl: {names[c]: v.tolist() for c, v in dpl.items()}  # {class name: pool indices}
    report = {"initial_dpl": by_name(dpl), "dpl_acc_before_alignment": dpl_accuracy(dpl, d.y_train),
              "mismatched_classes": [], "descriptions_source": "off", "chosen_descriptions": {}}
    if args.alignment:
        t = args.mismatch_t if args.mismatch_t is not None else math.ceil(len(pseudo_classes) / 10)
        zs_local = None if rel.no_low_t else probs[U][:, pseudo_classes].argmax(1)  # [n] ids within pseudo_classes
        mm_local, centres = detect_mismatch(f_u, W_pl[pseudo_classes], zs_local, t, seed=args.seed, scale=d.scale,
                                            n_init=args.kmeans_restarts, fast=args.detect == "fast")
        mismatched = [pseudo_classes[i].item() for i in mm_local]
        print(f"mismatch detection (t={t}): {[names[c] for c in mismatched] or 'none'}")
        named = data.load_descriptions(args.descriptions) if rel.described and args.descriptions else None
        described = mismatched if named is None else [c for c in pseudo_classes.tolist() if named.get(names[c])]
        descriptions, source = class_descriptions(
            [names[c] for c in described], args.domain or data.DOMAINS.get(args.data, "object"), args.n_descriptions,
            url=args.llm_url, model=args.llm_model, descriptions_file=args.descriptions, cache_dir=args.cache_dir,
            shipped=data.shipped_descriptions(args.data)) if described else ({}, "none")
        desc_feats = {c: common.zero_shot_weights(d.model, d.tokenizer, descriptions[names[c]], ["{}"], device).cpu()
                      for c in described if descriptions.get(names[c])}  # bare sentences, no template
        chosen = choose_descriptions(desc_feats, centres)
        chosen.update({c: (0, None) for c in desc_feats if c not in chosen})  # no leftover cluster: the first one
        feats, ids = (d.f_train, torch.arange(len(d.f_train))) if rel.desc_all else (f_u, U)
        dpl = align_pseudolabels(dpl, feats, {c: desc_feats[c][i] for c, (i, _) in chosen.items()}, args.n_main, ids)
        report.update(mismatched_classes=[names[c] for c in mismatched], descriptions_source=source,
                      chosen_descriptions={names[c]: descriptions[names[c]][i] for c, (i, _) in chosen.items()})
        for name, text in report["chosen_descriptions"].items():
            print(f"  {name}: '{text}'")
    report.update(dpl_acc_after_alignment=dpl_accuracy(dpl, d.y_train), aligned_dpl=by_name(dpl))
    return dpl, report

def training_state(args, d, rel, learner, tokens, ul_classes, L, U):
    """§3.3 the batch streams (unlabeled pool U: weak and strong views; labeled L, if any), the adapters, SGD, the
    warm-up + cosine schedule (per iteration) and the grad scaler: what train_step reads."""
    device, B, make = tokens.device, args.batch_size, functools.partial(data.subset, d.train)
    strong = strong_view(d.model.visual.image_size[0], d.preprocess.transforms[-1], args.crop_min,
                         flip_p=1.0 if rel.flip else 0.5)
    pair = functools.partial(two_views, weak=d.preprocess, strong=strong)
    batches = {"unlabeled": data.forever(make(d.y_train[U], U, pair), B, args.seed, args.workers)}
    if len(L):
        batches["labeled"] = data.forever(make(d.y_train[L], L, d.preprocess), B, args.seed + 1, args.workers)
    adapters = build_adapters(d.f_train.shape[1]).to(device)
    opt = torch.optim.SGD([*learner.parameters(), *adapters.parameters()], args.lr, momentum=0.9, weight_decay=args.wd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: common.cosine(s, args.epochs * args.iters, args.iters))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported())
    return SimpleNamespace(model=d.model, learner=learner, adapters=adapters, opt=opt, sched=sched, scaler=scaler,
                           batches=batches, tokens=tokens, device=device, scale=d.scale, tau=args.tau, unlabeled_pool=U,
                           ul_classes=ul_classes.to(device), use_main=args.main, use_pseudo=args.pseudo)

def train(args, d, rel, tr, dpl, extra_protos, seen):
    """§3.2-§3.3 the epochs: margin M rebuilt each epoch from σ and S, then one epoch, then D_PL expansion.
    -> (dpl, stats of the last epoch, its pl-acc, D_PL after each expansion)"""
    C, U, make = len(d.classnames), tr.unlabeled_pool, functools.partial(data.subset, d.train)
    M, sigma, expansions = torch.zeros(C, C), torch.zeros(C), []
    for epoch in range(args.epochs):
        t0 = time.time()
        idx, y_pl = flatten(dpl)
        tr.batches["main"] = data.forever(make(y_pl, idx, d.preprocess), args.batch_size, args.seed + 2 + epoch,
                                          args.workers)
        if epoch > 0 and args.margin:  # §3.2: M rebuilt at the start of every epoch, zero in epoch 0
            with torch.no_grad(), common.autocast(tr.device):
                t_plain = encode_text_maple(tr.model, tr.learner, tr.tokens).float().cpu()  # [C, D], no adapter
            p_idx, p_y = flatten({**dpl, **extra_protos}) if extra_protos else (idx, y_pl)
            protos = class_prototypes(tr, make(p_y, p_idx, d.preprocess), p_y, t_plain)
            M = calibrated_margin(class_similarity(t_plain, protos), sigma, args.margin_scale, rel.margin)
        stats, seen_pl = train_epoch(tr, M, args.iters, args.quiet)
        sigma = prediction_counts(seen_pl, stats["counts"], seen, rel.sigma_repeats)
        pl_acc, loss = stats["hit"] / max(1, stats["n_conf"]), stats["pl"] + stats["ul"] + stats["l"]
        common.check_finite(loss, f"the loss of epoch {epoch + 1}")
        print(f"epoch {epoch + 1}/{args.epochs} | loss {loss:.3f} (pl {stats['pl']:.3f}, ul {stats['ul']:.3f}, "
              f"l {stats['l']:.3f}) | mask {stats['mask']:.2f} | pl-acc {100 * pl_acc:.1f} | dpl {len(idx)} (acc "
              f"{100 * dpl_accuracy(dpl, d.y_train):.1f}) | margin max {M.max():.2f} mean {M.mean():.2f} | "
              f"{time.time() - t0:.1f}s", flush=True)
        if args.expansion and epoch % args.expand_every == 0:  # §4.6: from confident predictions, epochs 0, 5, ...
            seen_pool = {U[pos].item(): v for pos, v in seen_pl.items()}
            dpl = expand_dpl(dpl, seen_pool, len(U), args.n_main, epoch, args.epochs, args.max_main_ratio)
            expansions.append({"epoch": epoch + 1, **{d.classnames[c]: v.tolist() for c, v in dpl.items()}})
    return dpl, stats, pl_acc, expansions

def save_outputs(out_dir, args, d, learner, report, expansions):
    """The prompts (cap_prompts.pt) and the pseudolabels (pseudolabels.pt, docs/usage.md)."""
    common.save_atomic({"learner": learner.state_dict(), "classnames": d.classnames, "clip_model": args.clip_model,
                        "prompt_depth": args.prompt_depth}, out_dir / "cap_prompts.pt")
    common.save_atomic({"initial_dpl": report["initial_dpl"], "mismatched": report["mismatched_classes"],
                        "descriptions": report["chosen_descriptions"], "dpl_after_alignment": report["aligned_dpl"],
                        "dpl_expansions": expansions, "classnames": d.classnames}, out_dir / "pseudolabels.pt")

def main(argv=None):
    """CAP end to end (§3.1 → §3.3, then the test set). -> the final metrics dict"""
    args = parse_args(argv)
    rel = common.release_settings(args, RELEASE_BEHAVIOURS)  # the released code's behaviours (default: none)
    run = common.start_run(args, f"runs/cap-{args.data}-{args.mode}-seed{args.seed}")
    d = common.prepare(args, run.device, keep_test_in_pool=rel.eurosat_pool)
    C, d.model = len(d.classnames), d.model.requires_grad_(False)
    d.scale = d.model.logit_scale.exp().item()  # CLIP's own logit scale: 100 for OpenAI's CLIP and the demo CLIP
    L, U, pseudo_classes, seen = data.split_setting(args.mode, d.y_train, C, args.split_seed, rel.ssl_draw)
    # zero-shot CLIP on the same split: the baseline and the source of the initial pseudolabels
    zs, probs, W_pl = zero_shot(d, pseudo_classes, seen, rel.quirk, run.device)
    zs_check = data.check_zeroshot(zs.get("harmonic_mean", zs["test_acc"]), args, "1 template", args.mode)
    zs_line = f"zero-shot {100 * zs['test_acc']:.2f}, 1 template"
    learner, tokens = build_maple(d.model.cpu(), d.tokenizer, d.classnames, args.prompt_depth)
    d.model, learner, tokens = d.model.to(run.device), learner.to(run.device), tokens.to(run.device)
    test_set = data.ImageList(d.test, d.y_test, d.preprocess)
    if args.eval_only:  # the prompts a training run saved, on the test split
        learner.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True)["learner"])
        metrics = data.setting_metrics(evaluate(d.model, learner, tokens, test_set, run.device), d.y_test, seen)
        print(f"eval-only | test acc {100 * metrics['test_acc']:.2f} ({zs_line})")
        return metrics
    # §3.1 concept alignment -> high-precision pseudolabels D_PL
    dpl, report = concept_alignment(args, d, U, pseudo_classes, probs, W_pl, rel, run.device)
    # §3.2-§3.3 dual-adapter prompt tuning with the calibrated margin
    ul_classes = torch.arange(C) if rel.trzsl_all else pseudo_classes  # what L_UL may pseudolabel
    tr = training_state(args, d, rel, learner, tokens, ul_classes, L, U)
    extra_protos = {c.item(): L[d.y_train[L] == c][:args.n_main] for c in seen}  # TRZSL: labeled seen images
    dpl, stats, pl_acc, expansions = train(args, d, rel, tr, dpl, extra_protos, seen)
    # test accuracy with the adapters off, next to zero-shot and the pseudolabels' accuracy
    pred = evaluate(d.model, learner, tokens, test_set, run.device)
    metrics = data.setting_metrics(pred, d.y_test, seen)
    metrics.update({f"zeroshot_{k}": v for k, v in zs.items()}, pseudolabel_acc=pl_acc, mask_rate=stats["mask"],
                   final_loss=stats["pl"] + stats["ul"] + stats["l"], dpl_acc_final=dpl_accuracy(dpl, d.y_train),
                   **{k: report[k] for k in ("dpl_acc_before_alignment", "dpl_acc_after_alignment")})
    save_outputs(run.out_dir, args, d, learner, report, expansions)
    summary = (f"cap {args.mode} | test acc {100 * metrics['test_acc']:.2f} ({zs_line})"
               + (f" | H {100 * metrics['harmonic_mean']:.2f}" if len(seen) else "")
               + f" | pl-acc {100 * metrics['pseudolabel_acc']:.1f}")
    return common.finish_run(run, metrics, summary, extra={
        "clip": {"model": args.clip_model, "pretrained": d.pretrained}, "split": d.split_info,
        "zeroshot_check": zs_check, "concept_alignment": {k: v for k, v in report.items() if not k.endswith("_dpl")},
        "release_behaviours": sorted(k for k, v in vars(rel).items() if v),
        "per_class_test_acc": dict(zip(d.classnames, common.per_class_accuracy(pred, d.y_test, C).tolist()))})


if __name__ == "__main__":
    common.run_cli(main)
