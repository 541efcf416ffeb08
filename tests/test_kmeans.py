"""Unit tests for the hand-written K-Means (common.kmeans) and CAP's K-Means mismatch detection
(cap.detect_mismatch). CPU only.

Run from the repository root: python -m pytest -q tests/test_kmeans.py
"""

import pytest
import torch
import torch.nn.functional as F

import common


def blobs(n_per, centres, std, seed=0):
    """Gaussian blobs around the given centres -> (x [n_per*K, D], labels [n_per*K])."""
    g = torch.Generator().manual_seed(seed)
    k, d = centres.shape
    y = torch.arange(k).repeat_interleave(n_per)  # [N]
    return centres[y] + std * torch.randn(len(y), d, generator=g), y


def overlapping_data(n=600, d=16, k_true=12, seed=0):
    """Overlapping clusters, so Lloyd needs many iterations and seeds lead to different optima. -> [N, D]"""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k_true, d, generator=g)  # [K, D]
    y = torch.randint(k_true, (n,), generator=g)  # [N]
    return centres[y] + 0.8 * torch.randn(n, d, generator=g)


def same_partition(a, b):
    """True if the two labelings are equal up to a renaming of the clusters."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def inertia(x, c, assign):
    return ((x - c[assign]) ** 2).sum().item()


def test_kmeans_on_two_pairs_of_points_gives_centroids_half_and_ten_and_a_half():
    x = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    for seed in range(5):
        c, assign, hist = common.kmeans(x, 2, seed=seed)
        assert sorted(c.flatten().tolist()) == pytest.approx([0.5, 10.5])
        assert assign[0] == assign[1] != assign[2] == assign[3]
        assert hist[-1] == pytest.approx(1.0)  # 4 points, each 0.5 from its centroid


def test_kmeans_recovers_well_separated_gaussian_blobs_exactly():
    centres = 20 * torch.eye(5, 8)  # [5, 8], pairwise distance ~28, noise std 1
    x, y = blobs(40, centres, 1.0)
    for seed in range(3):
        _, assign, _ = common.kmeans(x, 5, seed=seed)
        assert same_partition(assign, y)


def test_kmeans_inertia_never_increases_and_matches_returned_centroids():
    x = overlapping_data()
    c, assign, hist = common.kmeans(x, 12, n_iter=50, tol=0.0, seed=0)
    assert len(hist) > 5  # the data really needs several iterations
    for before, after in zip(hist, hist[1:]):
        assert after <= before * (1 + 1e-6)  # Lloyd never increases inertia (float32 round-off allowed)
    assert hist[-1] == pytest.approx(inertia(x, c, assign), rel=1e-4)
    assert torch.equal(assign, torch.cdist(x, c).argmin(1))  # returned assignment is nearest-centroid


def test_kmeans_rejects_more_clusters_than_points():
    x = torch.arange(5.0)[:, None] * torch.tensor([[1.0, 2.0]])  # 5 distinct points
    with pytest.raises(ValueError, match="k=10"):
        common.kmeans(x, 10)
    with pytest.raises(ValueError):
        common.kmeans(x, 6)
    with pytest.raises(ValueError):
        common.kmeans(x, 0)


def test_kmeans_with_as_many_clusters_as_points_puts_each_point_alone():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [5.0, 5.0], [-2.0, 1.0]])
    c, assign, hist = common.kmeans(x, 5, seed=0)
    assert sorted(assign.tolist()) == [0, 1, 2, 3, 4]
    assert torch.allclose(c[assign], x)
    assert hist[-1] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("spherical", [False, True])
def test_kmeans_with_duplicate_points_gives_no_nan_and_no_zero_centroid(spherical):
    distinct = F.normalize(torch.tensor([[1.0, 2.0, 0.5], [-1.0, 0.5, 2.0], [0.3, -2.0, 1.0]]), dim=1)
    x = distinct.repeat_interleave(4, dim=0)  # [12, 3]: 3 distinct points, 4 copies each
    for k in (3, 5, 12):  # up to more clusters than distinct points
        c, assign, hist = common.kmeans(x, k, seed=1, spherical=spherical)
        assert torch.isfinite(c).all() and (c.norm(dim=1) > 0.5).all()
        assert torch.cdist(c, distinct).min(1).values.max() < 1e-5  # every centroid sits on a data point
        assert hist[-1] == pytest.approx(0.0, abs=1e-5)
        assert 0 <= assign.min() and assign.max() < k


@pytest.mark.parametrize("spherical", [False, True])
def test_kmeans_with_all_identical_points_returns_that_point_for_every_centroid(spherical):
    p = F.normalize(torch.tensor([1.0, -2.0, 3.0]), dim=0)
    x = p.repeat(10, 1)  # [10, 3]
    c, assign, hist = common.kmeans(x, 4, seed=0, spherical=spherical)
    assert torch.isfinite(c).all()
    assert torch.allclose(c, p.expand(4, 3), atol=1e-6)
    assert all(h == pytest.approx(0.0, abs=1e-6) for h in hist)


def test_empty_cluster_is_reseeded_at_the_farthest_point_not_the_origin():
    x = torch.tensor([[1.0], [2.0], [10.0]])
    c = torch.tensor([[1.5], [-100.0]])  # cluster 1 gets no point
    assign = torch.tensor([0, 0, 0])
    dist = ((x - c[assign]) ** 2).sum(1)  # [3]; the point at 10 is farthest
    sums, counts = torch.tensor([[13.0], [0.0]]), torch.tensor([3, 0])
    new = common._update_centroids(x, sums, counts, dist, c, spherical=False)
    assert new.flatten().tolist() == pytest.approx([13 / 3, 10.0])


def test_plain_kmeans_pp_draws_in_proportion_to_squared_distance():
    # Points 0, 1, 3. When the first centre is 0, the second is 1 with P = 1/(1+9) = 0.1 under
    # squared-distance sampling, but P = 1/(1+3) = 0.25 under plain-distance sampling.
    x = torch.tensor([[0.0], [1.0], [3.0]])
    x_sq = (x * x).sum(1)
    seconds = []
    for seed in range(900):
        c = common._kmeans_pp(x, x_sq, 2, torch.Generator().manual_seed(seed), n_trials=1)
        if c[0, 0] == 0:
            seconds.append(c[1, 0].item())
    assert len(seconds) > 200
    assert 0.0 not in seconds  # never the same point twice
    assert 0.05 < seconds.count(1.0) / len(seconds) < 0.16


def test_greedy_kmeans_pp_puts_one_centre_in_each_well_separated_blob():
    # plain k-means++ often puts two centres in one blob and none in another; greedy (best of 2 + ln k draws,
    # as scikit-learn seeds) nearly never does
    g = torch.Generator().manual_seed(0)
    centres = 30 * torch.randn(20, 16, generator=g)  # [20, 16], far apart
    x, y = blobs(30, centres, 1.0)
    x_sq = (x * x).sum(1)
    misses = {}
    for trials in (1, None):
        misses[trials] = 0
        for seed in range(20):
            c = common._kmeans_pp(x, x_sq, 20, torch.Generator().manual_seed(seed), n_trials=trials)
            misses[trials] += 20 - len(set(torch.cdist(c, centres).argmin(1).tolist()))  # blobs left without a centre
    assert misses[None] == 0 and misses[1] > 0, misses


def test_kmeans_warm_started_from_a_converged_solution_stays_there():
    x = overlapping_data(seed=3)
    c, assign, hist = common.kmeans(x, 12, n_iter=100, tol=0.0, seed=0)
    c2, assign2, hist2 = common.kmeans(x, 12, n_iter=100, tol=0.0, init=c)
    assert torch.equal(assign, assign2) and len(hist2) == 2 and hist2[-1] == pytest.approx(hist[-1], rel=1e-6)


def test_kmeans_seeded_on_a_subset_still_recovers_the_blobs():
    centres = 20 * torch.eye(6, 8)
    x, y = blobs(50, centres, 1.0)
    _, assign, _ = common.kmeans(x, 6, seed=0, seed_rows=60)  # seeding sees 60 of 300 rows
    assert same_partition(assign, y)


def test_kmeans_same_seed_same_output_and_seed_changes_it():
    x = overlapping_data(seed=1)
    a = common.kmeans(x, 12, seed=3)
    b = common.kmeans(x, 12, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    others = [common.kmeans(x, 12, seed=s) for s in (4, 5, 6)]
    assert any(not torch.equal(a[0], o[0]) for o in others)


def test_kmeans_result_does_not_depend_on_chunk_size():
    x = overlapping_data(seed=2)
    a = common.kmeans(x, 12, seed=0, chunk=4096)
    b = common.kmeans(x, 12, seed=0, chunk=37)  # many chunks, the last one partial
    assert torch.equal(a[1], b[1])
    assert torch.allclose(a[0], b[0], atol=1e-5)


def test_spherical_kmeans_gives_unit_centroids_and_recovers_clusters_on_the_sphere():
    g = torch.Generator().manual_seed(0)
    directions = F.normalize(torch.randn(4, 32, generator=g), dim=1)  # [4, 32]
    x, y = blobs(30, directions, 0.02, seed=1)
    x = F.normalize(x, dim=1)  # [120, 32] on the unit sphere, cluster radius ~0.11
    c, assign, _ = common.kmeans(x, 4, seed=0, spherical=True)
    assert torch.allclose(c.norm(dim=1), torch.ones(4), atol=1e-5)
    assert same_partition(assign, y)
    assert (c @ directions.T).max(1).values.min() > 0.99  # each centroid points at a true direction


def test_kmeans_stops_early_once_assignments_stop_changing():
    centres = 20 * torch.eye(3, 4)
    x, _ = blobs(20, centres, 0.5)
    _, _, hist = common.kmeans(x, 3, n_iter=100, tol=0.0, seed=0)
    assert len(hist) < 10


# CAP §3.1 mismatch detection, against an independent re-implementation of the released notebook loop


def notebook_loop(feats, text, t, scale, cluster):
    """The release's removal loop, written as the notebook writes it (lists, a per-class leaderboard sorted by
    confidence), stopped at t classes (the paper's rule). -> (Y_final, remaining image ids)"""
    remaining, classes = list(range(len(feats))), list(range(len(text)))
    avg_size = int(len(feats) / len(text))
    while len(classes) > t:
        f = feats[remaining]
        centres, labels, _ = cluster(f, len(classes))
        centres = F.normalize(centres, dim=1)
        probs_c = (scale * text[classes] @ centres.T).softmax(1)  # [R, R]
        best = probs_c.max()
        ci = next(r for r in range(len(classes)) if probs_c[r].max() == best)
        cj = probs_c[ci].argmax().item()
        probs_i = (scale * f @ text[classes].T).softmax(1)  # [n, R]
        board = sorted(((p.max().item(), n) for n, p in enumerate(probs_i) if p.argmax().item() == ci), reverse=True)
        used, kept = set(), 0
        for _, n in board:
            if labels[n] == cj and kept < avg_size:
                kept += 1
                used.add(remaining[n])
        for _, n in board:
            if remaining[n] not in used and len(used) < avg_size:
                used.add(remaining[n])
        remaining = [r for r in remaining if r not in used]
        classes.pop(ci)
    return classes, remaining


def sorted_pool_world(seed, C=8, d=24):
    """Images stored class by class (as torchvision pools are), unequal class sizes, text near each class
    mean, so zero-shot confidence varies within a class and the removal order matters."""
    g = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(C, d, generator=g), dim=1)  # [C, D]
    sizes = torch.randint(25, 70, (C,), generator=g)  # [C]
    y = torch.arange(C).repeat_interleave(sizes)  # [N], sorted by class
    feats = F.normalize(means[y] + 0.25 * torch.randn(len(y), d, generator=g), dim=1)  # [N, D]
    text = F.normalize(means + 0.3 * torch.randn(C, d, generator=g), dim=1)  # [C, D]
    return feats, text


