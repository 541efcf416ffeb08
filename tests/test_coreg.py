"""Tests for coreg.py (Co-Reg): hand-checked pieces of the algorithm, then a CPU smoke run.

    python -m pytest -q tests/test_coreg.py

Offline and CPU-only: the smoke runs use --data synthetic and the random 'tiny' CLIP.
"""

import copy
import dataclasses
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import common
import coreg

REPO = Path(__file__).resolve().parent.parent

# -----------------------------------------------------------------------------
# Annotation


def test_default_prompts_are_the_releases_27_small_templates_without_a_full_stop():
    # imagenet_templates_small of the release (utils/utils_experi.py), in its order
    release = [
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
    assert coreg.parse_args(["--data", "synthetic"]).templates == "small"
    assert common.get_templates("small") == release and len(release) == 27


def test_candidate_union_collects_each_templates_top1():
    # 3 templates, 2 images, 4 classes: image 0 -> top-1s {0, 0, 2}, image 1 -> {3, 3, 3}
    probs = torch.tensor(
        [
            [[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]],
            [[0.6, 0.2, 0.1, 0.1], [0.1, 0.1, 0.2, 0.6]],
            [[0.3, 0.1, 0.5, 0.1], [0.2, 0.1, 0.1, 0.6]],
        ]
    )  # [T, N, C]
    S = coreg.candidate_sets(probs, "union")
    assert S.tolist() == [[True, False, True, False], [False, False, False, True]]


def test_candidate_topk_and_ratio_use_the_template_mean():
    probs = torch.tensor([[[0.5, 0.3, 0.15, 0.05]]])  # one template, one image
    assert coreg.candidate_sets(probs, "topk", k=2).tolist() == [[True, True, False, False]]
    # ratio 0.5: keep p >= 0.25 -> classes 0 and 1
    assert coreg.candidate_sets(probs, "ratio", k=4, ratio=0.5).tolist() == [[True, True, False, False]]


def test_annotation_stats_hand_values():
    probs = torch.tensor([[[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]])  # template 0 labels: 0, 1, 0
    S = torch.tensor([[True, False], [True, True], [False, True]])
    stats = coreg.annotation_stats(probs, S, torch.tensor([0, 0, 0]))
    assert stats["cand_size"] == pytest.approx(4 / 3)
    assert stats["cand_coverage"] == pytest.approx(2 / 3)
    assert stats["noisy_label_acc"] == pytest.approx(2 / 3)


# -----------------------------------------------------------------------------
# Losses and targets


def test_partial_ce_is_minus_log_candidate_mass_and_skips_all_class_sets():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 0.0, 0.0, 0.0]]).log()  # p = [.1, .2, .3, .4] in row 0
    S = torch.tensor([[False, True, False, True], [True, True, True, True]])  # row 1: all classes -> skipped
    assert coreg.partial_ce(logits, S).item() == pytest.approx(-math.log(0.6 + 1e-5), abs=1e-6)
    assert coreg.partial_ce(logits[1:], S[1:]).item() == 0.0


def test_partial_ce_adds_the_releases_epsilon_to_a_tiny_candidate_mass():
    # two classes, S = {0}, p_0 = 1e-6: the release's -log(Σ_S p + 1e-5) = -log(1.1e-5), not -log(1e-6)
    p0 = 1e-6
    logits = torch.tensor([[0.0, math.log((1 - p0) / p0)]], dtype=torch.float64, requires_grad=True)
    S = torch.tensor([[True, False]])
    loss = coreg.partial_ce(logits, S)
    assert loss.item() == pytest.approx(-math.log(1.1e-5), rel=1e-9)
    (g,) = torch.autograd.grad(loss, logits)
    plain = -logits.log_softmax(1)[0, 0]  # -log Σ_S p without the epsilon
    (g_plain,) = torch.autograd.grad(plain, logits)
    # d/dz: p0(1 - p0) / (p0 + ε) against (1 - p0): the epsilon damps the gradient by p0 / (p0 + ε) = 1/11
    assert torch.allclose(g / g_plain, torch.full_like(g, p0 / (p0 + 1e-5)), rtol=1e-6)


def test_negative_entropy_of_uniform_is_minus_log_c():
    assert coreg.neg_entropy(torch.zeros(3, 5)).item() == pytest.approx(-math.log(5))


