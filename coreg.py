"""Co-Reg: CLIP as a noisy partial annotator, then collaborative consistency regularisation.

Wang et al., "Pre-Trained Vision-Language Models as Partial Annotators" (arXiv 2406.18550).
1. Annotate: CLIP labels every training image once per prompt template (27 by default); the union of the per-template
   top-1 classes is the image's candidate set S, which may miss the true class.
2. Train two small networks from scratch (PreAct-ResNet-18) on (image, S): a partial-CE warm-up, then each epoch each
   network splits the pool into clean / noisy by a 2-component GMM on its loss (co-divide), and the *other* network
   trains on that split with co-refined (clean) and co-guessed (noisy) sharpened targets under MixUp (DivideMix-style),
   plus a prototype alignment loss and a noisy supervised contrastive loss (PiCO-style, with a MoCo queue).
3. Deploy the two networks (summed logits): no CLIP at test time, a fraction of its size.
"Step n" refers to docs/coreg.md, which also lists where the release (Portugas0807/Co-Reg) differs and what we follow.

    python coreg.py --data eurosat --image-size 64 --epochs 100       # paper setting (GPU)
    python coreg.py --data demo     # offline demo world on a CPU (DATASET_DEFAULTS)
    python coreg.py --data synthetic --clip-model tiny --pretrained none --arch narrow --epochs 3 --warm-up 1
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle OpenMP threads sleep (docs/usage.md)

import argparse
import copy
import math
import time
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

import common
import data

EMB_DIM = 128  # projection-head output
MOCO_M = 0.999  # key-encoder and prototype EMA momentum
TAU_PROTO = 0.3  # temperature of the prototype similarities
TAU_CONT = 0.07  # temperature of the contrastive loss
W_PROTO = 0.1  # the release's weight_protocont
W_CONT = 0.1  # the release's weight_supcont_sepa
HISTORY = 5  # co-divide averages the normalised loss over this many epochs
PCE_EPS = 1e-5  # partial CE: -log(Σ_S p + ε), as released
LOSS_PARTS = ("loss", "x", "u", "proto", "cont")  # an epoch's mean losses: total, clean, noisy, prototype, SupCon
RANDAUG = v2.RandAugment(num_ops=1, magnitude=5)  # the strong view's extra op (strong_augment)
# The demo world on a CPU: a narrow CNN and a short schedule in which λ_u still reaches full weight.
DATASET_DEFAULTS = {"demo": dict(arch="narrow", epochs=10, warm_up=6, rampup=3, start_cont=1, batch_size=64, lr=0.05)}


def parse_args(argv=None):
    """The shared flags and Co-Reg's (release values: docs/coreg.md); DATASET_DEFAULTS apply unless typed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(p, data.DATASETS)
    # annotation (step 1)
    p.add_argument("--templates", default="small", choices=["small", "imagenet"], help="27 templates (paper) or 80")
    p.add_argument(
        "--cand-mode",
        default="union",
        choices=["union", "topk", "ratio"],
        help="candidate set: union of per-template top-1 (paper), top-k of the mean, or p >= 0.5 p_max",
    )
    p.add_argument("--cand-k", type=common.positive_int, default=5, help="k for --cand-mode topk / ratio")
    # networks
    p.add_argument("--arch", default="preact18", choices=["preact18", "narrow"], help="PreAct-ResNet-18, a 4-conv CNN")
    p.add_argument("--image-size", type=common.positive_int, default=32, help="training resolution (32 or 64)")
    p.add_argument("--queue-size", type=common.positive_int, default=8192, help="MoCo queue length")
    # method
    p.add_argument("--warm-up", type=common.nonneg_int, default=10, help="partial-CE warm-up epochs (DivideMix)")
    p.add_argument("--start-cont", type=common.nonneg_int, default=10, help="epochs after warm-up before proto/SupCon")
    p.add_argument("--p-threshold", type=common.nonneg_float, default=0.5, help="clean if GMM clean probability > this")
    p.add_argument("--T", type=common.positive_float, default=0.5, help="sharpening temperature")
    p.add_argument("--alpha", type=common.positive_float, default=4.0, help="MixUp Beta(α, α)")
    p.add_argument("--lambda-u", type=common.nonneg_float, default=1.0, help="weight of the noisy-split MSE loss λ_u")
    p.add_argument("--rampup", type=common.positive_int, default=16, help="epochs of the linear λ_u ramp after warm-up")
    p.add_argument("--prior", default="uniform", choices=["uniform", "clip"], help="DA target: uniform or CLIP's mean")
    # ablations: each switches off one component of the method (all on in the paper)
    common.add_ablation_switches(
        p,
        {
            "da": "distribution alignment",
            "mixup": "MixUp of the views",
            "proto": "prototype alignment loss",
            "supcon": "noisy SupCon loss",
        },
    )
    p.add_argument(
        "--divide",
        default="co",
        choices=["co", "self"],
        help="co: each network trains on the other's division (paper); self: on its own",
    )
    # optimisation
    p.add_argument("--epochs", type=common.positive_int, default=100, help="training epochs (release README)")
    p.add_argument("--batch-size", type=common.positive_int, default=256, help="batch size B (warm-up: 2B)")
    p.add_argument("--lr", type=common.positive_float, default=0.01, help="SGD learning rate (momentum 0.9, wd 5e-4)")
    p.add_argument("--cosine-epochs", type=common.positive_int, default=None, help="cosine period (default: --epochs)")
    return common.parse_args(p, argv, data.CLIP_DEFAULTS, DATASET_DEFAULTS)