def test_mismatch_removal_follows_the_notebook_confidence_order_on_class_sorted_pools(monkeypatch):
    """The release removes the images predicted i* most confident first; index order (what a class-sorted
    pool gives) would remove other images and change the leftover clusters."""
    import cap

    real_kmeans = common.kmeans

    def cluster(x, k, **kw):
        return real_kmeans(x, k, seed=0, spherical=True, n_init=2)  # one fixed clustering for both

    monkeypatch.setattr(common, "kmeans", cluster)
    t, scale = 3, 20.0  # a moderate scale: no softmax ties at 1.0, so "most confident first" is unambiguous
    for seed in range(6):
        feats, text = sorted_pool_world(seed)
        zs_pred = (feats @ text.T).argmax(1)
        y_final, remaining = notebook_loop(feats, text, t, scale, cluster)
        low_t = set(torch.bincount(zs_pred, minlength=len(text)).argsort(stable=True)[:t].tolist())
        mismatched, centres = cap.detect_mismatch(feats, text, zs_pred, t, seed=0, scale=scale)
        assert mismatched == [c for c in y_final if c in low_t], seed
        expected = cluster(feats[remaining], len(y_final))[0]  # same leftover images <=> same centres
        assert centres.shape == expected.shape and torch.allclose(centres, expected, atol=1e-6), seed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_mismatch_detection_runs_on_gpu_features_and_matches_cpu():
    import cap

    feats, text = sorted_pool_world(0)
    cpu = cap.detect_mismatch(feats, text, None, 3, scale=20.0)  # zs_pred None: Y_final itself
    gpu = cap.detect_mismatch(feats.cuda(), text.cuda(), None, 3, scale=20.0)
    assert cpu[0] == gpu[0] and torch.allclose(cpu[1], gpu[1].cpu(), atol=1e-4)


