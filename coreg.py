"""Co-Reg: CLIP as a noisy partial annotator, then collaborative consistency regularisation.

Wang et al., "Pre-Trained Vision-Language Models as Partial Annotators" (arXiv 2406.18550).
1. Annotate: CLIP labels every training image once per prompt template (27 by default); the union of
   the per-template top-1 classes is the image's candidate set S, which may miss the true class.
2. Train two small networks from scratch (PreAct-ResNet-18) on (image, S): a partial-CE warm-up, then
   each epoch each network splits the pool into clean / noisy by a 2-component GMM on its loss
   (co-divide), and the *other* network trains on that split with co-refined (clean) and co-guessed
   (noisy) sharpened targets under MixUp (DivideMix-style), plus a prototype alignment loss and a
   noisy supervised contrastive loss (PiCO-style, with a MoCo queue).
3. Deploy the two networks (summed logits): no CLIP at test time, a fraction of its size.
"Step n" refers to the numbered summary in docs/coreg.md, which also lists where the released code
(Portugas0807/Co-Reg) differs from a plain reading and what we follow; equation numbers are not cited
because the paper's numbering was not available offline.

    python coreg.py --data eurosat --image-size 64 --epochs 100       # paper setting (GPU)
    python coreg.py --data demo     # = --arch narrow --epochs 16 --warm-up 8 --rampup 6 --start-cont 2 --batch-size 64 --lr 0.05
    python coreg.py --data synthetic --clip-model tiny --pretrained none --arch narrow --epochs 3 --warm-up 1
"""
import argparse
import copy
import json
import math
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

import common

EMB_DIM = 128       # projection-head output
MOCO_M = 0.999      # key-encoder and prototype EMA momentum
TAU_PROTO = 0.3     # prototype similarity temperature
TAU_CONT = 0.07     # contrastive temperature
W_PROTO = 0.1       # weight_protocont
W_CONT = 0.1        # weight_supcont_sepa
HISTORY = 5         # co-divide averages the normalised loss over this many epochs


# The demo world (demo.py) on a CPU: a narrow CNN and a short schedule in which λ_u still reaches full weight
# (warm-up 8 + a ramp of 6 epochs instead of 16 + 2 at full weight: under 3 minutes on 2 cores); explicit flags
# still win.
DEMO_DEFAULTS = dict(arch="narrow", epochs=16, warm_up=8, rampup=6, start_cont=2, batch_size=64, lr=0.05)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(p)
    # annotation (step 1)
    p.add_argument("--templates", default="small", choices=["small", "imagenet"],
                   help="prompt set: the 27 imagenet_templates_small (paper default) or the 80 ImageNet ones")
    p.add_argument("--cand-mode", default="union", choices=["union", "topk", "ratio"],
                   help="candidate set: union of per-template top-1 (paper), top-k of the mean, or p >= 0.5 p_max")
    p.add_argument("--cand-k", type=common.positive_int, default=5, help="k for --cand-mode topk / ratio")
    # networks
    p.add_argument("--arch", default="preact18", choices=["preact18", "narrow"],
                   help="PreAct-ResNet-18 (paper) or a 4-conv CNN for fast CPU runs")
    p.add_argument("--image-size", type=common.positive_int, default=32, help="training resolution: 32 (CIFAR/SVHN/FMNIST) or 64")
    p.add_argument("--queue-size", type=common.positive_int, default=8192, help="MoCo queue length")
    # method
    p.add_argument("--warm-up", type=common.nonneg_int, default=10,
                   help="partial-CE warm-up epochs; 10 is DivideMix's CIFAR-10 value, chosen for the 100-epoch "
                        "runs (the released code uses 50 for its 800-epoch runs, 100 on CIFAR-100)")
    p.add_argument("--start-cont", type=common.nonneg_int, default=10, help="contrastive loss starts this many epochs after warm-up")
    p.add_argument("--p-threshold", type=float, default=0.5, help="clean if GMM clean probability w > this")
    p.add_argument("--T", type=float, default=0.5, help="sharpening temperature")
    p.add_argument("--alpha", type=float, default=4.0, help="MixUp Beta(α, α)")
    p.add_argument("--lambda-u", type=float, default=1.0, help="weight of the noisy-split MSE loss λ_u")
    p.add_argument("--rampup", type=common.positive_int, default=16,
                   help="epochs of the linear λ_u ramp-up after warm-up (release: 16; demo: 8)")
    p.add_argument("--prior", default="uniform", choices=["uniform", "clip"],
                   help="DA target: uniform (released default, --uniform_prior 1) or CLIP's mean annotation")
    # ablations: each switches off one component of the method (all on in the paper)
    p.add_argument("--da", action=argparse.BooleanOptionalAction, default=True, help="distribution alignment")
    p.add_argument("--mixup", action=argparse.BooleanOptionalAction, default=True, help="MixUp of the views")
    p.add_argument("--proto", action=argparse.BooleanOptionalAction, default=True, help="prototype alignment loss")
    p.add_argument("--supcon", action=argparse.BooleanOptionalAction, default=True, help="noisy SupCon loss")
    p.add_argument("--divide", default="co", choices=["co", "self"],
                   help="co: each network trains on the other's division (paper); self: on its own")
    # optimisation
    p.add_argument("--epochs", type=common.positive_int, default=100, help="training epochs (README: 100 for EuroSAT/FMNIST/FER/GTSRB)")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (momentum 0.9, wd 5e-4)")
    p.add_argument("--cosine-epochs", type=common.positive_int, default=None,
                   help="cosine period; default = --epochs (the released code hard-codes 800)")
    if p.parse_args(argv).data == "demo":
        p.set_defaults(**DEMO_DEFAULTS)
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# Step 1. Annotation: CLIP with several prompt templates as a noisy partial annotator

