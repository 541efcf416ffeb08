"""CAP unit and end-to-end tests (CPU, offline, the tiny random CLIP): `python -m pytest -q tests/test_cap.py`.

The hand-computed cases check the paper's formulas (§3.1-§3.3); the section "the released code" checks each
behaviour of cap.RELEASE_BEHAVIOURS against a hand trace of the release, and that each --release name reaches
the code it changes. The end-to-end runs use --data synthetic (4 classes, 64 training and 32 test images)."""

import json
import math
import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cap
import common
import data

TINY = [
    "--data",
    "synthetic",
    "--clip-model",
    "tiny",
    "--pretrained",
    "none",
    "--epochs",
    "2",
    "--iters",
    "2",
    "--quiet",
]
CLASSES = ["red", "green", "blue", "yellow"]  # --data synthetic, in label order
N_TRAIN = 64  # --data synthetic's training images


def run(tmp_path, *extra, name="run"):
    return cap.main(TINY + ["--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / name), *extra])


def results(tmp_path, name="run"):
    return json.loads((tmp_path / name / "results.json").read_text())


def closed_port_url():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


# flags: paper defaults, per-dataset values, release switches ------------------


def test_flags_default_to_the_papers_values():
    a = cap.parse_args([])
    assert (a.data, a.clip_model, a.pretrained) == ("dtd", "ViT-B-32", "openai")
    assert (a.n_main, a.tau, a.margin_scale, a.epochs, a.iters, a.batch_size) == (16, 0.85, 12.0, 50, 50, 32)
    assert (a.crop_min, a.lr, a.wd, a.expand_every, a.max_main_ratio) == (0.08, 0.01, 0.1, 5, 0.8)
    assert (a.detect, a.kmeans_restarts, a.mismatch_t) == ("exact", 20, None)  # t = ⌈C/10⌉ at run time


def test_dataset_defaults_apply_and_a_typed_flag_wins():
    demo = cap.parse_args(["--data", "demo"])
    assert (demo.n_main, demo.mismatch_t, demo.epochs, demo.iters, demo.crop_min) == (32, 2, 10, 20, 0.5)
    assert (demo.clip_model, demo.pretrained) == ("tiny-demo", "demo")  # data.CLIP_DEFAULTS
    assert cap.parse_args(["--data", "flowers102"]).n_main == 6
    air = cap.parse_args(["--data", "fgvc_aircraft"])
    assert (air.tau, air.max_main_ratio) == (0.5, 0.6)
    inet = cap.parse_args(["--data", "imagenet"])
    assert (inet.detect, inet.kmeans_restarts) == ("fast", 1)
    typed = cap.parse_args(["--data", "demo", "--n-main", "8", "--clip-model", "tiny", "--detect", "exact"])
    assert (typed.n_main, typed.clip_model, typed.epochs, typed.detect) == (8, "tiny", 10, "exact")
    assert cap.parse_args(["--data", "imagenet", "--detect", "exact"]).detect == "exact"


def test_release_names_become_one_bool_each_and_an_unknown_name_is_a_usage_error():
    with pytest.raises(SystemExit) as e:
        cap.parse_args(["--release", "margin-formula,nonsense"])
    assert e.value.code == 2
    names = [b.replace("-", "_") for b in cap.RELEASE_BEHAVIOURS]
    assert "eurosat_pool" in names and "no_low_t" in names
    rel = common.release_settings(cap.parse_args(["--as-released"]), cap.RELEASE_BEHAVIOURS)
    assert vars(rel) == dict.fromkeys(names, True)
    rel = common.release_settings(cap.parse_args(["--release", "flip,no-low-t"]), cap.RELEASE_BEHAVIOURS)
    assert {k for k, v in vars(rel).items() if v} == {"flip", "no_low_t"}
    assert not any(vars(common.release_settings(cap.parse_args([]), cap.RELEASE_BEHAVIOURS)).values())


# §3.2 calibrated margin ------------------------------------------------------

S3 = torch.tensor([[1.0, 0.8, 0.2], [0.8, 1.0, 0.4], [0.2, 0.4, 1.0]])
SIGMA3 = torch.tensor([10.0, 5.0, 0.0])


def test_paper_margin_matches_hand_computation():
    # δ = 1 − σ/max σ = [0, 0.5, 1]; Δ = max δ = 1; m_c = 12·1·δ_c = [0, 6, 12]; M_yc = m_y·S_yc
    expected = torch.tensor([[0, 0, 0], [4.8, 6.0, 2.4], [2.4, 4.8, 12.0]])
    assert torch.allclose(cap.calibrated_margin(S3, SIGMA3, 12.0), expected, atol=1e-6)
    assert torch.allclose(cap.calibrated_margin(S3, SIGMA3, 12.0, released_formula=False), expected, atol=1e-6)


def test_released_margin_matches_hand_computation():
    # rows rescaled onto [min_i, 1]: row 0 min .2 max 1 -> unchanged; row 1 min .4 max 1 -> unchanged; row 2 too.
    # r = [1, .5, 0]; Δ = (1 − 0)·12 = 12; w = 12·(1−r)/(1+r) = [0, 4, 12]
    M = cap.calibrated_margin(S3, SIGMA3, 12.0, released_formula=True)
    expected = torch.tensor([[0, 0, 0], [3.2, 4.0, 1.6], [2.4, 4.8, 12.0]])
    assert torch.allclose(M, expected, atol=1e-6)
    S = torch.tensor([[1.0, 0.6, 0.5], [0.6, 0.9, 0.5], [0.5, 0.5, 1.0]])  # row 1 max .9 < 1: stretched to 1
    M = cap.calibrated_margin(S, torch.tensor([2.0, 0.0, 2.0]), 1.0, released_formula=True)
    # row 1: min .5 max .9 -> .5 + (S − .5)/.4·.5 = [.625, 1, .5]; w_1 = 1·(1−0)/(1+0) = 1
    assert torch.allclose(M[1], torch.tensor([0.625, 1.0, 0.5]), atol=1e-6)


@pytest.mark.parametrize("as_released", [False, True])
def test_margin_is_zero_before_any_confident_prediction(as_released):
    assert cap.calibrated_margin(S3, torch.zeros(3), 12.0, as_released).abs().sum() == 0


def test_margin_ce_equals_plain_ce_when_margin_is_zero():
    logits, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    assert torch.allclose(cap.margin_cross_entropy(logits, y, torch.zeros(3, 3)), F.cross_entropy(logits, y))


def test_margin_ce_matches_the_formula():
    logits, y, M = torch.tensor([[2.0, 1.0, 0.5]]), torch.tensor([0]), torch.tensor([[9.0, 1.0, 2.0]] + [[0.0] * 3] * 2)
    # −log e^{z_y} / (e^{z_y} + Σ_{c≠y} e^{z_c + M_yc}); the diagonal M_yy = 9 must not be used
    expected = -math.log(math.exp(2) / (math.exp(2) + math.exp(1 + 1) + math.exp(0.5 + 2)))
    assert cap.margin_cross_entropy(logits, y, M).item() == pytest.approx(expected, rel=1e-6)


def test_uniform_logits_give_log_c():
    loss = cap.margin_cross_entropy(torch.zeros(4, 5), torch.arange(4), torch.zeros(5, 5))
    assert loss.item() == pytest.approx(math.log(5))


def test_masked_fixmatch_loss_is_zero_with_all_zero_mask():
    logits, y = torch.randn(8, 4), torch.randint(4, (8,))
    assert cap.fixmatch_loss(logits, y, torch.zeros(8), torch.zeros(4, 4)).item() == 0.0
    full = cap.fixmatch_loss(logits, y, torch.ones(8), torch.zeros(4, 4))
    assert full.item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)


# §3.1 mismatch detection ----------------------------------------------------


def planted_world(C=10, per=60, seed=0):
    """C well-separated clusters on the sphere; classes 3 and 7 have text pointing away from their images."""
    g = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(C, 32, generator=g), dim=1)
    labels = torch.arange(C).repeat_interleave(per)
    feats = F.normalize(means[labels] + 0.05 * torch.randn(C * per, 32, generator=g), dim=1)
    text = means.clone()
    centre = F.normalize(means.mean(0), dim=0)
    text[3] = -centre  # mismatched: unlike every cluster, so zero-shot never predicts it
    text[7] = F.normalize(means[1] - centre, dim=0)  # mismatched: leans to cluster 1, away from its own
    return feats, labels, text, means