# -----------------------------------------------------------------------------
# Step 1. Annotation: CLIP with several prompt templates as a noisy partial annotator
@torch.no_grad()
def template_weights(model, tokenizer, classnames, templates, device, quiet=False):
    """One text classifier per prompt template. -> W [T, C, D], L2-normalised."""
    templates = common.progress(templates, "annotate", quiet)
    return torch.stack([common.zero_shot_weights(model, tokenizer, classnames, [t], device).cpu() for t in templates])


def annotate(f_train, W):
    """p^j = softmax(100 · f · W_jᵀ) for every template j (100 as released). f [N, D], W [T, C, D] -> [T, N, C]."""
    return (100 * f_train @ W.transpose(1, 2)).softmax(-1)


def candidate_sets(probs, mode="union", k=5, ratio=0.5):
    """Candidate label sets S from per-template probabilities probs [T, N, C] -> bool [N, C]."""
    C = probs.shape[-1]
    if mode == "union":  # ⋃_j {argmax_c p^j_c} (paper)
        return F.one_hot(probs.argmax(-1), C).bool().any(0)  # [N, C]
    p = probs.mean(0)  # [N, C] template mean
    top = p.topk(min(k, C), dim=1)  # topk: its k most probable classes; ratio: those of them with p >= ratio · p_max
    keep = torch.ones_like(top.values, dtype=torch.bool) if mode == "topk" else top.values >= ratio * top.values[:, :1]
    return torch.zeros_like(p, dtype=torch.bool).scatter_(1, top.indices, keep)


def annotation_stats(probs, S, labels):
    """Mean |S|, coverage P(y ∈ S), and the accuracy of the single noisy CLIP label (template 0)."""
    coverage = S[torch.arange(len(labels)), labels].float().mean().item()  # P(y ∈ S)
    noisy_acc = common.accuracy(probs[0].argmax(1), labels)
    return {"cand_size": S.sum(1).float().mean().item(), "cand_coverage": coverage, "noisy_label_acc": noisy_acc}


# -----------------------------------------------------------------------------
# The training pool in memory (data.decode_images) and its augmentations, used from step 2 on
def weak_augment(x, g):
    """RandomCrop(size, padding=size/8, zero fill) + horizontal flip, per image, on a uint8 batch [B, 3, H, W]."""
    B, C, H, W = x.shape
    pad = H // 8
    xp = F.pad(x, (pad, pad, pad, pad))  # [B, 3, H+2p, W+2p]
    i = torch.randint(0, 2 * pad + 1, (B, 1), generator=g) + torch.arange(H)  # [B, H] rows to keep
    j = torch.randint(0, 2 * pad + 1, (B, 1), generator=g) + torch.arange(W)  # [B, W] cols to keep
    b, c = torch.arange(B)[:, None, None, None], torch.arange(C)[None, :, None, None]  # image and channel index
    out = xp[b, c, i[:, None, :, None], j[:, None, None, :]]  # [B, 3, H, W]
    flip = torch.rand(B, generator=g) < 0.5  # [B]
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def strong_augment(x, g, chunk=16):
    """Weak view + torchvision's RandAugment(1, 5), one op per chunk of 16 images. uint8 [B, 3, H, W] -> same."""
    x = weak_augment(x, g)  # the release has its own RandomAugment(1, 5); one op per chunk is 20x faster on CPU
    with torch.random.fork_rng(devices=[]):  # torchvision draws from the global RNG: seed it from g, locally
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=g)))
        return torch.cat([RANDAUG(c) for c in x.split(chunk)])