def test_maxi_cand_loss_uses_the_best_candidate():
    p = torch.tensor([[0.5, 0.3, 0.2]])
    S = torch.tensor([[False, True, True]])
    assert coreg.maxi_cand_loss(p, S).item() == pytest.approx(-math.log(0.3))


def test_distribution_alignment_divides_by_the_buffer_mean_not_the_batch_mean():
    p = torch.tensor([[0.9, 0.1]])
    buffer = torch.tensor([[0.9, 0.1], [0.5, 0.5]])  # mean [.7, .3]
    q = coreg.distribution_alignment(p, buffer, torch.tensor([0.5, 0.5]))
    a, b = 0.9 / 0.7, 0.1 / 0.3
    assert torch.allclose(q[0], torch.tensor([a / (a + b), b / (a + b)]))
    r = coreg.distribution_alignment(
        torch.rand(50, 7, generator=torch.Generator().manual_seed(0)).softmax(1),
        torch.full((9, 7), 1 / 7),
        torch.full((7,), 1 / 7),
    )
    assert torch.allclose(r.sum(1), torch.ones(50))


class PixelNet(torch.nn.Module):
    """Test network: logits [pixel, 0] read from one pixel of channel 0 (a constant image keeps its centre
    pixel under a ±1-px crop; its corner pixel becomes 0 when the crop shows the zero padding)."""

    def __init__(self, row, col):
        super().__init__()
        self.row, self.col = row, col

    def forward(self, x):
        v = x[:, 0, self.row, self.col]  # [B]
        return torch.stack([v, torch.zeros_like(v)], 1), None


def image_pool(x, B, g, S=None):
    """The training pool with identity normalisation: pixel value / 255 reaches the network."""
    return coreg.Pool(
        x=x, S=S, mean=torch.zeros(1, 3, 1, 1), std=torch.ones(1, 3, 1, 1), device="cpu", batch_size=B, g=g
    )


def test_eval_pass_updates_the_da_buffer_batch_by_batch():
    x = torch.tensor([0, 255, 255, 0], dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 3, 8, 8).contiguous()
    p_raw = torch.stack([torch.tensor([v, 0.0]).softmax(0) for v in (0.0, 1.0, 1.0, 0.0)])  # [4, 2]
    buffer, prior = torch.full((4, 2), 0.5), torch.tensor([0.5, 0.5])
    p = coreg.eval_pass(PixelNet(4, 4), buffer, prior, image_pool(x, 2, torch.Generator().manual_seed(0)))
    first = torch.cat([p_raw[:2], torch.full((2, 2), 0.5)])  # batch 1 sees the old rows 2-3 in the buffer
    assert torch.allclose(p[:2], coreg.distribution_alignment(p_raw[:2], first, prior), atol=1e-6)
    assert torch.allclose(p[2:], coreg.distribution_alignment(p_raw[2:], p_raw, prior), atol=1e-6)
    assert torch.allclose(buffer, p_raw)
    off = coreg.eval_pass(PixelNet(4, 4), buffer.clone(), prior, image_pool(x, 2, torch.Generator()), da=False)
    assert torch.allclose(off, p_raw)


def test_eval_pass_sees_weak_views():
    x = torch.full((64, 3, 8, 8), 255, dtype=torch.uint8)
    p = coreg.eval_pass(
        PixelNet(0, 0),
        torch.full((64, 2), 0.5),
        torch.tensor([0.5, 0.5]),
        image_pool(x, 64, torch.Generator().manual_seed(0)),
        da=False,
    )
    corner_is_padding = p[:, 0] < 0.6  # softmax([0, 0]) = 0.5 where the crop put zero padding in the corner
    assert 0 < corner_is_padding.sum() < 64


def test_sharpen_hand_value_and_identity_at_t_one():
    p = torch.tensor([[0.6, 0.4]])
    assert torch.allclose(coreg.sharpen(p, 0.5), torch.tensor([[0.36 / 0.52, 0.16 / 0.52]]))
    assert torch.allclose(coreg.sharpen(p, 1.0), p)


def test_co_refine_interpolates_between_other_net_and_own_prediction():
    s_hat, p_own = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.2, 0.8]])
    assert torch.allclose(coreg.co_refine(s_hat, torch.tensor([1.0]), p_own, 1.0), s_hat)
    assert torch.allclose(coreg.co_refine(s_hat, torch.tensor([0.0]), p_own, 1.0), p_own)
    assert torch.allclose(coreg.co_refine(s_hat, torch.tensor([0.5]), p_own, 1.0), torch.tensor([[0.6, 0.4]]))