def test_mismatch_detection_recovers_planted_classes():
    feats, labels, text, means = planted_world()
    zs_pred = (feats @ text.T).argmax(1)
    mismatched, centres = cap.detect_mismatch(feats, text, zs_pred, t=2, seed=0)
    assert sorted(mismatched) == [3, 7]
    # the leftover clusters are the images of classes 3 and 7
    assert sorted((centres @ means.T).argmax(1).tolist()) == [3, 7]


def test_descriptions_choice_picks_the_one_nearest_a_leftover_cluster():
    feats, labels, text, means = planted_world()
    centres = means[[3, 7]]
    good3, good7 = means[3], means[7]
    desc = {3: torch.stack([text[0], good3, text[5]]), 7: torch.stack([good7, text[2]])}
    assert cap.choose_descriptions(desc, centres) == {3: (1, 0), 7: (0, 1)}


def test_alignment_relabels_a_mismatched_class_with_its_images():
    feats, labels, text, means = planted_world()
    probs = (100 * feats @ text.T).softmax(1)
    dpl = cap.initial_pseudolabels(probs, torch.arange(10), 16)
    before = cap.dpl_accuracy(dpl, labels)
    after = cap.dpl_accuracy(cap.align_pseudolabels(dpl, feats, {3: means[3], 7: means[7]}, 16), labels)
    assert after > before and after == 1.0