@torch.no_grad()
def template_weights(model, tokenizer, classnames, templates, device, quiet=False):
    """One text classifier per prompt template. -> W [T, C, D], L2-normalised."""
    return torch.stack([common.zero_shot_weights(model, tokenizer, classnames, [t], device).cpu()
                        for t in common.progress(templates, "annotate", quiet)])


def annotate(f_train, W):
    """p^j = softmax(100 · f · W_jᵀ) for every template j. f_train [N, D], W [T, C, D] -> probs [T, N, C]."""
    return (100 * f_train @ W.transpose(1, 2)).softmax(-1)


def candidate_sets(probs, mode="union", k=5, ratio=0.5):
    """Candidate label sets S from per-template probabilities probs [T, N, C] -> bool [N, C].

    union: ⋃_j {argmax_c p^j_c} (paper default); topk: the k most probable classes of the template-mean;
    ratio: among those k, the classes with p >= ratio · p_max.
    """
    C = probs.shape[-1]
    if mode == "union":
        return F.one_hot(probs.argmax(-1), C).bool().any(0)  # [N, C]
    p = probs.mean(0)  # [N, C]
    top = p.topk(min(k, C), dim=1)
    keep = torch.ones_like(top.values, dtype=torch.bool) if mode == "topk" else \
        top.values >= ratio * top.values[:, :1]
    return torch.zeros_like(p, dtype=torch.bool).scatter_(1, top.indices, keep)


def annotation_stats(probs, S, labels):
    """Mean |S|, coverage P(y ∈ S), and the accuracy of the single noisy CLIP label (template 0)."""
    noisy_label = probs[0].argmax(1)  # [N]
    return {"cand_size": S.sum(1).float().mean().item(),
            "cand_coverage": S[torch.arange(len(labels)), labels].float().mean().item(),
            "noisy_label_acc": common.accuracy(noisy_label, labels)}


# -----------------------------------------------------------------------------
# Images in memory and their augmentations

def decode_images(samples, labels, size, workers=0):
    """Decode every image once, Resize + CenterCrop to `size`. -> uint8 [N, 3, size, size]"""
    tf = v2.Compose([v2.Resize(size), v2.CenterCrop(size), v2.PILToTensor()])
    loader = torch.utils.data.DataLoader(common.ImageList(samples, labels, tf), batch_size=512, num_workers=workers)
    return torch.cat([x for x, _, _ in loader])


def weak_augment(x, g):
    """RandomCrop(size, padding=size/8, zero fill) + horizontal flip, per image, on a uint8 batch [B, 3, H, W]."""
    B, C, H, W = x.shape
    pad = H // 8
    xp = F.pad(x, (pad, pad, pad, pad))  # [B, 3, H+2p, W+2p]
    i = torch.randint(0, 2 * pad + 1, (B, 1), generator=g) + torch.arange(H)  # [B, H] rows to keep
    j = torch.randint(0, 2 * pad + 1, (B, 1), generator=g) + torch.arange(W)  # [B, W] cols to keep
    out = xp[torch.arange(B)[:, None, None, None], torch.arange(C)[None, :, None, None],
             i[:, None, :, None], j[:, None, None, :]]  # [B, 3, H, W]
    flip = torch.rand(B, generator=g) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


RANDAUG = v2.RandAugment(num_ops=1, magnitude=5)