def test_mixup_targets_sum_to_one_and_stay_nearer_their_own_sample():
    t = F.one_hot(torch.arange(8) % 3, 3).float()
    x = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    xm, tm, lam, perm = coreg.mixup(x, t, 4.0, torch.Generator().manual_seed(1))
    assert torch.allclose(tm.sum(1), torch.ones(8))
    assert (tm[t.bool()] >= 0.5 - 1e-6).all() and 0.5 <= lam <= 1  # λ = max(λ, 1 − λ) on the own label
    assert torch.allclose(xm, lam * x + (1 - lam) * x[perm]) and torch.allclose(tm, lam * t + (1 - lam) * t[perm])
    xm2, tm2, lam2, perm2 = coreg.mixup(x, t, 4.0, torch.Generator().manual_seed(1))
    assert torch.equal(xm, xm2) and torch.equal(tm, tm2) and lam == lam2 and torch.equal(perm, perm2)


def test_lambda_u_ramp_is_stepped_per_iteration_from_zero():
    assert coreg.lambda_u_ramp(10 + 0 / 40, 10, 1.0) == 0.0  # first co-training step
    assert coreg.lambda_u_ramp(10 + 20 / 40, 10, 1.0) == pytest.approx(0.5 / 16)
    assert coreg.lambda_u_ramp(13 + 10 / 40, 10, 2.0) == pytest.approx(2 * 3.25 / 16)
    assert coreg.lambda_u_ramp(26, 10, 1.0) == 1.0 and coreg.lambda_u_ramp(5, 10, 1.0) == 0.0
    assert coreg.lambda_u_ramp(12, 10, 1.0, length=4) == pytest.approx(0.5)


def test_semi_loss_is_zero_for_an_empty_noisy_split():
    loss_x, loss_u = coreg.semi_loss(torch.zeros(2, 4), torch.full((2, 4), 0.25), torch.zeros(0, 4), torch.zeros(0, 4))
    assert loss_x.item() == pytest.approx(math.log(4)) and loss_u.item() == 0.0


# -----------------------------------------------------------------------------
# Co-divide: the GMM


def test_gmm_recovers_two_gaussians():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([0.2 + 0.05 * torch.randn(2000, generator=g), 0.7 + 0.08 * torch.randn(1000, generator=g)])
    w, means = coreg.gmm_1d(x)
    assert sorted(means.tolist()) == pytest.approx([0.2, 0.7], abs=0.05)
    assert w[:2000].mean() > 0.97 and w[2000:].mean() < 0.03  # w = P(low-mean component)


def test_gmm_on_constant_losses_stays_finite():
    w, means = coreg.gmm_1d(torch.zeros(10))
    assert torch.isfinite(w).all() and torch.isfinite(means).all()


# -----------------------------------------------------------------------------
# Prototypes and noisy supervised contrastive learning


def test_supcon_mask_over_queries_keys_and_queue_excludes_self():
    labels, clean = torch.tensor([0, 0, 1]), torch.tensor([True, False, True])
    pos, valid = coreg.supcon_mask(labels, clean, torch.tensor([0, 1]), torch.tensor([True, False]))
    T, F_ = True, False
    # columns: q0 q1 q2 | k0 k1 k2 | queue0 (label 0, clean) queue1 (label 1, noisy)
    assert pos.tolist() == [
        [F_, F_, F_, T, F_, F_, T, F_],  # clean 0: own key + clean queue 0
        [F_, F_, F_, F_, T, F_, F_, F_],  # noisy 0: own key only
        [F_, F_, F_, F_, F_, T, F_, F_],
    ]  # clean 1: own key (queue 1 is noisy)
    assert valid.tolist() == [
        [F_, F_, T, T, F_, T, T, T],  # self out; same label with a noisy one: ignored
        [F_, F_, T, F_, T, T, F_, T],  # noisy anchor: every same-label pair ignored
        [T, T, F_, T, T, T, T, F_],
    ]
    assert not (pos & ~valid).any()