# §3.3 model ---------------------------------------------------------------------


def test_adapters_are_identity_at_inference_and_residual_in_training():
    adapters = cap.build_adapters(8)
    x = F.normalize(torch.randn(4, 8), dim=1)
    assert torch.equal(cap.adapt(adapters["main"], x, training=False), x)
    y = cap.adapt(adapters["main"], x, training=True)
    assert not torch.equal(y, x) and torch.allclose(y.norm(dim=1), torch.ones(4))


def test_maple_prompts_start_at_the_plain_prompt():
    """With zero deep prompts, the text encoder reproduces CLIP's own 'a photo of a <class>.' embedding."""
    model, _, tok = common.load_clip("tiny", "none")
    learner, tokens = cap.build_maple(model, tok, ["red", "blue"], depth=1)
    plain = F.normalize(model.encode_text(tokens), dim=-1)
    assert torch.allclose(cap.encode_text_maple(model, learner, tokens), plain, atol=1e-5)


def test_clip_weights_are_unchanged_by_training(tmp_path, monkeypatch):
    captured = {}
    real = common.load_clip

    def spy(*a, **kw):
        model, pre, tok = real(*a, **kw)
        captured["model"], captured["before"] = model, {k: v.clone() for k, v in model.state_dict().items()}
        return model, pre, tok

    monkeypatch.setattr(common, "load_clip", spy)
    run(tmp_path)
    after = captured["model"].state_dict()
    assert all(torch.equal(after[k].cpu(), v.cpu()) for k, v in captured["before"].items())


# end to end ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ul", "ssl", "trzsl"])
def test_each_mode_runs_and_writes_finite_results(tmp_path, mode):
    m = run(tmp_path, "--mode", mode)
    assert all(0.0 <= v <= 1.0 for k, v in m.items() if k != "final_loss"), m
    assert math.isfinite(m["final_loss"])
    res = results(tmp_path)
    assert res["config"]["mode"] == mode and "dpl_acc_before_alignment" in res["metrics"]
    assert res["release_behaviours"] == [] and res["clip"] == {"model": "tiny", "pretrained": "none"}
    assert (res["split"]["layout"], res["split"]["n_train"], res["split"]["n_test"]) == ("generated", N_TRAIN, 32)
    assert set(res["per_class_test_acc"]) == set(CLASSES)
    if mode == "trzsl":
        assert {"seen_acc", "unseen_acc", "harmonic_mean"} <= set(m)
    # the zero-shot check (TRZSL: on H); random weights have no published cell to compare with
    zs = m["zeroshot_harmonic_mean" if mode == "trzsl" else "zeroshot_test_acc"]
    assert res["zeroshot_check"] == {
        "measured": round(100 * zs, 2),
        "published": None,
        "source": None,
        "differs": False,
    }


def test_same_seed_gives_the_same_metrics_and_the_checkpoint_reproduces_them(tmp_path):
    run(tmp_path, name="fill")  # every run below reads the same feature cache
    a, b = run(tmp_path, name="a"), run(tmp_path, name="b")
    assert a == b
    c = run(tmp_path, "--seed", "2", name="c")
    assert c != a
    ev = cap.main(
        TINY
        + [
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out-dir",
            str(tmp_path / "eval"),
            "--eval-only",
            "--checkpoint",
            str(tmp_path / "a" / "cap_prompts.pt"),
        ]
    )
    assert ev["test_acc"] == a["test_acc"]


def test_a_feature_cache_hit_gives_the_same_run_as_computing_the_features(tmp_path):
    computed = run(tmp_path, name="computed")
    cached = run(tmp_path, name="cached")
    assert cached == computed


