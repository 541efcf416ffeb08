"""Tests for coreg.py (Co-Reg): hand-checked pieces of the algorithm, then a CPU smoke run.

    python -m pytest -q test_coreg.py

Offline and CPU-only: the smoke runs use --data synthetic and the random 'tiny' CLIP (about 30 s).
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import coreg

# -----------------------------------------------------------------------------
# Annotation


def test_candidate_union_collects_each_templates_top1():
    # 3 templates, 2 images, 4 classes: image 0 -> top-1s {0, 0, 2}, image 1 -> {3, 3, 3}
    probs = torch.tensor([[[.7, .1, .1, .1], [.1, .1, .1, .7]],
                          [[.6, .2, .1, .1], [.1, .1, .2, .6]],
                          [[.3, .1, .5, .1], [.2, .1, .1, .6]]])  # [T, N, C]
    S = coreg.candidate_sets(probs, "union")
    assert S.tolist() == [[True, False, True, False], [False, False, False, True]]


def test_candidate_topk_and_ratio_use_the_template_mean():
    probs = torch.tensor([[[.5, .3, .15, .05]]])  # one template, one image
    assert coreg.candidate_sets(probs, "topk", k=2).tolist() == [[True, True, False, False]]
    # ratio 0.5: keep p >= 0.25 -> classes 0 and 1
    assert coreg.candidate_sets(probs, "ratio", k=4, ratio=0.5).tolist() == [[True, True, False, False]]


def test_annotation_stats_hand_values():
    probs = torch.tensor([[[.9, .1], [.2, .8], [.6, .4]]])  # template 0 labels: 0, 1, 0
    S = torch.tensor([[True, False], [True, True], [False, True]])
    stats = coreg.annotation_stats(probs, S, torch.tensor([0, 0, 0]))
    assert stats["cand_size"] == pytest.approx(4 / 3)
    assert stats["cand_coverage"] == pytest.approx(2 / 3)
    assert stats["noisy_label_acc"] == pytest.approx(2 / 3)


# -----------------------------------------------------------------------------
# Losses and targets


def test_partial_ce_is_minus_log_candidate_mass_and_skips_all_class_sets():
    logits = torch.tensor([[1., 2., 3., 4.], [5., 0., 0., 0.]]).log()  # p = [.1, .2, .3, .4] in row 0
    S = torch.tensor([[False, True, False, True], [True, True, True, True]])  # row 1: all classes -> skipped
    assert coreg.partial_ce(logits, S).item() == pytest.approx(-math.log(0.6), abs=1e-6)
    assert coreg.partial_ce(logits[1:], S[1:]).item() == 0.0


def test_negative_entropy_of_uniform_is_minus_log_c():
    assert coreg.neg_entropy(torch.zeros(3, 5)).item() == pytest.approx(-math.log(5))


def test_maxi_cand_loss_uses_the_best_candidate():
    p = torch.tensor([[.5, .3, .2]])
    S = torch.tensor([[False, True, True]])
    assert coreg.maxi_cand_loss(p, S).item() == pytest.approx(-math.log(0.3))


def test_distribution_alignment_divides_by_the_buffer_mean_not_the_batch_mean():
    p = torch.tensor([[.9, .1]])
    buffer = torch.tensor([[.9, .1], [.5, .5]])  # mean [.7, .3]
    q = coreg.distribution_alignment(p, buffer, torch.tensor([.5, .5]))
    a, b = .9 / .7, .1 / .3
    assert torch.allclose(q[0], torch.tensor([a / (a + b), b / (a + b)]))
    r = coreg.distribution_alignment(torch.rand(50, 7, generator=torch.Generator().manual_seed(0)).softmax(1),
                                     torch.full((9, 7), 1 / 7), torch.full((7,), 1 / 7))
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


def test_eval_pass_updates_the_da_buffer_batch_by_batch():
    x = torch.tensor([0, 255, 255, 0], dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 3, 8, 8).contiguous()
    mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    p_raw = torch.stack([torch.tensor([v, 0.]).softmax(0) for v in (0., 1., 1., 0.)])  # [4, 2]
    buffer, prior = torch.full((4, 2), 0.5), torch.tensor([.5, .5])
    p = coreg.eval_pass(PixelNet(4, 4), x, buffer, prior, 2, torch.Generator().manual_seed(0), mean, std, "cpu")
    first = torch.cat([p_raw[:2], torch.full((2, 2), 0.5)])  # batch 1 sees the old rows 2-3 in the buffer
    assert torch.allclose(p[:2], coreg.distribution_alignment(p_raw[:2], first, prior), atol=1e-6)
    assert torch.allclose(p[2:], coreg.distribution_alignment(p_raw[2:], p_raw, prior), atol=1e-6)
    assert torch.allclose(buffer, p_raw)
    off = coreg.eval_pass(PixelNet(4, 4), x, buffer.clone(), prior, 2, torch.Generator(), mean, std, "cpu", da=False)
    assert torch.allclose(off, p_raw)


def test_eval_pass_sees_weak_views():
    x = torch.full((64, 3, 8, 8), 255, dtype=torch.uint8)
    mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    p = coreg.eval_pass(PixelNet(0, 0), x, torch.full((64, 2), .5), torch.tensor([.5, .5]), 64,
                        torch.Generator().manual_seed(0), mean, std, "cpu", da=False)
    corner_is_padding = p[:, 0] < 0.6  # softmax([0, 0]) = 0.5 where the crop put zero padding in the corner
    assert 0 < corner_is_padding.sum() < 64


def test_sharpen_hand_value_and_identity_at_t_one():
    p = torch.tensor([[.6, .4]])
    assert torch.allclose(coreg.sharpen(p, 0.5), torch.tensor([[.36 / .52, .16 / .52]]))
    assert torch.allclose(coreg.sharpen(p, 1.0), p)


def test_co_refine_interpolates_between_other_net_and_own_prediction():
    s_hat, p_own = torch.tensor([[1., 0.]]), torch.tensor([[.2, .8]])
    assert torch.allclose(coreg.co_refine(s_hat, torch.tensor([1.]), p_own, 1.0), s_hat)
    assert torch.allclose(coreg.co_refine(s_hat, torch.tensor([0.]), p_own, 1.0), p_own)
    assert torch.allclose(coreg.co_refine(s_hat, torch.tensor([.5]), p_own, 1.0), torch.tensor([[.6, .4]]))


def test_mixup_targets_sum_to_one_and_stay_nearer_their_own_sample():
    t = F.one_hot(torch.arange(8) % 3, 3).float()
    x = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    xm, tm = coreg.mixup(x, t, 4.0, torch.Generator().manual_seed(1))
    assert torch.allclose(tm.sum(1), torch.ones(8))
    assert (tm[t.bool()] >= 0.5 - 1e-6).all()  # λ = max(λ, 1 − λ) on the own label
    xm2, tm2 = coreg.mixup(x, t, 4.0, torch.Generator().manual_seed(1))
    assert torch.equal(xm, xm2) and torch.equal(tm, tm2)


def test_lambda_u_ramp_is_stepped_per_iteration_from_zero():
    assert coreg.lambda_u_ramp(10, 0, 40, 10, 1.0) == 0.0  # first co-training step
    assert coreg.lambda_u_ramp(10, 20, 40, 10, 1.0) == pytest.approx(0.5 / 16)
    assert coreg.lambda_u_ramp(13, 10, 40, 10, 2.0) == pytest.approx(2 * 3.25 / 16)
    assert coreg.lambda_u_ramp(26, 0, 40, 10, 1.0) == 1.0 and coreg.lambda_u_ramp(5, 0, 40, 10, 1.0) == 0.0


def test_semi_loss_is_zero_for_an_empty_noisy_split():
    loss_x, loss_u = coreg.semi_loss(torch.zeros(2, 4), torch.full((2, 4), .25), torch.zeros(0, 4), torch.zeros(0, 4))
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
    assert pos.tolist() == [[F_, F_, F_, T, F_, F_, T, F_],   # clean 0: own key + clean queue 0
                            [F_, F_, F_, F_, T, F_, F_, F_],  # noisy 0: own key only
                            [F_, F_, F_, F_, F_, T, F_, F_]]  # clean 1: own key (queue 1 is noisy)
    assert valid.tolist() == [[F_, F_, T, T, F_, T, T, T],    # self out; same label with a noisy one: ignored
                              [F_, F_, T, F_, T, T, F_, T],   # noisy anchor: every same-label pair ignored
                              [T, T, F_, T, T, T, T, F_]]
    assert not (pos & ~valid).any()


def test_supcon_loss_with_orthogonal_contrasts_hand_value():
    q = torch.eye(4)[:2]  # anchors e0, e1; their keys are the same vectors; queue: e2, e3
    contrast = torch.cat([q, q, torch.eye(4)[2:]])  # [q, k, queue]: 6 rows
    pos, valid = coreg.supcon_mask(torch.tensor([0, 1]), torch.tensor([True, True]),
                                   torch.tensor([2, 3]), torch.ones(2, dtype=torch.bool))
    expected = -math.log(math.e / (math.e + 4))  # at τ = 1: e^1 for the own key, e^0 for 4 others (self left out)
    assert coreg.supcon_loss(q, contrast, pos, valid, tau=1.0).item() == pytest.approx(expected, rel=1e-5)


def test_prototypes_ema_per_sample_then_renormalised_once_per_batch():
    protos = torch.zeros(2, 3)
    coreg.update_prototypes(protos, torch.tensor([[1., 0., 0.], [0., 1., 0.]]), torch.tensor([1, 1]), m=0.5)
    assert protos[0].abs().sum() == 0  # never updated: stays zero
    assert torch.allclose(protos[1], torch.tensor([1., 2., 0.]) / math.sqrt(5))  # .5·(.5·e0) + .5·e1, normalised


def test_queue_starts_random_and_is_a_ring_buffer():
    q = coreg.new_queue(4, 3, torch.Generator().manual_seed(0), "cpu")
    assert torch.allclose(q["emb"].norm(dim=1), torch.ones(4)) and q["labels"].max() < 3
    for i in range(3):
        coreg.enqueue(q, torch.full((2, coreg.EMB_DIM), float(i)), torch.full((2,), i), torch.ones(2, dtype=torch.bool))
    assert q["ptr"] == 2 and q["labels"].tolist() == [2, 2, 1, 1]


def test_contrastive_step_updates_key_encoder_and_queue_even_when_the_loss_is_off():
    net = coreg.build_net("narrow", 3, 0, "cpu")
    key = coreg.build_net("narrow", 3, 1, "cpu").requires_grad_(False)
    k0, q0 = next(key.parameters()).clone(), next(net.parameters()).clone()
    st = {"net": net, "key": key, "queue": coreg.new_queue(8, 3, torch.Generator().manual_seed(0), "cpu")}
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels, clean = torch.tensor([0, 1, 2, 0]), torch.tensor([True, True, False, False])
    loss = coreg.contrastive_step(st, x, x, labels, clean, on=False)
    assert loss.item() == 0.0 and st["queue"]["ptr"] == 4 and st["queue"]["labels"][:4].tolist() == [0, 1, 2, 0]
    assert torch.allclose(next(key.parameters()), coreg.MOCO_M * k0 + (1 - coreg.MOCO_M) * q0)
    assert coreg.contrastive_step(st, x, x, labels, clean, on=True).item() > 0 and st["queue"]["ptr"] == 0


def test_divide_recopies_the_key_encoder_and_extends_the_loss_history():
    net, key = coreg.build_net("narrow", 3, 0, "cpu"), coreg.build_net("narrow", 3, 1, "cpu")
    st = {"net": net, "key": key, "loss_history": [], "pred_dist": torch.full((6, 3), 1 / 3)}
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    S = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1]]).bool()
    mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    div = coreg.divide(st, x, S, torch.full((3,), 1 / 3), 0.5, 4, torch.Generator(), mean, std, "cpu", True)
    assert all(torch.equal(a, b) for a, b in zip(key.state_dict().values(), net.state_dict().values()))
    assert len(st["loss_history"]) == 1 and div["w"].shape == (6,) and div["s_hat"].shape == (6, 3)


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


def test_cosine_lr_runs_from_lr_to_a_thousandth():
    assert coreg.cosine_lr(0, 0.01, 100) == pytest.approx(0.01)
    assert coreg.cosine_lr(100, 0.01, 100) == pytest.approx(1e-5)
    assert coreg.cosine_lr(100, 0.01, 800) > 0.009  # the released 800-epoch period stops at a high LR


# -----------------------------------------------------------------------------
# End to end (CPU, synthetic data, random tiny CLIP)

SMOKE = ["--data", "synthetic", "--clip-model", "tiny", "--pretrained", "none", "--arch", "narrow",
         "--epochs", "3", "--warm-up", "1", "--start-cont", "0", "--quiet"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Three runs: seed 1 twice, seed 2 once. One thread: much faster for these tiny ops on a shared CPU."""
    tmp, threads = tmp_path_factory.mktemp("coreg"), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {name: coreg.main(SMOKE + ["--cache-dir", str(tmp / "cache"), "--out-dir", str(tmp / name),
                                          "--seed", seed])
                for name, seed in (("a", "1"), ("b", "1"), ("c", "2"))}
    finally:
        torch.set_num_threads(threads)
    return tmp, runs