def to_input(x, mean, std, device):
    """uint8 [B, 3, H, W] -> normalised float32 on device, channels-last (1.6-1.8x faster CPU convolutions)."""
    return ((x.to(device).float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)


@dataclass
class Pool:
    """The training images with their candidate sets, and what drawing a batch of them takes."""

    x: torch.Tensor  # uint8 [N, 3, H, W]
    S: torch.Tensor  # bool [N, C] candidate sets (step 1)
    mean: torch.Tensor  # [1, 3, 1, 1] per-channel statistics of x / 255
    std: torch.Tensor  # [1, 3, 1, 1]
    device: torch.device | str  # where the networks run
    batch_size: int  # B
    g: torch.Generator  # data order, augmentations, MixUp

    def view(self, idx, augment):
        """Images idx through augment (weak_augment or strong_augment, drawing from g). -> network input [b, 3, H, W]"""
        return to_input(augment(self.x[idx], self.g), self.mean, self.std, self.device)


# -----------------------------------------------------------------------------
# The two networks: PreAct-ResNet-18 (or a narrow CNN) + linear classifier + 128-d projection head
class PreActBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        return self.conv2(F.relu(self.bn2(self.conv1(out)), inplace=True)) + skip


def encoder(arch):
    """-> (nn.Sequential image -> features [B, F], F). Adaptive pooling so 32- and 64-px images both work."""
    if arch == "preact18":
        layers, cin = [nn.Conv2d(3, 64, 3, 1, 1, bias=False)], 64  # the stem and its width
        for stage, cout in enumerate((64, 128, 256, 512)):
            layers += [PreActBlock(cin, cout, 2 if stage > 0 else 1), PreActBlock(cout, cout, 1)]
            cin = cout
        layers += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True)]
    else:  # narrow: 4 × (conv-BN-ReLU), widths 16..128, max-pool between (~0.1 M parameters)
        layers, cin = [], 3
        for stage, cout in enumerate((16, 32, 64, 128)):
            layers += [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
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
    """A CoRegNet initialised from `seed`, channels-last on device (see to_input)."""
    with torch.random.fork_rng(devices=[]):  # nn.init uses the global RNG: seed it locally
        torch.manual_seed(seed)
        return CoRegNet(arch, num_classes).to(device, memory_format=torch.channels_last)


@dataclass
class Peer:
    """One of the two networks and its training state, kept across epochs."""

    net: CoRegNet
    key: CoRegNet  # MoCo key encoder, no gradients (step 7)
    opt: torch.optim.Optimizer
    queue: "Queue"  # MoCo queue (step 7)
    pred_dist: torch.Tensor  # [N, C] DA buffer: each image's latest prediction (steps 2-3)
    loss_history: list = field(default_factory=list)  # the last HISTORY normalised losses [N] (step 3)


def new_peer(net, lr, queue, n_train):
    """net with a key encoder copied from it, SGD (momentum 0.9, wd 5e-4), `queue` and a uniform DA buffer."""
    C = net.fc.out_features
    key = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    return Peer(net=net, key=key, opt=opt, queue=queue, pred_dist=torch.full((n_train, C), 1.0 / C))


# -----------------------------------------------------------------------------
# Step 2. Warm-up on the partial labels
def mean_or_zero(v):
    """Mean over the batch, 0 (still a graph node) for an empty batch."""
    return v.mean() if v.numel() else v.sum()


def partial_ce(logits, S, eps=1e-5):
    """−log(Σ_{j∈S} p_j + ε), mean over samples whose S is not every class. logits [B, C], S bool [B, C] -> scalar"""
    loss = -((logits.softmax(1) * S).sum(1) + eps).log()  # [B]; ε (release) bounds it, damps confident mistakes
    return mean_or_zero(loss[~S.all(1)])  # an S of every class carries no information


def neg_entropy(logits):
    """Confidence penalty: mean Σ_c p_c log p_c (added to the loss, so it pushes entropy up)."""
    return (logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()


def one_pass(idx, B, g):
    """One shuffled pass over idx in batches of B, the last one short (a shuffled DataLoader). -> list of [≤B]"""
    return list(idx[torch.randperm(len(idx), generator=g)].split(B)) if len(idx) else []


def cycled(idx, B, n, g):
    """n batches from passes over idx, each reshuffled; n empty batches for an empty idx. -> list of [≤B]"""
    out = []
    while len(out) < n and len(idx):  # the release restarts the noisy loader when it runs out
        out += one_pass(idx, B, g)
    return out[:n] if len(idx) else [idx[:0]] * n


def warmup_epoch(peer, pool, quiet=False):
    """Step 2: partial CE + confidence penalty on strong views, batch 2B, every image once. -> dict(loss)"""
    peer.net.train()
    batches = one_pass(torch.arange(len(pool.x)), 2 * pool.batch_size, pool.g)
    total = 0.0
    for idx in common.progress(batches, "warm-up", quiet):
        logits, _ = peer.net(pool.view(idx, strong_augment))
        peer.pred_dist[idx] = logits.detach().float().softmax(1).cpu()  # the DA buffer [N, C], in place (release)
        loss = partial_ce(logits, pool.S[idx].to(pool.device), eps=PCE_EPS) + neg_entropy(logits)
        peer.opt.zero_grad(set_to_none=True)
        loss.backward()
        peer.opt.step()
        total += loss.item()
    return {"loss": total / len(batches)}


# -----------------------------------------------------------------------------
# Step 3. Co-divide: a GMM on each network's candidate loss splits the pool into clean and noisy
def distribution_alignment(p, pred_dist, prior):
    """DA: p ← p · prior / mean_i pred_dist_i, rows renormalised. p [B, C], pred_dist [N, C], prior [C] -> [B, C]"""
    q = p * prior / pred_dist.mean(0).clamp_min(1e-12)  # the buffer of every image's latest prediction, not the batch
    return q / q.sum(1, keepdim=True)


def maxi_cand_loss(p, S):
    """−log max_{j∈S} p_j per sample. p [N, C], S bool [N, C] -> [N]"""
    return -(p * S).max(1).values.clamp_min(1e-12).log()


def gmm_1d(x, max_iter=10, tol=1e-2, reg_covar=5e-4):
    """EM for a 2-component 1-D GMM (sklearn semantics, DivideMix's settings). x [N] -> (p(low-mean) [N], means [2])"""
    x = x.double()[:, None]  # [N, 1]
    mu = torch.quantile(x, torch.tensor([0.25, 0.75], dtype=x.dtype))[None, :]  # [1, 2]; sklearn starts from k-means
    var, pi = (x.var() + reg_covar).expand(1, 2).clone(), torch.full((1, 2), 0.5, dtype=x.dtype)  # [1, 2] each

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
def eval_pass(net, pred_dist, prior, pool, da=True):
    """Eval-mode predictions on weak views, in order, in batches of B (the release's eval_train). -> p [N, C]"""
    net.eval()
    out = []
    for idx in torch.arange(len(pool.x)).split(pool.batch_size):
        p = net(pool.view(idx, weak_augment))[0].float().softmax(1).cpu()  # [b, C]
        if da:  # its rows of the buffer pred_dist first (in place), then align: later batches see more of this pass
            pred_dist[idx] = p
            p = distribution_alignment(p, pred_dist, prior)
        out.append(p)
    return torch.cat(out)


@dataclass
class Division:
    """One network's split of the pool, on which the other network trains (steps 3-4)."""

    w: torch.Tensor  # [N] GMM probability of the low-loss (clean) component
    clean: torch.Tensor  # bool [N], w > p_threshold
    s_hat: torch.Tensor  # [N, C] DA-aligned prediction restricted to S, renormalised: co-refinement's ŝ


def co_divide(p, S, history, p_threshold):
    """Step 3: one network's division from its DA-aligned p [N, C]; history (a list) gains this epoch's loss."""
    loss = maxi_cand_loss(p, S)  # [N]
    history.append((loss - loss.min()) / (loss.max() - loss.min()).clamp_min(1e-12))  # min-max normalised
    del history[:-HISTORY]
    w, _ = gmm_1d(torch.stack(history).mean(0))  # [N]
    s_hat = p * S  # p restricted to S and renormalised
    return Division(w=w, clean=w > p_threshold, s_hat=s_hat / s_hat.sum(1, keepdim=True).clamp_min(1e-12))


def divide(peer, prior, pool, da, p_threshold):
    """Re-copy the key encoder (release: every epoch), then eval pass (DA if `da`) + co-divide. -> Division"""
    peer.key.load_state_dict(peer.net.state_dict())
    p = eval_pass(peer.net, peer.pred_dist, prior, pool, da)  # [N, C]
    return co_divide(p, pool.S, peer.loss_history, p_threshold)


# -----------------------------------------------------------------------------
# Steps 4-5. Co-pseudo-labeling (co-refinement, co-guessing) and MixUp self-training
def sharpen(p, T):
    """p^(1/T), renormalised. [B, C] -> [B, C]"""
    p = p ** (1 / T)
    return p / p.sum(1, keepdim=True)


@torch.no_grad()
def co_targets(net, other, x_views, u_views, T):
    """Two weak views per split -> own mean prediction p_x [n_x, C], co-guessed t_u [n_u, C], x_w1 embedding e_x."""
    t_u = None  # one batch per view, in the release's order u_w1, u_w2, x_w1, x_w2 (BatchNorm statistics per batch)
    if len(u_views[0]):
        p_u = [net(u)[0].softmax(1) for u in u_views] + [other(u)[0].softmax(1) for u in u_views]
        t_u = sharpen(sum(p_u) / 4, T)  # [n_u, C]: own and other network, both views
    (l1, e_x), (l2, _) = net(x_views[0]), net(x_views[1])
    p_x = (l1.softmax(1) + l2.softmax(1)) / 2  # [n_x, C]
    return p_x, t_u if t_u is not None else p_x[:0], e_x


def co_refine(s_hat, w, p_own, T):
    """Clean split: sharpen(w · ŝ + (1 − w) · p_own). s_hat [B, C] (other net), w [B], p_own [B, C]."""
    return sharpen(w[:, None] * s_hat + (1 - w[:, None]) * p_own, T)


def mixup(x, t, alpha, g):
    """MixUp with λ ~ Beta(α, α), partners from a permutation. x [B, ...], t [B, C] -> (mixed x, mixed t, λ, perm)"""
    lam = np.random.default_rng(int(torch.randint(2**62, (1,), generator=g))).beta(alpha, alpha)
    lam = max(lam, 1 - lam)  # each mix stays nearer its own sample
    perm = torch.randperm(len(x), generator=g).to(x.device)
    return lam * x + (1 - lam) * x[perm], lam * t + (1 - lam) * t[perm], lam, perm


def lambda_u_ramp(progress, warm_up, lambda_u, length=16):
    """DivideMix's ramp λ_u · clip((progress − warm_up) / length, 0, 1), progress = epoch + it / ramp_steps."""
    return lambda_u * min(max((progress - warm_up) / length, 0.0), 1.0)


def ramp_steps(n_clean, B):
    """The ramp's iterations per epoch as released, ⌊n_clean / B⌋ + 1: one more than it runs when B divides n_clean."""
    return n_clean // B + 1


def semi_loss(logits_x, t_x, logits_u, t_u):
    """DivideMix's SemiLoss: soft CE on the clean part, MSE of probabilities (mean over B·C) on the noisy part."""
    loss_x = mean_or_zero(-(t_x * logits_x.log_softmax(1)).sum(1))
    return loss_x, mean_or_zero((logits_u.softmax(1) - t_u) ** 2)


# -----------------------------------------------------------------------------
# Step 6. Prototypical similarity alignment
@torch.no_grad()
def update_prototypes(protos, emb, labels, m=0.999):
    """Per-sample EMA of the class prototypes. protos [C, 128] (in place), emb [B, 128], labels [B]."""
    for e, c in zip(emb, labels.tolist()):
        protos[c] = m * protos[c] + (1 - m) * e
    protos.copy_(F.normalize(protos, dim=1))  # once per batch, as released; rows never updated stay zero


def proto_loss(emb, protos, t_a, t_b, *, lam, n_x, lambda_u):
    """λ·L(t_a) + (1 − λ)·L(t_b), L = KL on the n_x clean rows + λ_u · MSE on the rest. emb [B, 128] -> scalar"""
    logits = emb @ protos.T / TAU_PROTO  # [B, C]
    log_p, p_u = logits[:n_x].log_softmax(1), logits[n_x:].softmax(1)

    def part(t):  # KL(t ‖ softmax(emb · protoᵀ / τ)); the release passes the unramped λ_u (the ramp is SemiLoss's)
        kl = F.kl_div(log_p, t[:n_x], reduction="sum") / max(n_x, 1)  # 'batchmean'
        return kl + lambda_u * mean_or_zero((p_u - t[n_x:]) ** 2)

    return lam * part(t_a) + (1 - lam) * part(t_b)  # L(λ t_a + (1 − λ) t_b)'s gradient, the release's value


# -----------------------------------------------------------------------------
# Step 7. Noisy supervised contrastive learning with a MoCo queue
def supcon_mask(labels, clean, labels_queue, clean_queue):
    """Positive and valid pairs over the contrast set [q, k, queue] (release). [B], [Q] -> bool [B, 2B+Q] each"""
    B = len(labels)
    labels_all, clean_all = torch.cat([labels, labels, labels_queue]), torch.cat([clean, clean, clean_queue])
    same = labels[:, None] == labels_all[None, :]  # [B, 2B+Q]
    both_clean = clean[:, None] & clean_all[None, :]  # [B, 2B+Q]
    own, self_ = torch.zeros_like(same), torch.zeros_like(same)
    own[:, B : 2 * B] = torch.eye(B, dtype=torch.bool, device=own.device)  # the query's own key
    self_[:, :B] = torch.eye(B, dtype=torch.bool, device=own.device)  # itself, never a pair
    pos = ((same & both_clean) | own) & ~self_
    return pos, (~same | both_clean | own) & ~self_  # same label with one of the two noisy: ignored


def supcon_loss(q, contrast, pos, valid, tau=0.07):
    """−mean over positives of log softmax over valid contrasts. q [B, D], contrast [K, D] -> scalar."""
    logits = (q @ contrast.T / tau).masked_fill(~valid, float("-inf"))  # [B, K]
    log_prob = logits - logits.logsumexp(1, keepdim=True)
    return (-(log_prob.masked_fill(~pos, 0).sum(1)) / pos.sum(1)).mean()


@torch.no_grad()
def ema_update(key_net, net, m=MOCO_M):
    """MoCo key encoder: θ_k ← m θ_k + (1 − m) θ_q; BN buffers copied."""
    for pk, pq in zip(key_net.parameters(), net.parameters()):
        pk.mul_(m).add_(pq, alpha=1 - m)
    for bk, bq in zip(key_net.buffers(), net.buffers()):
        bk.copy_(bq)


@dataclass
class Queue:
    """MoCo ring buffer of key embeddings with their pseudo-labels and clean flags; all Q rows are read."""

    emb: torch.Tensor  # [Q, 128] unit rows
    labels: torch.Tensor  # [Q]
    clean: torch.Tensor  # bool [Q]
    ptr: int = 0  # the next row to write


def new_queue(size, num_classes, g, device):
    """A queue of random unit embeddings, labels and clean flags, read in full from the first step."""
    emb = F.normalize(torch.randn(size, EMB_DIM, generator=g), dim=1)  # [Q, 128]
    labels = torch.randint(num_classes, (size,), generator=g)  # [Q]
    clean = torch.rand(size, generator=g) < 0.5  # [Q]
    return Queue(emb=emb.to(device), labels=labels.to(device), clean=clean.to(device))


def enqueue(queue, k, labels, clean):
    """Write a batch of keys at the pointer, overwriting the oldest entries (ring buffer)."""
    size = len(queue.emb)
    idx = (queue.ptr + torch.arange(len(k), device=k.device)) % size
    queue.emb[idx], queue.labels[idx], queue.clean[idx] = k, labels, clean  # one entry per key
    queue.ptr = (queue.ptr + len(k)) % size


def contrastive_step(peer, s1, s2, labels, clean, on):
    """MoCo step of every co-training iteration (release); noisy SupCon of q vs [q, k, queue] if `on`. -> scalar"""
    with torch.no_grad():
        ema_update(peer.key, peer.net)
        k = peer.key(s2)[1]  # [B', 128]
    with torch.set_grad_enabled(on):  # the query pass runs (its BN statistics update) even while the loss is off
        q = peer.net(s1)[1]  # [B', 128]
    loss = torch.zeros((), device=k.device)
    if on:
        pos, valid = supcon_mask(labels, clean, peer.queue.labels, peer.queue.clean)
        loss = supcon_loss(q, torch.cat([q, k, peer.queue.emb]), pos, valid, tau=TAU_CONT)  # [2B' + Q, 128] contrasts
    enqueue(peer.queue, k, labels, clean)
    return loss


# -----------------------------------------------------------------------------
# Steps 4-7 together: one co-training epoch of one network on the other network's division
@dataclass(frozen=True)
class CoTrainFlags:
    """The flags co-training reads (parse_args; the field names are the flags' names)."""

    T: float  # sharpening temperature (step 4)
    alpha: float  # MixUp Beta(α, α) (step 5)
    lambda_u: float  # the noisy split's full weight (step 5); the prototype loss's MSE weight (step 6)
    rampup: int  # epochs of the λ_u ramp after the warm-up
    warm_up: int  # warm-up epochs (step 2)
    start_cont: int  # epochs after the warm-up before the prototype loss and SupCon count
    mixup: bool  # MixUp of the views (step 5)
    proto: bool  # prototype alignment loss (step 6)
    supcon: bool  # noisy SupCon loss (step 7)
    quiet: bool  # no progress output


def train_step(peer, other, pool, div, bx, bu, *, protos, flags, lam_u, cont_on):
    """One co-training step on clean bx and noisy bu (pool indices); protos updated in place. -> (losses, labels)"""
    n_x = len(bx)
    x_w = [pool.view(bx, weak_augment) for _ in range(2)]  # the release augments each split in its own loader
    u_w = [pool.view(bu, weak_augment) for _ in range(2)]
    p_x, t_u, e_x = co_targets(peer.net, other, x_w, u_w, flags.T)
    t_x = co_refine(div.s_hat[bx].to(pool.device), div.w[bx].to(pool.device), p_x, flags.T)  # [n_x, C]
    ix = torch.cat([bx, bu])
    s1, s2 = (pool.view(ix, strong_augment) for _ in range(2))
    inputs = torch.cat([s1[:n_x], s2[:n_x], s1[n_x:], s2[n_x:]])  # [x_s1, x_s2, u_s1, u_s2]
    t_all = torch.cat([t_x, t_x, t_u, t_u])
    if flags.mixup:
        mixed, t_mix, lam, perm = mixup(inputs, t_all, flags.alpha, pool.g)
    else:
        mixed, t_mix, lam, perm = inputs, t_all, 1.0, torch.arange(len(inputs), device=pool.device)
    logits, emb = peer.net(mixed)
    loss_x, loss_u = semi_loss(logits[: 2 * n_x], t_mix[: 2 * n_x], logits[2 * n_x :], t_mix[2 * n_x :])
    update_prototypes(protos, e_x, t_x.argmax(1), m=MOCO_M)  # weak-view embeddings of the clean split
    loss_p = W_PROTO * proto_loss(emb, protos, t_all, t_all[perm], lam=lam, n_x=2 * n_x, lambda_u=flags.lambda_u)
    labels = torch.cat([t_x, t_u]).argmax(1)  # [B'] pseudo-labels
    clean = torch.arange(len(ix), device=pool.device) < n_x  # [B'] clean flags
    loss_c = W_CONT * contrastive_step(peer, s1, s2, labels, clean, on=cont_on and flags.supcon)
    loss_p = loss_p if cont_on and flags.proto else loss_p.detach() * 0
    loss = loss_x + lam_u * loss_u + loss_p + loss_c
    peer.opt.zero_grad(set_to_none=True)
    loss.backward()
    peer.opt.step()
    parts = dict(loss=loss.item(), x=loss_x.item(), u=lam_u * loss_u.item(), proto=loss_p.item(), cont=loss_c.item())
    return parts, labels


def train_epoch(peer, other, div, pool, *, protos, pseudolabels, flags, epoch):
    """One pass over div's clean split, the noisy one cycled alongside (none if none is clean). -> mean losses"""
    peer.net.train()
    peer.key.train()
    other.eval()
    idx_x, idx_u = div.clean.nonzero().flatten(), (~div.clean).nonzero().flatten()
    clean_batches = one_pass(idx_x, pool.batch_size, pool.g)
    batches = list(zip(clean_batches, cycled(idx_u, pool.batch_size, len(clean_batches), pool.g)))
    cont_on = epoch > flags.warm_up + flags.start_cont  # release: prototype loss and SupCon only after this epoch
    n_ramp = ramp_steps(len(idx_x), pool.batch_size)
    sums = dict.fromkeys(LOSS_PARTS, 0.0)
    lam_u = 0.0
    for it, (bx, bu) in enumerate(common.progress(batches, f"epoch {epoch + 1}", flags.quiet)):
        lam_u = lambda_u_ramp(epoch + it / n_ramp, flags.warm_up, flags.lambda_u, flags.rampup)
        parts, labels = train_step(
            peer, other, pool, div, bx, bu, protos=protos, flags=flags, lam_u=lam_u, cont_on=cont_on
        )
        pseudolabels[torch.cat([bx, bu])] = labels.cpu()  # in place: the current targets, for the pl-acc report
        for key, v in parts.items():
            sums[key] += v / len(batches)
    return {**sums, "lambda_u": lam_u}


# -----------------------------------------------------------------------------
# Step 8. Inference: the two networks' summed logits, no CLIP
@torch.no_grad()
def predict(net, x, mean, std, device, bs=1024):
    """Eval-mode logits on un-augmented images. x uint8 [N, 3, H, W] -> [N, C] on CPU."""
    net.eval()
    return torch.cat([net(to_input(b, mean, std, device))[0].float().cpu() for b in x.split(bs)])


# -----------------------------------------------------------------------------
# main: the steps in order, and its report lines
def set_lr(opts, lr, epoch, period):
    """The cosine schedule: lr at epoch 0, lr / 1000 from epoch `period` on."""
    for group in (group for opt in opts for group in opt.param_groups):
        group["lr"] = lr * common.cosine(epoch, period, floor=1e-3)


def history_row(epoch, losses, clean, pl_acc, acc, t0):
    """One epoch's history: both networks' mean losses, the clean fraction (None in the warm-up), accuracies."""
    row = {k: sum(part.get(k, 0.0) for part in losses) / 2 for k in (*LOSS_PARTS, "lambda_u")}
    return row | dict(epoch=epoch + 1, clean=clean, pl_acc=pl_acc, acc=acc, time_s=round(time.time() - t0, 2))


def epoch_line(row, epochs):
    clean = "-" if row["clean"] is None else f"{row['clean']:.2f}"
    return (
        f"epoch {row['epoch']}/{epochs} | loss {row['loss']:.3f} (x {row['x']:.3f}, u {row['u']:.3f}, "
        f"proto {row['proto']:.3f}, cont {row['cont']:.3f}) | clean {clean} | pl-acc {100 * row['pl_acc']:.1f} | "
        f"acc {100 * row['acc']:.1f} | {row['time_s']:.1f}s"
    )


def summary(m, prompt_set):
    return (
        f"co-reg | test acc {100 * m['test_acc']:.2f} (net1 {100 * m['test_acc_net1']:.2f}, net2 "
        f"{100 * m['test_acc_net2']:.2f}) | noisy CLIP-label acc {100 * m['noisy_label_acc']:.2f} (template 0) | "
        f"zero-shot {100 * m['zeroshot_test_acc']:.2f} ({prompt_set}) | params {m['params_deployed'] / 1e6:.2f} M "
        f"vs CLIP image encoder {m['params_clip_image'] / 1e6:.2f} M"
    )


def main(argv=None):
    args = parse_args(argv)
    run = common.start_run(args, f"runs/coreg-{args.data}-seed{args.seed}")
    d = data.prepare(args, run.device)
    C, N = len(d.classnames), len(d.y_train)  # classes, training images
    g = torch.Generator().manual_seed(args.seed)  # data order, augmentations, MixUp
    # step 1: per-template CLIP probabilities -> candidate sets S
    templates = common.get_templates(args.templates)
    W = template_weights(d.model, d.tokenizer, d.classnames, templates, run.device, args.quiet)  # [T, C, D]
    probs = annotate(d.f_train, W)  # [T, N, C]
    S = candidate_sets(probs, args.cand_mode, k=args.cand_k)  # [N, C]
    ann = annotation_stats(probs, S, d.y_train)
    ann["zeroshot_test_acc"] = common.accuracy((d.f_test @ F.normalize(W.mean(0), dim=-1).T).argmax(1), d.y_test)
    print(
        f"annotation | {len(templates)} templates | mean |S| {ann['cand_size']:.2f} | coverage "
        f"{100 * ann['cand_coverage']:.1f} | noisy-label acc {100 * ann['noisy_label_acc']:.1f} (template 0) | "
        f"zero-shot test acc {100 * ann['zeroshot_test_acc']:.1f} ({common.PROMPT_SET_NAMES[args.templates]})"
    )
    # steps 2-7: two networks trained from scratch on (image, S)
    x_train = data.decode_images(d.train, d.y_train, args.image_size, args.workers)  # [N, 3, H, W] uint8
    x_test = data.decode_images(d.test, d.y_test, args.image_size, args.workers)
    mean = (x_train.float() / 255).mean((0, 2, 3)).view(1, 3, 1, 1).to(run.device)  # pool statistics
    std = (x_train.float() / 255).std((0, 2, 3)).view(1, 3, 1, 1).to(run.device)
    pool = Pool(x=x_train, S=S, mean=mean, std=std, device=run.device, batch_size=min(args.batch_size, N), g=g)
    protos = torch.zeros(C, EMB_DIM, device=run.device)  # step 6: one set shared by both networks (release)
    noisy_label = probs[0].argmax(1)  # [N] template 0's top-1
    pseudolabels = noisy_label.clone()  # [N] the current targets, updated by every co-training step
    nets = [build_net(args.arch, C, 1000 * args.seed + k, run.device) for k in range(2)]
    peers = [new_peer(net, args.lr, new_queue(args.queue_size, C, g, run.device), N) for net in nets]
    prior = torch.full((C,), 1.0 / C) if args.prior == "uniform" else probs.mean((0, 1))  # [C] DA target
    flags = CoTrainFlags(**{f.name: getattr(args, f.name) for f in fields(CoTrainFlags)})
    history = []
    for epoch in range(args.epochs):
        t0 = time.time()
        set_lr([peer.opt for peer in peers], args.lr, epoch, args.cosine_epochs or args.epochs)
        if epoch < args.warm_up:
            losses = [warmup_epoch(peer, pool, args.quiet) for peer in peers]
            clean = None
        else:
            divs = [divide(peer, prior, pool, da=args.da, p_threshold=args.p_threshold) for peer in peers]
            clean = sum(div.clean.float().mean().item() for div in divs) / 2
            train_on = divs[::-1] if args.divide == "co" else divs  # co: each network trains on the other's division
            losses = [
                train_epoch(peer, other, div, pool, protos=protos, pseudolabels=pseudolabels, flags=flags, epoch=epoch)
                for peer, other, div in zip(peers, nets[::-1], train_on)
            ]
        logits = [predict(peer.net, x_test, mean, std, run.device) for peer in peers]  # [M, C] each
        accs = [common.accuracy(lg.argmax(1), d.y_test) for lg in (*logits, logits[0] + logits[1])]
        row = history_row(epoch, losses, clean, common.accuracy(pseudolabels, d.y_train), accs[2], t0)
        common.check_finite(row["loss"], f"the loss of epoch {epoch + 1}")
        print(epoch_line(row, args.epochs), flush=True)
        history.append(row)
    metrics = {"test_acc": accs[2], "test_acc_net1": accs[0], "test_acc_net2": accs[1]}  # step 8: summed logits
    metrics["acc_after_warmup"] = history[args.warm_up - 1]["acc"] if 0 < args.warm_up <= args.epochs else None
    metrics.update(pseudolabel_acc=common.accuracy(pseudolabels, d.y_train), clean_frac=clean, **ann)
    # the deployed parameters (both networks without their projection heads) beside CLIP's image encoder
    deployed = sum(p.numel() for net in nets for n, p in net.named_parameters() if not n.startswith("head"))
    metrics.update(params_deployed=deployed, params_clip_image=sum(p.numel() for p in d.model.visual.parameters()))
    common.save_atomic({f"net{k + 1}": net.state_dict() for k, net in enumerate(nets)}, run.out_dir / "coreg_nets.pt")
    labels = {"candidate_sets": S, "noisy_label": noisy_label, "pseudolabels": pseudolabels, "classnames": d.classnames}
    common.save_atomic(labels, run.out_dir / "pseudolabels.pt")
    per_class = common.per_class_accuracy((logits[0] + logits[1]).argmax(1), d.y_test, C)  # [C]
    extra = {"clip": {"model": args.clip_model, "pretrained": d.pretrained}, "split": d.split_info, "history": history}
    extra["per_class_test_acc"] = dict(zip(d.classnames, per_class.tolist()))
    return common.finish_run(run, metrics, summary(metrics, common.PROMPT_SET_NAMES[args.templates]), extra=extra)


if __name__ == "__main__":
    common.run_cli(main)