def test_trzsl_on_a_one_class_folder_is_a_clear_error(tmp_path):
    from PIL import Image

    root = tmp_path / "one" / "only"
    root.mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (32, 32), (i * 30, 0, 0)).save(root / f"{i}.png")
    with pytest.raises(common.UserError, match="1 class.*at least 2"):
        cap.main(
            [
                "--data",
                "folder",
                "--data-dir",
                str(tmp_path / "one"),
                "--clip-model",
                "tiny",
                "--pretrained",
                "none",
                "--mode",
                "trzsl",
                "--cache-dir",
                str(tmp_path / "c"),
                "--out-dir",
                str(tmp_path / "out"),
                "--quiet",
            ]
        )


def test_unreachable_llm_warns_and_the_run_goes_on(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(common.time, "sleep", lambda s: None)  # no waits between the refused attempts
    m = run(tmp_path, "--mismatch-t", "4", "--llm-url", closed_port_url(), "--llm-model", "x")
    assert 0.0 <= m["test_acc"] <= 1.0
    assert "no class descriptions" in capsys.readouterr().err
    assert results(tmp_path)["concept_alignment"]["descriptions_source"] == "none"


def test_descriptions_file_is_used_and_malformed_file_is_a_clear_error(tmp_path):
    good = tmp_path / "d.json"
    good.write_text(json.dumps({n: [f"a {n} thing", f"something {n}"] for n in CLASSES}))
    run(tmp_path, "--mismatch-t", "4", "--descriptions", str(good))
    report = results(tmp_path)["concept_alignment"]
    assert report["chosen_descriptions"] and set(report["chosen_descriptions"]) <= set(CLASSES)
    assert report["descriptions_source"] == f"file {good}"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(common.UserError, match="bad.json"):
        run(tmp_path, "--mismatch-t", "4", "--descriptions", str(bad))


@pytest.mark.parametrize("mode", ["ul", "trzsl"])
def test_pseudolabels_file_holds_valid_pool_indices_for_every_stage(tmp_path, mode):
    f = tmp_path / "d.json"
    f.write_text(json.dumps({n: [f"a {n} thing"] for n in CLASSES}))
    run(tmp_path, "--mode", mode, "--mismatch-t", "4", "--descriptions", str(f), "--expand-every", "1")
    saved = torch.load(tmp_path / "run" / "pseudolabels.pt", weights_only=True)
    assert set(saved) == {
        "initial_dpl",
        "mismatched",
        "descriptions",
        "dpl_after_alignment",
        "dpl_expansions",
        "classnames",
    }
    assert saved["classnames"] == CLASSES
    labels = data.load_dataset("synthetic")[1]  # [64]
    unseen = [CLASSES[c] for c in cap.protocol_trzsl(4)[1].tolist()] if mode == "trzsl" else CLASSES
    pool = set(torch.isin(labels, torch.tensor([CLASSES.index(n) for n in unseen])).nonzero().flatten().tolist())
    stages = [saved["initial_dpl"], saved["dpl_after_alignment"]]
    stages += [{k: v for k, v in e.items() if k != "epoch"} for e in saved["dpl_expansions"]]
    for dpl in stages:  # {classname: [pool indices]}: only the pseudolabeled classes, only unlabeled images
        assert set(dpl) == set(unseen)
        for idx in dpl.values():
            assert idx and all(isinstance(i, int) for i in idx) and set(idx) <= pool and len(set(idx)) == len(idx)
    assert all(len(v) == 16 for v in saved["initial_dpl"].values())  # K = --n-main
    assert [e["epoch"] for e in saved["dpl_expansions"]] == [1, 2]  # every epoch with --expand-every 1
    assert set(saved["mismatched"]) <= set(unseen) and set(saved["descriptions"]) <= set(saved["mismatched"])
    assert all(saved["descriptions"][n] == f"a {n} thing" for n in saved["descriptions"])
    report = results(tmp_path)["concept_alignment"]
    assert report["mismatched_classes"] == saved["mismatched"]
    assert report["chosen_descriptions"] == saved["descriptions"]


def test_results_json_is_strict_json_with_nan_written_as_null(tmp_path, monkeypatch):
    monkeypatch.setattr(cap, "dpl_accuracy", lambda dpl, labels: float("nan"))
    m = run(tmp_path)
    assert math.isnan(m["dpl_acc_before_alignment"])  # the returned metrics keep the float
    text = (tmp_path / "run" / "results.json").read_text()

    def refuse(name):
        raise ValueError(f"results.json holds {name}")

    res = json.loads(text, parse_constant=refuse)
    assert res["metrics"]["dpl_acc_before_alignment"] is None and res["metrics"]["dpl_acc_final"] is None
    assert res["concept_alignment"]["dpl_acc_after_alignment"] is None


def test_strict_json_turns_tensors_and_numpy_into_python_and_non_finite_into_null():
    obj = {"t": torch.tensor([1.0, float("inf")]), "n": np.float32("nan"), "a": np.arange(2), 3: (1, -math.inf)}
    assert common.strict_json(obj) == {"t": [1.0, None], "n": None, "a": [0, 1], "3": [1, None]}


# zero-shot check against the published cell ------------------------------------------

OPENAI_DTD = SimpleNamespace(pretrained="openai", data="dtd", clip_model="ViT-B-32")


@pytest.fixture
def paper_file(tmp_path, monkeypatch):
    """A docs/paper_results.json stand-in with one zero-shot cell: UL, dtd, ViT-B-32 = 43.20."""
    path = tmp_path / "paper_results.json"
    path.write_text(json.dumps({"zeroshot": {"ul": {"dtd": {"ViT-B-32": {"value": 43.2, "source": "a test table"}}}}}))
    monkeypatch.setattr(common, "PAPER_RESULTS", path)
    return path


def test_zeroshot_within_tolerance_prints_both_numbers_and_does_not_warn(paper_file, capsys):
    out = common.check_zeroshot(0.44, OPENAI_DTD, "1 template", "ul")
    assert out == {"measured": 44.0, "published": 43.2, "source": "a test table", "differs": False}
    captured = capsys.readouterr()
    assert "warning:" not in captured.err and "44.00" in captured.out and "published 43.20" in captured.out


def test_zeroshot_three_points_off_warns_in_one_line_naming_the_usual_causes(paper_file, capsys):
    out = common.check_zeroshot(0.462, OPENAI_DTD, "1 template", "ul")
    assert out["differs"] is True and out["published"] == 43.2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: zero-shot differs") and "+3.00" in err[0]
    for cause in ("QuickGELU", "split", "layout", "templates", "preprocessing", "library versions"):
        assert cause in err[0]


@pytest.mark.parametrize(
    "args, prompt_set, setting",
    [
        (SimpleNamespace(pretrained="none", data="dtd", clip_model="ViT-B-32"), "1 template", "ul"),  # other weights
        (OPENAI_DTD, "27-template ensemble", "ul"),  # the published cell is for one template
        (OPENAI_DTD, "1 template", "trzsl"),  # no cell for this setting
    ],
)
def test_zeroshot_without_a_matching_published_cell_is_not_compared(paper_file, capsys, args, prompt_set, setting):
    out = common.check_zeroshot(0.10, args, prompt_set, setting)
    assert out == {"measured": 10.0, "published": None, "source": None, "differs": False}
    captured = capsys.readouterr()
    assert captured.err == "" and "no published row" in captured.out


def test_quickgelu_model_name_finds_the_same_published_cell(paper_file):
    args = SimpleNamespace(pretrained="openai", data="dtd", clip_model="ViT-B-32-quickgelu")
    assert common.check_zeroshot(0.432, args, "1 template", "ul")["published"] == 43.2


def test_shipped_paper_results_have_a_sourced_zeroshot_cell_for_dtd_vit_b_32_ul(capsys):
    cell = json.loads(common.PAPER_RESULTS.read_text())["zeroshot"]["ul"]["dtd"]["ViT-B-32"]
    assert 0 < cell["value"] < 100 and cell["source"]
    out = common.check_zeroshot(cell["value"] / 100, OPENAI_DTD, "1 template", "ul")
    assert (out["published"], out["source"], out["differs"]) == (cell["value"], cell["source"], False)


def test_a_cap_run_records_the_zeroshot_check_and_warns_when_far_from_the_published_cell(tmp_path, monkeypatch, capsys):
    path = tmp_path / "paper_results.json"
    path.write_text(json.dumps({"zeroshot": {"ul": {"synthetic": {"tiny": {"value": 99.0, "source": "a test"}}}}}))
    monkeypatch.setattr(common, "PAPER_RESULTS", path)
    real = common.load_clip
    monkeypatch.setattr(common, "load_clip", lambda name, pretrained, device: real(name, "none", device))
    m = run(tmp_path, "--pretrained", "openai")  # offline: the tiny random CLIP stands in for OpenAI's weights
    assert results(tmp_path)["zeroshot_check"] == {
        "measured": round(100 * m["zeroshot_test_acc"], 2),
        "published": 99.0,
        "source": "a test",
        "differs": True,
    }
    assert sum(line.startswith("warning: zero-shot differs") for line in capsys.readouterr().err.splitlines()) == 1


# evaluation protocols (UL / SSL / TRZSL) ---------------------------------------


def test_ssl_protocol_picks_two_distinct_images_per_class_the_same_way_every_time():
    labels = torch.arange(40) % 4  # [40], 10 images per class
    idx = cap.protocol_ssl(labels, 4)
    assert len(idx) == 8 and len(set(idx.tolist())) == 8
    assert torch.bincount(labels[idx], minlength=4).tolist() == [2, 2, 2, 2]
    assert torch.equal(cap.protocol_ssl(labels, 4), idx)


@pytest.mark.parametrize("C, n_seen, n_unseen", [(47, 29, 18), (10, 6, 4), (45, 27, 18), (102, 63, 39)])
def test_trzsl_split_has_the_papers_seen_and_unseen_sizes(C, n_seen, n_unseen):
    seen, unseen = cap.protocol_trzsl(C)
    assert (len(seen), len(unseen)) == (n_seen, n_unseen)
    assert sorted(seen.tolist() + unseen.tolist()) == list(range(C))


def test_trzsl_split_is_fixed_by_split_seed():
    seen, _ = cap.protocol_trzsl(47, split_seed=500)
    assert torch.equal(cap.protocol_trzsl(47, split_seed=500)[0], seen)
    assert not torch.equal(cap.protocol_trzsl(47, split_seed=0)[0], seen)


def test_trzsl_with_a_single_class_is_a_user_error():
    with pytest.raises(common.UserError):
        cap.protocol_trzsl(1)


# the released code: each behaviour of cap.RELEASE_BEHAVIOURS ------------------------


def test_dpl_expansion_takes_new_confident_images_first_then_tops_up_with_old_entries():
    # Epoch 0: k_e = K = 3. Image 10 is already in D_PL, so it is not "new".
    dpl = {0: torch.tensor([10, 11, 12]), 1: torch.tensor([20, 21])}
    seen_pl = {30: (0, 0.95), 31: (0, 0.99), 32: (1, 0.90), 10: (0, 0.999), 33: (0, 0.97), 34: (0, 0.96)}
    new = cap.expand_dpl(dpl, seen_pl, pool_size=100, n_main=3, epoch=0, epochs=10, ratio=0.8)
    assert new[0].tolist() == [31, 33, 34]  # three new ones: every old entry drops out
    assert new[1].tolist() == [32, 20, 21]  # one new one, topped up with the old entries in order
    # later epochs: k_e = 3 + ⌊(min(1000, ⌊50·0.8⌋) − 3)·min(1, 7/7)⌋ = 40 keeps everything, new first
    new = cap.expand_dpl(dpl, seen_pl, pool_size=100, n_main=3, epoch=7, epochs=10, ratio=0.8)
    assert new[0].tolist() == [31, 33, 34, 30, 10, 11, 12]


def test_trzsl_as_released_pseudolabels_over_all_classes_and_counts_seen_predictions_in_sigma():
    # Class 0 is seen, 1 and 2 unseen; image 0 looks like the seen class.
    logits = torch.tensor([[10.0, 0.0, 1.0], [0.0, 0.0, 10.0], [9.0, 0.0, 0.0]])
    seen, unseen = torch.tensor([0]), torch.tensor([1, 2])
    _, y_paper, _ = cap.weak_pseudolabels(logits, unseen, 0.5)
    _, y_release, mask = cap.weak_pseudolabels(logits, torch.arange(3), 0.5)
    assert y_paper.tolist() == [2, 2, 1] and y_release.tolist() == [0, 2, 0] and mask.tolist() == [1, 1, 1]
    # σ: two seen-class predictions raise max σ, so the unseen class 2 gets r = 1/2 and a margin
    seen_pl = {i: (c, 0.9) for i, c in enumerate(y_release.tolist())}
    sigma = cap.prediction_counts(seen_pl, torch.zeros(3), seen)
    assert sigma.tolist() == [2.0, 0.0, 1.0]
    assert cap.calibrated_margin(torch.ones(3, 3), sigma, 1.0)[2].sum() > 0
    paper = cap.prediction_counts({1: (2, 0.9)}, torch.zeros(3), seen)  # unseen-only pseudolabels
    assert paper.tolist() == [1.0, 0.0, 1.0] and cap.calibrated_margin(torch.ones(3, 3), paper, 1.0)[2].sum() == 0


def test_sigma_counts_every_prediction_when_asked_as_released():
    seen_pl = {5: (1, 0.9)}  # image 5 was drawn twice in the epoch and predicted 1 both times
    none_seen = torch.tensor([], dtype=torch.long)
    assert cap.prediction_counts(seen_pl, torch.tensor([0.0, 2.0]), none_seen, repeats=True).tolist() == [0.0, 2.0]
    assert cap.prediction_counts(seen_pl, torch.tensor([0.0, 2.0]), none_seen).tolist() == [0.0, 1.0]


def test_descriptions_file_decides_the_described_classes_as_released(tmp_path):
    # t = 0: detection removes every class, so it finds no mismatched class at all.
    f = tmp_path / "d.json"
    f.write_text(json.dumps({"green": ["a green thing"]}))
    run(tmp_path, "--mismatch-t", "0", "--descriptions", str(f), name="paper")
    paper = results(tmp_path, "paper")["concept_alignment"]
    assert paper["mismatched_classes"] == [] and paper["chosen_descriptions"] == {}
    assert paper["descriptions_source"] == "none"  # nothing to describe
    run(tmp_path, "--mismatch-t", "0", "--descriptions", str(f), "--as-released", name="released")
    released = results(tmp_path, "released")["concept_alignment"]
    assert released["mismatched_classes"] == []
    assert released["chosen_descriptions"] == {"green": "a green thing"}
    assert released["descriptions_source"] == f"file {f}"


def test_ssl_shots_as_released_reseed_numpy_with_0_before_each_class():
    # the release calls np.random.seed(0) before each class and draws 2 shots without replacement
    labels = torch.arange(90) % 3  # [90], 30 images per class
    expected = []
    for c in range(3):
        np.random.seed(0)
        expected += np.random.choice(np.where(labels.numpy() == c)[0], size=2, replace=False).tolist()
    assert cap.protocol_ssl(labels, 3, reseed_per_class=True).tolist() == expected
    assert cap.protocol_ssl(labels, 3).tolist() != expected  # our default: one stream for all classes
    L, U, _, _ = cap.split_setting("ssl", labels, 3, 500, ssl_reseed=True)
    assert L.tolist() == expected and len(U) == 84


def test_flowers102_uses_clip_style_names(monkeypatch):
    # torchvision's 'globe-flower', 'pink-yellow dahlia?' and 'ball moss' are named as CLIP's release names them
    monkeypatch.setattr(data, "_tv_pair", lambda cls, root, download, names, *kw: names)
    names = data._load_flowers("nowhere", False)
    assert len(names) == 102 and {"globe flower", "pink and yellow dahlia", "air plant"} <= set(names)
    assert not {"globe-flower", "pink-yellow dahlia?", "ball moss"} & set(names)


def test_shallow_vision_prompts_pass_through_ln_pre_as_released():
    # the release concatenates the shallow prompts before ln_pre, so ln_pre sees 1 + P + n_ctx tokens
    model, _, tok = common.load_clip("tiny", "none")
    learner, _ = cap.build_maple(model, tok, ["red", "blue"], depth=1)
    shapes = []
    model.visual.ln_pre.register_forward_hook(lambda m, inputs, out: shapes.append(inputs[0].shape))
    images = torch.randn(2, 3, *model.visual.image_size)
    out = cap.encode_image_maple(model, learner, images)
    n_patches = model.visual.grid_size[0] * model.visual.grid_size[1]
    assert shapes == [torch.Size([2, 1 + n_patches + 2, model.visual.conv1.out_channels])]
    assert out.shape == (2, model.visual.proj.shape[1]) and torch.allclose(out.norm(dim=1), torch.ones(2))


def test_streaming_leaderboard_matches_a_hand_trace():
    # K = 1. Image 1 does not beat class 0's board, so it is offered to classes 1 and 2 and joins both;
    # image 2 then beats it on class 1's board; image 3 replaces image 0 on class 0's board.
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.3, 0.2], [0.1, 0.8, 0.1], [0.9, 0.05, 0.05]])
    boards = cap.streaming_leaderboard(probs, torch.arange(3), 1)
    assert {c: b.tolist() for c, b in boards.items()} == {0: [3], 1: [2], 2: [1]}