def strong_augment(x, g, chunk=16):
    """Weak view + torchvision RandAugment(1, 5). The released code uses its own `RandomAugment(1, 5)`
    variant; ours is torchvision's, applied per chunk of 16 images (one op per chunk: 20x faster on CPU)."""
    x = weak_augment(x, g)
    with torch.random.fork_rng(devices=[]):  # torchvision draws from the global RNG: seed it from g, locally
        torch.manual_seed(int(torch.randint(2 ** 62, (1,), generator=g)))
        return torch.cat([RANDAUG(c) for c in x.split(chunk)])


def to_input(x, mean, std, device):
    """uint8 [B, 3, H, W] -> normalised float32 on device, channels-last in memory (the shape is unchanged; the
    convolutions run 1.6-1.8x faster on a CPU this way, measured on the narrow CNN at batch 256)."""
    return ((x.to(device).float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)


# -----------------------------------------------------------------------------
# Networks: PreAct-ResNet-18 (or a narrow CNN) + linear classifier + 128-d projection head

class PreActBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        return self.conv2(F.relu(self.bn2(self.conv1(out)))) + skip


def encoder(arch):
    """-> (nn.Sequential image -> features [B, F], F). Adaptive pooling so 32- and 64-px images both work."""
    if arch == "preact18":
        layers, cin = [nn.Conv2d(3, 64, 3, 1, 1, bias=False)], 64
        for stage, cout in enumerate((64, 128, 256, 512)):
            for b in range(2):
                layers.append(PreActBlock(cin, cout, 2 if stage > 0 and b == 0 else 1))
                cin = cout
        layers += [nn.BatchNorm2d(cin), nn.ReLU()]
    else:  # narrow: 4 × (conv-BN-ReLU), widths 16..128, max-pool between (~0.1 M parameters)
        layers, cin = [], 3
        for stage, cout in enumerate((16, 32, 64, 128)):
            layers += [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            layers += [nn.MaxPool2d(2)] if stage < 3 else []
            cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), cin


class CoRegNet(nn.Module):
    """image -> (logits [B, C], L2-normalised embedding [B, 128]); `head` is used for training only."""

    def __init__(self, arch, num_classes):
        super().__init__()
        self.encoder, dim = encoder(arch)
        self.fc = nn.Linear(dim, num_classes)
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, EMB_DIM))

    def forward(self, x):
        h = self.encoder(x)  # [B, F]
        return self.fc(h), F.normalize(self.head(h), dim=1)


def build_net(arch, num_classes, seed, device):
    with torch.random.fork_rng(devices=[]):  # nn.init uses the global RNG: seed it locally
        torch.manual_seed(seed)
        return CoRegNet(arch, num_classes).to(device, memory_format=torch.channels_last)  # see to_input


@torch.no_grad()
def ema_update(key_net, net, m=MOCO_M):
    """MoCo key encoder: θ_k ← m θ_k + (1 − m) θ_q; BN buffers copied."""
    for pk, pq in zip(key_net.parameters(), net.parameters()):
        pk.mul_(m).add_(pq, alpha=1 - m)
    for bk, bq in zip(key_net.buffers(), net.buffers()):
        bk.copy_(bq)


@torch.no_grad()
def predict(net, x, mean, std, device, bs=1024):
    """Eval-mode logits on un-augmented images. x uint8 [N, 3, H, W] -> [N, C] on CPU."""
    net.eval()
    return torch.cat([net(to_input(b, mean, std, device))[0].float().cpu() for b in x.split(bs)])


# -----------------------------------------------------------------------------
# Step 2. Warm-up on the partial labels

def mean_or_zero(v):
    """Mean over the batch, 0 (still a graph node) for an empty batch."""
    return v.mean() if v.numel() else v.sum()


def partial_ce(logits, S):
    """−log Σ_{j∈S} p_j, averaged over samples whose S is not every class (those carry no information).
    logits [B, C], S bool [B, C] -> scalar."""
    keep = ~S.all(1)  # [B]
    loss = logits.logsumexp(1) - logits.masked_fill(~S, float("-inf")).logsumexp(1)  # [B]
    return mean_or_zero(loss[keep])