def test_supcon_loss_with_orthogonal_contrasts_hand_value():
    q = torch.eye(4)[:2]  # anchors e0, e1; their keys are the same vectors; queue: e2, e3
    contrast = torch.cat([q, q, torch.eye(4)[2:]])  # [q, k, queue]: 6 rows
    pos, valid = coreg.supcon_mask(
        torch.tensor([0, 1]), torch.tensor([True, True]), torch.tensor([2, 3]), torch.ones(2, dtype=torch.bool)
    )
    expected = -math.log(math.e / (math.e + 4))  # at τ = 1: e^1 for the own key, e^0 for 4 others (self left out)
    assert coreg.supcon_loss(q, contrast, pos, valid, tau=1.0).item() == pytest.approx(expected, rel=1e-5)


def test_prototypes_ema_per_sample_then_renormalised_once_per_batch():
    protos = torch.zeros(2, 3)
    coreg.update_prototypes(protos, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), torch.tensor([1, 1]), m=0.5)
    assert protos[0].abs().sum() == 0  # never updated: stays zero
    assert torch.allclose(protos[1], torch.tensor([1.0, 2.0, 0.0]) / math.sqrt(5))  # .5·(.5·e0) + .5·e1, normalised


def test_prototype_loss_is_the_lambda_mix_of_the_two_targets_losses_with_the_mixed_targets_gradient():
    # protos e0, e1 and τ = 0.3: emb rows 0.3·[ln 3, 0], 0.3·[0, ln 3], 0 give p = [3/4, 1/4], [1/4, 3/4], [1/2, 1/2]
    protos = torch.eye(2)
    emb = (coreg.TAU_PROTO * torch.tensor([[math.log(3), 0.0], [0.0, math.log(3)], [0.0, 0.0]])).requires_grad_()
    t_a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # rows 0-1 clean (KL, batchmean), row 2 noisy (MSE)
    t_b = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    lam, lambda_u = 0.75, 0.5
    L_a = math.log(4 / 3) + lambda_u * 0.25  # KL: log(4/3) in both clean rows; MSE: ((1/2)² + (1/2)²) / 2
    L_b = (math.log(4) + math.log(4 / 3)) / 2 + lambda_u * 0.25
    loss = coreg.proto_loss(emb, protos, t_a, t_b, lam=lam, n_x=2, lambda_u=lambda_u)
    assert loss.item() == pytest.approx(lam * L_a + (1 - lam) * L_b, rel=1e-6)
    # L(λ t_a + (1 − λ) t_b) = log(4/3)/2 + λ_u · 1/16: a different value, the same gradient
    t_mix = lam * t_a + (1 - lam) * t_b
    mixed = coreg.proto_loss(emb, protos, t_mix, t_mix, lam=1.0, n_x=2, lambda_u=lambda_u)
    assert mixed.item() == pytest.approx(math.log(4 / 3) / 2 + lambda_u / 16, rel=1e-6)
    (g,) = torch.autograd.grad(loss, emb)
    (g_mixed,) = torch.autograd.grad(mixed, emb)
    assert torch.allclose(g, g_mixed, atol=1e-6) and g.abs().sum() > 0


def test_queue_starts_random_and_is_a_ring_buffer():
    q = coreg.new_queue(4, 3, torch.Generator().manual_seed(0), "cpu")
    assert torch.allclose(q.emb.norm(dim=1), torch.ones(4)) and q.labels.max() < 3
    for i in range(3):
        coreg.enqueue(q, torch.full((2, coreg.EMB_DIM), float(i)), torch.full((2,), i), torch.ones(2, dtype=torch.bool))
    assert q.ptr == 2 and q.labels.tolist() == [2, 2, 1, 1]


def moco_peer(net, key):
    """A network with its key encoder and an 8-entry queue: what contrastive_step uses of a coreg.Peer."""
    queue = coreg.new_queue(8, 3, torch.Generator().manual_seed(0), "cpu")
    return coreg.Peer(net=net, key=key, opt=None, queue=queue, pred_dist=None)