def test_strong_view_flips_always_as_released():
    from PIL import Image

    img = Image.fromarray(np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3))
    view = cap.strong_view(32, lambda x: x, crop_min=1.0, flip_p=1.0)  # full-image crop, always flipped
    x = view(img)
    flipped = torch.from_numpy(np.asarray(img)[:, ::-1].copy()).permute(2, 0, 1).float() / 255
    assert torch.allclose(x, flipped, atol=1e-6)


def test_release_prompt_keeps_the_f_string_slip():
    # the release builds f"{template}{classname}" from "a photo of a {}.": "a photo of a {}red", no full stop
    assert cap.RELEASE_PROMPT.format("red") == "a photo of a {}red"


def released_paths(tmp_path, monkeypatch, *flags, name):
    """A TRZSL run with spies on the code each behaviour changes. -> {behaviour: whether it took the release's path}
    (`described` needs classes that detection does not find: --mismatch-t 0 and a file naming every class)."""
    seen = {}

    def spy(module, fn, record):
        real = getattr(module, fn)

        def wrapper(*a, **kw):
            seen.update(record(a, kw))
            return real(*a, **kw)

        monkeypatch.setattr(module, fn, wrapper)

    spy(cap, "calibrated_margin", lambda a, kw: {"margin_formula": a[3]})
    spy(cap, "strong_view", lambda a, kw: {"flip": kw["flip_p"] == 1.0})
    spy(cap, "zero_shot_classifiers", lambda a, kw: {"quirk": a[3]})
    spy(cap, "detect_mismatch", lambda a, kw: {"no_low_t": a[2] is None})  # zs_pred None: Y_final
    spy(cap, "streaming_leaderboard", lambda a, kw: {"leaderboard": True})
    spy(cap, "class_descriptions", lambda a, kw: {"described": bool(a[0])})
    spy(cap, "align_pseudolabels", lambda a, kw: {"desc_all": len(a[4]) == N_TRAIN})  # ids: every image
    spy(cap, "train_step", lambda a, kw: {"trzsl_all": len(kw["ul_classes"]) == len(CLASSES)})  # L_UL's classes
    spy(cap, "prediction_counts", lambda a, kw: {"sigma_repeats": a[3]})
    spy(cap, "split_setting", lambda a, kw: {"ssl_draw": a[4]})
    spy(data, "load_dataset", lambda a, kw: {"eurosat_pool": kw["as_released"]})
    f = tmp_path / "d.json"
    f.write_text(json.dumps({n: [f"a {n} thing"] for n in CLASSES}))
    run(tmp_path, "--mode", "trzsl", "--mismatch-t", "0", "--descriptions", str(f), "--iters", "1", *flags, name=name)
    return {"leaderboard": False, "described": False, **seen}