def neg_entropy(logits):
    """Confidence penalty: mean Σ_c p_c log p_c (added to the loss, so it pushes entropy up)."""
    return (logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()


def batch_stream(idx, B, n_iter, g):
    """n_iter batches of min(B, len(idx)) indices, reshuffled each pass. -> [n_iter, b] (b = 0 if idx is empty)"""
    b = min(B, len(idx))
    if b == 0:
        return idx.new_zeros(n_iter, 0)
    passes = math.ceil(n_iter * b / len(idx))
    flat = torch.cat([idx[torch.randperm(len(idx), generator=g)] for _ in range(passes)])
    return flat[:n_iter * b].view(n_iter, b)


def warmup_epoch(net, opt, x_train, S, pred_dist, mean, std, B, g, device, quiet):
    """One epoch of partial CE + confidence penalty on strong views, batch 2B (step 2).
    Each batch's predictions are written into the DA buffer pred_dist [N, C] (in place), as in the release."""
    net.train()
    N = len(x_train)
    batches = batch_stream(torch.arange(N), 2 * B, math.ceil(N / (2 * B)), g)
    total = 0.0
    for idx in common.progress(batches, "warm-up", quiet):
        logits, _ = net(to_input(strong_augment(x_train[idx], g), mean, std, device))
        pred_dist[idx] = logits.detach().float().softmax(1).cpu()
        loss = partial_ce(logits, S[idx].to(device)) + neg_entropy(logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item()
    return total / len(batches)


# -----------------------------------------------------------------------------
# Step 3. Co-divide: a GMM on each network's candidate loss splits the pool into clean and noisy

def distribution_alignment(p, pred_dist, prior):
    """DA: p ← p · prior / mean_i pred_dist_i, rows renormalised. p [B, C]; pred_dist [N, C] is the running
    buffer of every image's latest prediction (not this batch's mean); prior [C] -> [B, C]"""
    q = p * prior / pred_dist.mean(0).clamp_min(1e-12)
    return q / q.sum(1, keepdim=True)


def maxi_cand_loss(p, S):
    """−log max_{j∈S} p_j per sample. p [N, C], S bool [N, C] -> [N]"""
    return -(p * S).max(1).values.clamp_min(1e-12).log()


def gmm_1d(x, max_iter=10, tol=1e-2, reg_covar=5e-4):
    """EM for a 2-component 1-D Gaussian mixture (sklearn GaussianMixture semantics, DivideMix's settings).

    x [N] -> (posterior of the lower-mean component [N], means [2]). Initialised at the 25th/75th
    percentiles (sklearn initialises with k-means; both are deterministic for well-separated data).
    """
    x = x.double()[:, None]  # [N, 1]
    mu = torch.quantile(x, torch.tensor([0.25, 0.75], dtype=x.dtype))[None, :]  # [1, 2]
    var = (x.var() + reg_covar).expand(1, 2).clone()  # [1, 2]
    pi = torch.full((1, 2), 0.5, dtype=x.dtype)

    def log_joint():  # log π_k + log N(x | μ_k, σ²_k)  -> [N, 2]
        return pi.log() - 0.5 * (2 * math.pi * var).log() - (x - mu) ** 2 / (2 * var)

    prev = -math.inf
    for _ in range(max_iter):
        lj = log_joint()
        ll = lj.logsumexp(1, keepdim=True)  # [N, 1]
        resp = (lj - ll).exp()  # E-step [N, 2]
        nk = resp.sum(0, keepdim=True) + 1e-10  # M-step
        mu = (resp * x).sum(0, keepdim=True) / nk
        var = (resp * (x - mu) ** 2).sum(0, keepdim=True) / nk + reg_covar
        pi = nk / len(x)
        if abs(ll.mean().item() - prev) < tol:
            break
        prev = ll.mean().item()
    resp = log_joint().softmax(1)  # final E-step with the final parameters
    return resp[:, mu.argmin()].float(), mu.flatten().float()


@torch.no_grad()
def eval_pass(net, x_train, pred_dist, prior, B, g, mean, std, device, da=True):
    """Eval-mode predictions on weak views, in order, in batches of B. With DA, each batch first overwrites its
    rows of the buffer pred_dist [N, C] (in place) and is then aligned with the buffer's mean, so later
    batches see more of this pass (the release's eval_train). -> p [N, C]"""
    net.eval()
    out = []
    for idx in torch.arange(len(x_train)).split(B):
        p = net(to_input(weak_augment(x_train[idx], g), mean, std, device))[0].float().softmax(1).cpu()  # [b, C]
        if da:
            pred_dist[idx] = p
            p = distribution_alignment(p, pred_dist, prior)
        out.append(p)
    return torch.cat(out)


def co_divide(p, S, history, p_threshold):
    """One network's division of the pool from its (DA-aligned) predictions p [N, C] (step 3).
    -> dict(w [N], clean bool [N], s_hat [N, C]).

    s_hat is p restricted to S and renormalised: the *other* network's co-refinement target for the clean split.
    """
    loss = maxi_cand_loss(p, S)  # [N]
    history.append((loss - loss.min()) / (loss.max() - loss.min()).clamp_min(1e-12))  # min-max normalised
    del history[:-HISTORY]
    w, _ = gmm_1d(torch.stack(history).mean(0))  # [N]
    s_hat = p * S
    return {"w": w, "clean": w > p_threshold, "s_hat": s_hat / s_hat.sum(1, keepdim=True).clamp_min(1e-12)}


def divide(st, x_train, S, prior, p_threshold, B, g, mean, std, device, da=True):
    """Start of one network's co-training epoch: re-copy its key encoder from the query network (release:
    init_key_encoder every epoch), then eval pass + co-divide. st: dict(net, key, pred_dist, loss_history)."""
    st["key"].load_state_dict(st["net"].state_dict())
    p = eval_pass(st["net"], x_train, st["pred_dist"], prior, B, g, mean, std, device, da)  # [N, C]
    return co_divide(p, S, st["loss_history"], p_threshold)


# -----------------------------------------------------------------------------
# Steps 4-5. Co-pseudo-labeling (co-refinement, co-guessing) and MixUp self-training

def sharpen(p, T):
    """p^(1/T), renormalised. [B, C] -> [B, C]"""
    p = p ** (1 / T)
    return p / p.sum(1, keepdim=True)


def co_refine(s_hat, w, p_own, T):
    """Clean split: sharpen(w · ŝ + (1 − w) · p_own). s_hat [B, C] (other net), w [B], p_own [B, C]."""
    return sharpen(w[:, None] * s_hat + (1 - w[:, None]) * p_own, T)


def mixup(x, t, alpha, g):
    """λ ~ Beta(α, α), λ = max(λ, 1 − λ) (each mix stays nearer its own sample); pairs from a permutation.
    x [B, ...], t [B, C] -> (mixed x, mixed t); every mixed target still sums to 1."""
    lam = np.random.default_rng(int(torch.randint(2 ** 62, (1,), generator=g))).beta(alpha, alpha)
    lam = max(lam, 1 - lam)
    perm = torch.randperm(len(x), generator=g).to(x.device)
    return lam * x + (1 - lam) * x[perm], lam * t + (1 - lam) * t[perm]


def lambda_u_ramp(epoch, it, n_iter, warm_up, lambda_u, length=16):
    """λ_u · clip((epoch + it/n_iter − warm_up) / 16, 0, 1): DivideMix's linear ramp-up, stepped per iteration;
    0 at the first co-training step, full weight 16 epochs later."""
    return lambda_u * min(max((epoch + it / n_iter - warm_up) / length, 0.0), 1.0)


def semi_loss(logits_x, t_x, logits_u, t_u):
    """DivideMix's SemiLoss: soft CE on the clean part, MSE of probabilities (mean over B·C) on the noisy part."""
    loss_x = mean_or_zero(-(t_x * logits_x.log_softmax(1)).sum(1))
    loss_u = mean_or_zero((logits_u.softmax(1) - t_u) ** 2)
    return loss_x, loss_u


# -----------------------------------------------------------------------------
# Step 6. Prototypical similarity alignment

@torch.no_grad()
def update_prototypes(protos, emb, labels, m=MOCO_M):
    """Per-sample EMA of class prototypes, then every row renormalised once per batch (release; rows never
    updated stay zero). protos [C, 128] (in place), emb [B, 128], labels [B]."""
    for e, c in zip(emb, labels.tolist()):
        protos[c] = m * protos[c] + (1 - m) * e
    protos.copy_(F.normalize(protos, dim=1))


def proto_loss(emb, protos, t, n_x, lambda_u):
    """KL(t ‖ softmax(emb·protoᵀ/τ)) on the first n_x (clean) rows + λ_u · MSE on the rest (noisy).
    The release passes the unramped λ_u here (the ramp applies to the MSE of SemiLoss only)."""
    logits = emb @ protos.T / TAU_PROTO  # [B, C]
    kl = F.kl_div(logits[:n_x].log_softmax(1), t[:n_x], reduction="sum") / max(n_x, 1)
    mse = mean_or_zero((logits[n_x:].softmax(1) - t[n_x:]) ** 2)
    return kl + lambda_u * mse


# -----------------------------------------------------------------------------
# Step 7. Noisy supervised contrastive learning with a MoCo queue

def supcon_mask(labels, clean, labels_queue, clean_queue):
    """Positives and valid pairs for the noisy SupCon loss over the contrast set [q, k, queue] (release).
    labels/clean [B] are the queries' (and their own keys'), *_queue [Q]. -> (pos bool [B, 2B+Q], valid bool [B, 2B+Q]).

    self (column i) is excluded; positive: same pseudo-label and both clean, or the query's own key (B+i);
    ignored (not valid): same label but one of the two is noisy; every other pair is a negative.
    """
    B = len(labels)
    labels_all, clean_all = torch.cat([labels, labels, labels_queue]), torch.cat([clean, clean, clean_queue])
    same = labels[:, None] == labels_all[None, :]  # [B, 2B+Q]
    both_clean = clean[:, None] & clean_all[None, :]  # [B, 2B+Q]
    own, self_ = torch.zeros_like(same), torch.zeros_like(same)
    own[:, B:2 * B] = torch.eye(B, dtype=torch.bool, device=own.device)
    self_[:, :B] = torch.eye(B, dtype=torch.bool, device=own.device)
    pos = ((same & both_clean) | own) & ~self_
    return pos, (~same | both_clean | own) & ~self_


def supcon_loss(q, contrast, pos, valid, tau=TAU_CONT):
    """−mean over positives of log softmax over valid contrasts. q [B, D], contrast [K, D] -> scalar."""
    logits = (q @ contrast.T / tau).masked_fill(~valid, float("-inf"))  # [B, K]
    log_prob = logits - logits.logsumexp(1, keepdim=True)
    return (-(log_prob.masked_fill(~pos, 0).sum(1)) / pos.sum(1)).mean()


def contrastive_step(st, s1, s2, labels, clean, on):
    """MoCo bookkeeping at every co-training iteration (EMA of the key encoder, enqueue its s2 keys) and, when
    `on`, the noisy SupCon loss of the s1 queries against [q, k, queue]. -> scalar (0 when off)."""
    with torch.no_grad():
        ema_update(st["key"], st["net"])
        k = st["key"](s2)[1]  # [B', 128]
    loss = torch.zeros((), device=k.device)
    if on:
        queue = st["queue"]
        q = st["net"](s1)[1]  # [B', 128]
        pos, valid = supcon_mask(labels, clean, queue["labels"], queue["clean"])
        loss = supcon_loss(q, torch.cat([q, k, queue["emb"]]), pos, valid)  # [2B' + Q, 128] contrasts
    enqueue(st["queue"], k, labels, clean)
    return loss


def new_queue(size, num_classes, g, device):
    """Ring buffer of (embedding [Q, 128], pseudo-label [Q], clean flag [Q]), random at the start and read in
    full from the first step (MoCo/PiCO, release): random unit embeddings, labels and flags."""
    return {"emb": F.normalize(torch.randn(size, EMB_DIM, generator=g), dim=1).to(device), "ptr": 0,
            "labels": torch.randint(num_classes, (size,), generator=g).to(device),
            "clean": (torch.rand(size, generator=g) < 0.5).to(device)}


def enqueue(queue, k, labels, clean):
    """Write a batch of keys at the pointer, overwriting the oldest entries (ring buffer)."""
    size = len(queue["emb"])
    idx = (queue["ptr"] + torch.arange(len(k), device=k.device)) % size
    queue["emb"][idx], queue["labels"][idx], queue["clean"][idx] = k, labels, clean
    queue["ptr"] = (queue["ptr"] + len(k)) % size


# -----------------------------------------------------------------------------
# One co-training epoch of one network on the other network's division (steps 4-7)

def train_epoch(st, other, div, protos, x_train, args, epoch, B, g, mean, std, device, pl, quiet):
    """st: this network's state dict(net, key, opt, queue); div: the division it trains on (the *other*
    network's, or its own with --divide self); protos [C, 128]: the class prototypes both networks share."""
    net, n_c = st["net"], div["clean"].sum().item()
    net.train(), st["key"].train(), other.eval()
    idx_x, idx_u = div["clean"].nonzero().flatten(), (~div["clean"]).nonzero().flatten()
    n_iter = max(1, math.ceil(max(n_c, 1) / B))
    cont_on = epoch > args.warm_up + args.start_cont  # release: prototype loss and SupCon only after this epoch
    sums = dict.fromkeys(["loss", "x", "u", "proto", "cont"], 0.0)
    batches = zip(batch_stream(idx_x, B, n_iter, g), batch_stream(idx_u, B, n_iter, g))
    for it, (bx, bu) in enumerate(common.progress(list(batches), f"epoch {epoch + 1}", quiet)):
        lam_u = lambda_u_ramp(epoch, it, n_iter, args.warm_up, args.lambda_u, args.rampup)
        n_x, ix = len(bx), torch.cat([bx, bu])
        imgs = x_train[ix]  # uint8 [n_x + n_u, 3, H, W]
        w1, w2 = (to_input(weak_augment(imgs, g), mean, std, device) for _ in range(2))
        with torch.no_grad():  # targets: co-refinement (clean rows) and co-guessing (noisy rows)
            (l1, e1), (l2, _) = net(w1), net(w2)
            p_own = (l1.softmax(1) + l2.softmax(1)) / 2  # [B', C]
            p_oth = (other(w1[n_x:])[0].softmax(1) + other(w2[n_x:])[0].softmax(1)) / 2
            t_x = co_refine(div["s_hat"][bx].to(device), div["w"][bx].to(device), p_own[:n_x], args.T)
            t_u = sharpen((p_own[n_x:] + p_oth) / 2, args.T)
            t = torch.cat([t_x, t_u])  # [B', C]
        s1, s2 = (to_input(strong_augment(imgs, g), mean, std, device) for _ in range(2))
        inputs = torch.cat([s1[:n_x], s2[:n_x], s1[n_x:], s2[n_x:]])  # [x_s1, x_s2, u_s1, u_s2]
        targets = torch.cat([t_x, t_x, t_u, t_u])
        mixed, t_mix = mixup(inputs, targets, args.alpha, g) if args.mixup else (inputs, targets)
        logits, emb = net(mixed)
        loss_x, loss_u = semi_loss(logits[:2 * n_x], t_mix[:2 * n_x], logits[2 * n_x:], t_mix[2 * n_x:])
        loss = loss_x + lam_u * loss_u
        update_prototypes(protos, e1[:n_x], t_x.argmax(1))  # weak-view embeddings of the clean split
        loss_p = W_PROTO * proto_loss(emb, protos, t_mix, 2 * n_x, args.lambda_u) if cont_on and args.proto \
            else torch.zeros((), device=device)
        clean = torch.arange(len(ix), device=device) < n_x  # [B'] clean flags
        loss_c = W_CONT * contrastive_step(st, s1, s2, t.argmax(1), clean, cont_on and args.supcon)
        loss = loss + loss_p + loss_c
        st["opt"].zero_grad(set_to_none=True)
        loss.backward()
        st["opt"].step()
        pl[ix] = t.argmax(1).cpu()  # current targets, for the pl-acc report only
        for key, v in zip(sums, (loss, loss_x, lam_u * loss_u, loss_p, loss_c)):
            sums[key] += v.item() / n_iter
    sums["lambda_u"] = lam_u
    return sums


# -----------------------------------------------------------------------------
# Optimisation schedule

def cosine_lr(epoch, lr, period):
    """Cosine from lr to lr·1e-3 over `period` epochs (the released code: period = 800 whatever --epochs)."""
    lr_min = lr * 1e-3
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * min(epoch, period) / period))