def test_contrastive_step_updates_key_encoder_and_queue_even_when_the_loss_is_off():
    net = coreg.build_net("narrow", 3, 0, "cpu")
    key = coreg.build_net("narrow", 3, 1, "cpu").requires_grad_(False)
    k0, q0 = next(key.parameters()).clone(), next(net.parameters()).clone()
    peer = moco_peer(net, key)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels, clean = torch.tensor([0, 1, 2, 0]), torch.tensor([True, True, False, False])
    loss = coreg.contrastive_step(peer, x, x, labels, clean, on=False)
    assert loss.item() == 0.0 and peer.queue.ptr == 4 and peer.queue.labels[:4].tolist() == [0, 1, 2, 0]
    assert torch.allclose(next(key.parameters()), coreg.MOCO_M * k0 + (1 - coreg.MOCO_M) * q0)
    assert coreg.contrastive_step(peer, x, x, labels, clean, on=True).item() > 0 and peer.queue.ptr == 0


def test_contrastive_step_runs_the_query_pass_so_batchnorm_statistics_move_while_the_loss_is_off():
    net = coreg.build_net("narrow", 3, 0, "cpu").train()
    peer = moco_peer(net, copy.deepcopy(net).requires_grad_(False))
    bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone(), bn.num_batches_tracked.item()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    loss = coreg.contrastive_step(peer, x, x, torch.tensor([0, 1, 2, 0]), torch.ones(4, dtype=torch.bool), on=False)
    assert loss.item() == 0.0 and not loss.requires_grad
    assert bn.num_batches_tracked.item() == before[1] + 1 and not torch.equal(bn.running_mean, before[0])
    assert all(p.grad is None for p in net.parameters())  # the query pass builds no graph while the loss is off


def test_divide_recopies_the_key_encoder_and_extends_the_loss_history():
    net, key = coreg.build_net("narrow", 3, 0, "cpu"), coreg.build_net("narrow", 3, 1, "cpu")
    peer = coreg.Peer(net=net, key=key, opt=None, queue=None, pred_dist=torch.full((6, 3), 1 / 3))
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    S = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1]]).bool()
    div = coreg.divide(peer, torch.full((3,), 1 / 3), image_pool(x, 4, torch.Generator(), S), da=True, p_threshold=0.5)
    assert all(torch.equal(a, b) for a, b in zip(key.state_dict().values(), net.state_dict().values()))
    assert len(peer.loss_history) == 1 and div.w.shape == (6,) and div.s_hat.shape == (6, 3)


# -----------------------------------------------------------------------------
# Data, network, schedule