@pytest.mark.parametrize(
    "flags, on",
    [
        ((), set()),
        (("--as-released",), set(cap.RELEASE_BEHAVIOURS)),
        (("--release", "margin-formula,eurosat-pool,no-low-t"), {"margin-formula", "eurosat-pool", "no-low-t"}),
    ],
)
def test_each_release_name_switches_exactly_the_code_it_names(tmp_path, monkeypatch, flags, on):
    observed = released_paths(tmp_path, monkeypatch, *flags, name="run")
    assert observed == {b.replace("-", "_"): b in on for b in cap.RELEASE_BEHAVIOURS}
    assert results(tmp_path)["release_behaviours"] == sorted(b.replace("-", "_") for b in on)


@pytest.mark.parametrize("mode", ["ul", "ssl", "trzsl"])
def test_each_mode_runs_as_released(tmp_path, mode):
    m = run(tmp_path, "--mode", mode, "--as-released")
    assert 0.0 <= m["test_acc"] <= 1.0 and math.isfinite(m["final_loss"])
    assert results(tmp_path)["release_behaviours"] == sorted(b.replace("-", "_") for b in cap.RELEASE_BEHAVIOURS)


def test_kmeans_restarts_flag_reaches_detection(tmp_path, monkeypatch):
    # at 1,000 classes the fast loop needs one restart, not 20: the flag must reach detect_mismatch
    seen = []
    real = cap.detect_mismatch
    monkeypatch.setattr(cap, "detect_mismatch", lambda *a, **kw: seen.append(kw["n_init"]) or real(*a, **kw))
    run(tmp_path, "--epochs", "1", "--iters", "1", "--batch-size", "8", "--kmeans-restarts", "3", "--detect", "fast")
    run(tmp_path, "--epochs", "1", "--iters", "1", "--batch-size", "8", name="default")
    assert seen == [3, 20]


def test_harmonic_mean_of_half_and_one_is_two_thirds():
    assert cap.harmonic_mean(0.5, 1.0) == pytest.approx(2 / 3)
    assert cap.harmonic_mean(0.0, 0.0) == 0.0