def main(argv=None):
    args = parse_args(argv)
    if args.epochs < 1:
        raise common.UserError("--epochs must be at least 1")
    start = time.time()
    config = vars(args)
    print(json.dumps(config))
    device = common.get_device(args.device)
    common.set_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)  # data order, augmentations, MixUp
    quiet = args.quiet or not sys.stdout.isatty()
    d = common.prepare(args, device)
    classnames, y_train, y_test = d["classnames"], d["y_train"], d["y_test"]
    C, N = len(classnames), len(y_train)

    # step 1 annotation: per-template CLIP probabilities -> candidate sets
    templates = common.get_templates(args.templates)
    W = template_weights(d["model"], d["tokenizer"], classnames, templates, device, quiet)  # [T, C, D]
    probs = annotate(d["f_train"], W)  # [T, N, C]
    S = candidate_sets(probs, args.cand_mode, k=args.cand_k)  # [N, C]
    ann = annotation_stats(probs, S, y_train)
    W_ens = F.normalize(W.mean(0), dim=-1)  # [C, D]: prompt ensemble, the zero-shot baseline
    ann["zeroshot_test_acc"] = common.accuracy((d["f_test"] @ W_ens.T).argmax(1), y_test)
    print(f"annotation | {len(templates)} templates | mean |S| {ann['cand_size']:.2f} | coverage "
          f"{100 * ann['cand_coverage']:.1f} | noisy-label acc {100 * ann['noisy_label_acc']:.1f} | "
          f"zero-shot test acc {100 * ann['zeroshot_test_acc']:.1f}")
    clip_params = sum(p.numel() for p in d["model"].visual.parameters())
    pl = probs[0].argmax(1)  # [N] current pseudo-labels (reported only), starting from the noisy CLIP label

    # images: decoded once into memory; augmentation on uint8 tensors
    x_train = decode_images(d["train"], y_train, args.image_size, args.workers)  # [N, 3, H, W]
    x_test = decode_images(d["test"], y_test, args.image_size, args.workers)
    mean = (x_train.float() / 255).mean((0, 2, 3)).view(1, 3, 1, 1).to(device)  # pool statistics
    std = (x_train.float() / 255).std((0, 2, 3)).view(1, 3, 1, 1).to(device)

    # two networks, each with a MoCo key encoder, prototypes and a queue
    B = min(args.batch_size or 256, N)
    states = []
    for k in range(2):
        net = build_net(args.arch, C, 1000 * args.seed + k, device)
        states.append({"net": net, "key": copy.deepcopy(net).requires_grad_(False),
                       "opt": torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4),
                       "queue": new_queue(args.queue_size, C, g, device), "loss_history": [],
                       "pred_dist": torch.full((N, C), 1.0 / C)})  # DA buffer: each image's latest prediction
    protos = torch.zeros(C, EMB_DIM, device=device)  # one set of prototypes for both networks (release)
    # DA target: uniform (--uniform_prior 1, released default) or the mean CLIP annotation over templates and images
    prior = torch.full((C,), 1.0 / C) if args.prior == "uniform" else probs.mean((0, 1))  # [C]
    history, clean_frac = [], None
    for epoch in range(args.epochs):
        t0 = time.time()
        for st in states:
            for group in st["opt"].param_groups:
                group["lr"] = cosine_lr(epoch, args.lr, args.cosine_epochs or args.epochs)
        if epoch < args.warm_up:  # step 2 warm-up
            losses = [{"loss": warmup_epoch(st["net"], st["opt"], x_train, S, st["pred_dist"], mean, std, B, g,
                                            device, quiet)} for st in states]
        else:  # step 3 co-divide, then each network trains on the other's division
            divs = [divide(st, x_train, S, prior, args.p_threshold, B, g, mean, std, device, args.da)
                    for st in states]
            losses = [train_epoch(states[k], states[1 - k]["net"], divs[1 - k if args.divide == "co" else k], protos,
                                  x_train, args, epoch, B, g, mean, std, device, pl, quiet) for k in range(2)]
            clean_frac = sum(dv["clean"].float().mean().item() for dv in divs) / 2
        logits = [predict(st["net"], x_test, mean, std, device) for st in states]  # [M, C] each
        accs = [common.accuracy(lg.argmax(1), y_test) for lg in (*logits, logits[0] + logits[1])]
        row = {k: sum(l.get(k, 0.0) for l in losses) / 2 for k in ("loss", "x", "u", "proto", "cont", "lambda_u")}
        row.update(epoch=epoch + 1, clean=clean_frac, pl_acc=common.accuracy(pl, y_train), acc=accs[2],
                   time_s=round(time.time() - t0, 2))
        history.append(row)
        print(f"epoch {epoch + 1}/{args.epochs} | loss {row['loss']:.3f} (x {row['x']:.3f}, u {row['u']:.3f}, "
              f"proto {row['proto']:.3f}, cont {row['cont']:.3f}) | clean "
              f"{'-' if clean_frac is None else f'{clean_frac:.2f}'} | pl-acc {100 * row['pl_acc']:.1f} | "
              f"acc {100 * accs[2]:.1f} | {row['time_s']:.1f}s", flush=True)

    # step 8 inference: summed logits of both networks; the projection heads are not deployed
    deployed = sum(p.numel() for st in states for n, p in st["net"].named_parameters() if not n.startswith("head"))
    per_class = common.per_class_accuracy((logits[0] + logits[1]).argmax(1), y_test, C)  # [C]
    warm = history[min(args.warm_up, args.epochs) - 1]["acc"] if args.warm_up > 0 else None
    metrics = {"test_acc": accs[2], "test_acc_net1": accs[0], "test_acc_net2": accs[1], "acc_after_warmup": warm,
               "pseudolabel_acc": common.accuracy(pl, y_train), "clean_frac": clean_frac, **ann,
               "params_deployed": deployed, "params_clip_image": clip_params}
    out_dir = args.out_dir or f"runs/coreg-{args.data}-seed{args.seed}"
    common.save_atomic({f"net{k + 1}": st["net"].state_dict() for k, st in enumerate(states)},
                       f"{out_dir}/coreg_nets.pt")
    path = common.write_results(out_dir, config, metrics, start, extra={
        "clip": {"model": d["model_name"], "pretrained": d["pretrained"]}, "history": history,
        "per_class_test_acc": {name: round(a, 4) for name, a in zip(classnames, per_class.tolist())}})
    print(f"co-reg | test acc {100 * accs[2]:.2f} (net1 {100 * accs[0]:.2f}, net2 {100 * accs[1]:.2f}) | "
          f"noisy CLIP-label acc {100 * ann['noisy_label_acc']:.2f} | zero-shot {100 * ann['zeroshot_test_acc']:.2f} | "
          f"params {deployed / 1e6:.2f} M vs CLIP image encoder {clip_params / 1e6:.2f} M | {path}")
    return metrics


if __name__ == "__main__":
    common.run_cli(main)