def test_match_log_odds_ranks_as_the_softmax_and_stays_finite_at_clip_scale():
    import cap

    g = torch.Generator().manual_seed(0)
    z = 100 * torch.randn(30, 30, generator=g)  # CLIP's scale: P rounds to 1.0 in many rows
    odds = cap.match_log_odds(z)
    direct = -(z[:, None, :] - z[:, :, None]).masked_fill(torch.eye(30, dtype=torch.bool), float("-inf")).logsumexp(-1)
    assert torch.isfinite(odds).all() and torch.allclose(odds, direct, atol=1e-3)
    p = z.softmax(1)
    moderate = (p > 1e-6) & (p < 1 - 1e-6)  # where float32 P still orders the pairs
    assert torch.equal(odds[moderate].argsort(), p[moderate].argsort())


def test_fast_removal_loop_finds_the_planted_classes_like_the_exact_loop():
    import cap

    g = torch.Generator().manual_seed(0)
    C, per, d = 12, 30, 32
    means = F.normalize(torch.randn(C, d, generator=g), dim=1)  # [C, D]
    y = torch.arange(C).repeat_interleave(per)
    feats = F.normalize(means[y] + 0.15 * torch.randn(len(y), d, generator=g), dim=1)  # [N, D]
    text = means.clone()
    text[[2, 9]] = F.normalize(torch.randn(2, d, generator=g), dim=1)  # two wrong names: unrelated text
    zs_pred = (feats @ text.T).argmax(1)
    exact = cap.detect_mismatch(feats, text, zs_pred, t=2, n_init=5, fast=False)
    fast = cap.detect_mismatch(feats, text, zs_pred, t=2, n_init=5, fast=True)
    assert sorted(exact[0]) == sorted(fast[0]) == [2, 9]
    for _, centres in (exact, fast):  # the leftover clusters are the planted classes' images
        assert sorted((centres @ means.T).argmax(1).tolist()) == [2, 9]