def test_smoke_run_writes_results_and_networks(smoke):
    tmp, runs = smoke
    m = runs["a"]
    for key in ("test_acc", "test_acc_net1", "test_acc_net2", "pseudolabel_acc", "clean_frac", "cand_coverage",
                "noisy_label_acc", "zeroshot_test_acc"):
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


def test_same_seed_same_metrics(smoke):
    _, runs = smoke
    assert runs["a"] == runs["b"]


def test_different_seed_changes_the_training_run(smoke):
    tmp, _ = smoke
    history = [json.loads((tmp / r / "results.json").read_text())["history"] for r in ("a", "c")]
    assert [h["loss"] for h in history[0]] != [h["loss"] for h in history[1]]


def test_demo_data_switches_to_the_cpu_defaults_and_explicit_flags_win():
    a = coreg.parse_args(["--data", "demo"])
    assert (a.arch, a.epochs, a.warm_up, a.start_cont, a.batch_size, a.lr) == ("narrow", 16, 8, 2, 64, 0.05)
    assert a.epochs >= a.warm_up + a.rampup + 1  # λ_u reaches full weight before the end
    assert coreg.parse_args(["--data", "demo", "--epochs", "3", "--arch", "preact18"]).epochs == 3
    assert coreg.parse_args(["--data", "demo", "--arch", "preact18"]).arch == "preact18"
    assert coreg.parse_args(["--data", "synthetic"]).arch == "preact18"