def test_weak_augment_is_a_seeded_padded_crop_or_flip():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.uint8).view(2, 3, 8, 8)
    a = coreg.weak_augment(x, torch.Generator().manual_seed(0))
    b = coreg.weak_augment(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and a.dtype == torch.uint8 and torch.equal(a, b)
    s = coreg.strong_augment(x, torch.Generator().manual_seed(0))
    assert s.shape == x.shape and s.dtype == torch.uint8


def test_networks_return_logits_and_unit_embeddings_at_32_and_64_px():
    for arch in ("narrow", "preact18"):
        net = coreg.build_net(arch, 5, 0, "cpu").eval()
        for size in (32, 64):
            logits, emb = net(torch.randn(2, 3, size, size))
            assert logits.shape == (2, 5) and emb.shape == (2, coreg.EMB_DIM)
            assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    a, b = coreg.build_net("narrow", 5, 3, "cpu"), coreg.build_net("narrow", 5, 3, "cpu")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def build_peers(args, C, N, g):
    """Both networks' training state, as main builds it from the flags."""
    nets = [coreg.build_net(args.arch, C, 1000 * args.seed + k, "cpu") for k in range(2)]
    return [coreg.new_peer(net, args.lr, coreg.new_queue(args.queue_size, C, g, "cpu"), N) for net in nets]


def test_learning_rate_runs_a_cosine_from_lr_to_a_thousandth_over_the_period():
    args = coreg.parse_args(
        [
            "--data",
            "synthetic",
            "--arch",
            "narrow",
            "--queue-size",
            "8",
            "--warm-up",
            "1000",
            "--lr",
            "0.01",
            "--epochs",
            "100",
        ]
    )
    peers = build_peers(args, 3, 4, torch.Generator().manual_seed(0))
    assert args.cosine_epochs is None  # main's period is then --epochs

    def lr_at(epoch, period=args.epochs):
        coreg.set_lr([peer.opt for peer in peers], args.lr, epoch, period)
        return [group["lr"] for peer in peers for group in peer.opt.param_groups]

    assert lr_at(0) == pytest.approx([0.01, 0.01])
    assert lr_at(50) == pytest.approx([0.01 * (1e-3 + (1 - 1e-3) * 0.5)] * 2)
    assert lr_at(100) == pytest.approx([1e-5, 1e-5])
    assert min(lr_at(100, period=800)) > 0.009  # the released 800-epoch period (--cosine-epochs 800) stops at a high LR
    assert common.cosine(100, 100, floor=1e-3) == pytest.approx(1e-3) and common.cosine(0, 100, floor=1e-3) == 1.0


# -----------------------------------------------------------------------------
# One co-training epoch (and one warm-up epoch): the batches the loop forms


def co_world(n_clean, n_noisy, B, C=3, size=8):
    """Both networks' states and a division with the first n_clean images clean. Clean images are white,
    noisy ones black, so a network's input tells which split it came from (max 1 vs 0 after the identity
    normalisation). -> (flags, pool, peers, div)"""
    N = n_clean + n_noisy
    args = coreg.parse_args(
        ["--data", "synthetic", "--arch", "narrow", "--queue-size", "64", "--warm-up", "2", "--quiet"]
    )
    flags = coreg.CoTrainFlags(**{f.name: getattr(args, f.name) for f in dataclasses.fields(coreg.CoTrainFlags)})
    g = torch.Generator().manual_seed(0)
    x = torch.cat(
        [
            torch.full((n_clean, 3, size, size), 255, dtype=torch.uint8),
            torch.zeros((n_noisy, 3, size, size), dtype=torch.uint8),
        ]
    )
    S = F.one_hot(torch.arange(N) % C, C).bool() | F.one_hot((torch.arange(N) + 1) % C, C).bool()
    pool = image_pool(x, B, g, S)
    peers = build_peers(args, C, N, g)
    s_hat = S.float() / S.sum(1, keepdim=True)
    div = coreg.Division(w=torch.full((N,), 0.9), clean=torch.arange(N) < n_clean, s_hat=s_hat)
    return flags, pool, peers, div


def train_first(flags, pool, peers, div, epoch):
    """coreg.train_epoch of the first network on div, the second one co-guessing, with fresh prototypes and
    pseudo-labels. -> its mean losses"""
    protos = torch.zeros(div.s_hat.shape[1], coreg.EMB_DIM)
    pseudolabels = torch.zeros(len(pool.x), dtype=torch.long)
    return coreg.train_epoch(
        peers[0], peers[1].net, div, pool, protos=protos, pseudolabels=pseudolabels, flags=flags, epoch=epoch
    )


def record_inputs(net):
    """Wrap net's forward to log (batch size, 'x' | 'u') per call: the split a white / black batch came from."""
    seen, forward = [], net.forward

    def logged(x):
        seen.append((len(x), "x" if x.amax() > 0.5 else "u"))
        return forward(x)

    net.forward = logged
    return seen


class IndexLog:
    """A tensor stand-in that logs every index it is read with."""

    def __init__(self, t):
        self.t, self.reads = t, []

    def __getitem__(self, idx):
        self.reads.append(idx.clone())
        return self.t[idx]

    def __len__(self):
        return len(self.t)


def test_weak_views_of_each_split_go_through_the_training_network_as_separate_batches_in_the_releases_order():
    # release train(): net(u_w1), net(u_w2), net2(u_w1), net2(u_w2), then net(x_w1), net(x_w2): BatchNorm
    # normalises each view of each split with that batch's own statistics
    flags, pool, peers, div = co_world(n_clean=8, n_noisy=8, B=8)
    net_seen, other_seen = record_inputs(peers[0].net), record_inputs(peers[1].net)
    train_first(flags, pool, peers, div, flags.warm_up)
    assert net_seen[:4] == [(8, "u"), (8, "u"), (8, "x"), (8, "x")]  # targets: u_w1, u_w2, x_w1, x_w2
    assert [n for n, _ in net_seen[4:]] == [32, 16]  # then the mixed strong views, then the contrastive queries
    assert other_seen == [(8, "u"), (8, "u")]  # the other network guesses from u_w1 and u_w2


def test_each_epoch_is_one_pass_over_the_data_with_a_short_last_batch():
    # warm-up: every image once in batches of 2B (DataLoader, shuffle=True); 10 images, B = 2 -> 4, 4, 2
    _, pool, peers, _ = co_world(n_clean=10, n_noisy=0, B=2)
    pool.S = IndexLog(pool.S)
    coreg.warmup_epoch(peers[0], pool, quiet=True)
    assert [len(i) for i in pool.S.reads] == [4, 4, 2]
    assert torch.cat(pool.S.reads).sort().values.tolist() == list(range(10))
    # co-training: every clean image once (10 clean, B = 4 -> 4, 4, 2), the noisy split cycled alongside
    flags, pool, peers, div = co_world(n_clean=10, n_noisy=6, B=4)
    div.w = IndexLog(div.w)  # read once per step, with the clean batch
    train_first(flags, pool, peers, div, flags.warm_up)
    assert [len(i) for i in div.w.reads] == [4, 4, 2]
    assert torch.cat(div.w.reads).sort().values.tolist() == list(range(10))


def test_lambda_u_ramp_counts_the_releases_n_clean_over_b_plus_one_steps_an_epoch():
    # release: num_iter = len(labeled set) // batch_size + 1, so with 8 clean images in batches of 4 the loop runs
    # 2 steps and the last one is at progress epoch + 1/3 (not epoch + 1/2)
    assert coreg.ramp_steps(8, 4) == 3 and coreg.ramp_steps(10, 4) == 3 and coreg.ramp_steps(3, 4) == 1
    flags, pool, peers, div = co_world(n_clean=8, n_noisy=4, B=4)
    out = train_first(flags, pool, peers, div, flags.warm_up + 1)
    assert out["lambda_u"] == pytest.approx((1 + 1 / 3) / 16)  # λ_u = 1 · (epoch + 1/3 − warm_up) / 16 = 1/12


def test_an_epoch_with_no_clean_sample_runs_no_iteration():
    flags, pool, peers, div = co_world(n_clean=0, n_noisy=6, B=4)
    peer = peers[0]
    before = copy.deepcopy(peer.net.state_dict())
    steps, step = [], peer.opt.step
    peer.opt.step = lambda *a, **k: (steps.append(1), step(*a, **k))[1]
    out = train_first(flags, pool, peers, div, flags.warm_up + 5)
    assert steps == [] and out["loss"] == 0.0
    assert all(torch.equal(before[k], v) for k, v in peer.net.state_dict().items())  # weights and BN statistics


def test_run_sh_passes_coreg_one_epoch_more_than_the_releases_flag():
    # release train.py loops over range(num_epochs + 1); its flag is 800 on CIFAR / SVHN, 100 on the others
    env = {**os.environ, "PYTHON": "echo", "SEEDS": "1"}  # echo prints each command line instead of running it
    out = subprocess.run(
        ["bash", "run.sh", "coreg"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=True
    ).stdout
    epochs = {}
    for line in out.splitlines():
        words = line.split()
        if words[:1] == ["coreg.py"]:
            epochs[words[words.index("--data") + 1]] = int(words[words.index("--epochs") + 1])
    assert epochs == {
        "cifar10": 801,
        "cifar100": 801,
        "svhn": 801,
        "fashion_mnist": 101,
        "eurosat": 101,
        "fer2013": 101,
        "gtsrb": 101,
    }


# -----------------------------------------------------------------------------
# End to end (CPU, synthetic data, random tiny CLIP)

SMOKE = [
    "--data",
    "synthetic",
    "--clip-model",
    "tiny",
    "--pretrained",
    "none",
    "--arch",
    "narrow",
    "--epochs",
    "3",
    "--warm-up",
    "1",
    "--start-cont",
    "0",
    "--quiet",
]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Three runs: seed 1 twice, seed 2 once. One thread: much faster for these tiny ops on a shared CPU."""
    tmp, threads = tmp_path_factory.mktemp("coreg"), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {
            name: coreg.main(SMOKE + ["--cache-dir", str(tmp / "cache"), "--out-dir", str(tmp / name), "--seed", seed])
            for name, seed in (("a", "1"), ("b", "1"), ("c", "2"))
        }
    finally:
        torch.set_num_threads(threads)
    return tmp, runs


def test_smoke_run_writes_results_and_networks(smoke):
    tmp, runs = smoke
    m = runs["a"]
    for key in (
        "test_acc",
        "test_acc_net1",
        "test_acc_net2",
        "pseudolabel_acc",
        "clean_frac",
        "cand_coverage",
        "noisy_label_acc",
        "zeroshot_test_acc",
    ):
        assert 0.0 <= m[key] <= 1.0, key
    assert 1.0 <= m["cand_size"] <= 4.0 and m["params_deployed"] > 0 and m["params_clip_image"] > 0
    res = json.loads((tmp / "a" / "results.json").read_text())
    assert res["metrics"]["test_acc"] == m["test_acc"] and len(res["history"]) == 3
    warm, co, cont = res["history"]  # epoch 1 warm-up, epoch 2 co-training, epoch 3 + prototypes and SupCon
    assert warm["clean"] is None and co["x"] > 0 and co["cont"] == co["proto"] == 0 and cont["cont"] > 0
    assert cont["proto"] > 0  # released rule: both start once epoch (0-based) > warm_up + start_cont
    assert 0 <= co["lambda_u"] < 1 / 16 <= cont["lambda_u"] < 2 / 16  # ramped per iteration from 0
    assert res["metrics"]["acc_after_warmup"] == warm["acc"] and len(res["per_class_test_acc"]) == 4
    nets = torch.load(tmp / "a" / "coreg_nets.pt", weights_only=True)
    net = coreg.build_net("narrow", 4, 0, "cpu")
    net.load_state_dict(nets["net2"])


def test_smoke_run_saves_candidate_sets_and_pseudolabels_as_plain_tensors(smoke):
    tmp, runs = smoke
    saved = torch.load(tmp / "a" / "pseudolabels.pt", weights_only=True)
    N = json.loads((tmp / "a" / "results.json").read_text())["split"]["n_train"]
    S = saved["candidate_sets"]
    assert set(saved) == {"candidate_sets", "noisy_label", "pseudolabels", "classnames"}
    assert S.dtype == torch.bool and S.shape == (N, 4) and S.any(1).all()
    assert saved["noisy_label"].shape == saved["pseudolabels"].shape == (N,)
    assert S[torch.arange(N), saved["noisy_label"]].all()  # template 0's top-1 is one of the union's candidates
    assert saved["classnames"] == ["red", "green", "blue", "yellow"]
    y = torch.arange(N) % 4  # the synthetic set's training labels
    assert (saved["pseudolabels"] == y).float().mean().item() == pytest.approx(runs["a"]["pseudolabel_acc"])
    assert (saved["noisy_label"] == y).float().mean().item() == pytest.approx(runs["a"]["noisy_label_acc"])


def test_same_seed_same_metrics(smoke):
    _, runs = smoke
    assert runs["a"] == runs["b"]


def test_different_seed_changes_the_training_run(smoke):
    tmp, _ = smoke
    history = [json.loads((tmp / r / "results.json").read_text())["history"] for r in ("a", "c")]
    assert [h["loss"] for h in history[0]] != [h["loss"] for h in history[1]]


def test_demo_data_switches_to_the_cpu_defaults_and_explicit_flags_win():
    a = coreg.parse_args(["--data", "demo"])
    assert (a.arch, a.epochs, a.warm_up, a.start_cont, a.batch_size, a.lr) == ("narrow", 10, 6, 1, 64, 0.05)
    assert a.epochs >= a.warm_up + a.rampup + 1  # λ_u reaches full weight before the end
    assert coreg.parse_args(["--data", "demo", "--epochs", "3", "--arch", "preact18"]).epochs == 3
    assert coreg.parse_args(["--data", "demo", "--arch", "preact18"]).arch == "preact18"
    assert coreg.parse_args(["--data", "synthetic"]).arch == "preact18"


def test_progress_is_not_silenced_when_stdout_is_a_log_file(tmp_path, monkeypatch):
    """Without --quiet, Co-Reg's long loops report progress in a log file too (one plain line every 30 s)."""
    seen = []
    real = coreg.common.progress
    monkeypatch.setattr(
        coreg.common, "progress", lambda it, desc, quiet=False, **kw: seen.append(quiet) or real(it, desc, quiet, **kw)
    )
    flags = [f for f in SMOKE if f != "--quiet"] + [
        "--epochs",
        "2",
        "--cache-dir",
        str(tmp_path / "c"),
        "--out-dir",
        str(tmp_path / "o"),
    ]
    coreg.main(flags)  # pytest captures stdout: not a terminal
    assert seen and not any(seen)
