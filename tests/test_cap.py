"""CAP unit and smoke tests (CPU, offline, tiny random CLIP): `python -m pytest -q test_cap.py`."""
import json
import math
import socket

import pytest
import torch
import torch.nn.functional as F

import cap
import common

TINY = ["--data", "synthetic", "--clip-model", "tiny", "--pretrained", "none", "--epochs", "2", "--iters", "2",
        "--quiet"]


def run(tmp_path, *extra, name="run"):
    return cap.main(TINY + ["--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / name), *extra])


# §3.2 calibrated margin ------------------------------------------------------

S3 = torch.tensor([[1.0, 0.8, 0.2], [0.8, 1.0, 0.4], [0.2, 0.4, 1.0]])
SIGMA3 = torch.tensor([10.0, 5.0, 0.0])


def test_paper_margin_matches_hand_computation():
    # δ = 1 − σ/max σ = [0, 0.5, 1]; Δ = max δ = 1; m_c = 12·1·δ_c = [0, 6, 12]; M_yc = m_y·S_yc
    M = cap.calibrated_margin(S3, SIGMA3, 12.0, "paper")
    expected = torch.tensor([[0, 0, 0], [4.8, 6.0, 2.4], [2.4, 4.8, 12.0]])
    assert torch.allclose(M, expected, atol=1e-6)


def test_code_margin_matches_hand_computation():
    # rows rescaled onto [min_i, 1]: row 0 min .2 max 1 -> unchanged; row 1 min .4 max 1 -> unchanged; row 2 too.
    # r = [1, .5, 0]; Δ = (1 − 0)·12 = 12; w = 12·(1−r)/(1+r) = [0, 4, 12]
    M = cap.calibrated_margin(S3, SIGMA3, 12.0, "code")
    expected = torch.tensor([[0, 0, 0], [3.2, 4.0, 1.6], [2.4, 4.8, 12.0]])
    assert torch.allclose(M, expected, atol=1e-6)
    S = torch.tensor([[1.0, 0.6, 0.5], [0.6, 0.9, 0.5], [0.5, 0.5, 1.0]])  # row 1 max .9 < 1: stretched to 1
    M = cap.calibrated_margin(S, torch.tensor([0.0, 0.0, 0.0]) + torch.tensor([2.0, 0.0, 2.0]), 1.0, "code")
    # row 1: min .5 max .9 -> .5 + (S − .5)/.4·.5 = [.625, 1, .5]; w_1 = 1·(1−0)/(1+0) = 1
    assert torch.allclose(M[1], torch.tensor([0.625, 1.0, 0.5]), atol=1e-6)


def test_margin_is_zero_before_any_confident_prediction():
    assert cap.calibrated_margin(S3, torch.zeros(3), 12.0).abs().sum() == 0


def test_margin_ce_equals_plain_ce_when_margin_is_zero():
    logits, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    assert torch.allclose(cap.margin_cross_entropy(logits, y, torch.zeros(3, 3)), F.cross_entropy(logits, y))


def test_margin_ce_matches_the_formula():
    logits, y, M = torch.tensor([[2.0, 1.0, 0.5]]), torch.tensor([0]), torch.tensor([[9.0, 1.0, 2.0]] + [[0.0] * 3] * 2)
    # −log e^{z_y} / (e^{z_y} + Σ_{c≠y} e^{z_c + M_yc}); the diagonal M_yy = 9 must not be used
    expected = -math.log(math.exp(2) / (math.exp(2) + math.exp(1 + 1) + math.exp(0.5 + 2)))
    assert cap.margin_cross_entropy(logits, y, M).item() == pytest.approx(expected, rel=1e-6)


def test_uniform_logits_give_log_c():
    assert cap.margin_cross_entropy(torch.zeros(4, 5), torch.arange(4), torch.zeros(5, 5)).item() == pytest.approx(math.log(5))


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
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["config"]["mode"] == mode and "dpl_acc_before_alignment" in res["metrics"]
    if mode == "trzsl":
        assert {"seen_acc", "unseen_acc", "harmonic_mean"} <= set(m)


def test_same_seed_same_metrics_and_checkpoint_reproduces_them(tmp_path):
    a, b = run(tmp_path, name="a"), run(tmp_path, name="b")
    assert a == b
    c = run(tmp_path, "--seed", "2", name="c")
    assert c != a
    ev = cap.main(TINY + ["--cache-dir", str(tmp_path / "cache"), "--eval-only",
                          "--checkpoint", str(tmp_path / "a" / "cap_prompts.pt")])
    assert ev["test_acc"] == a["test_acc"]


def test_trzsl_with_too_few_classes_is_a_clear_error(tmp_path):
    from PIL import Image
    root = tmp_path / "one" / "only"
    root.mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (32, 32), (i * 30, 0, 0)).save(root / f"{i}.png")
    with pytest.raises(common.UserError, match="TRZSL"):
        cap.main(["--data", "folder", "--data-dir", str(tmp_path / "one"), "--clip-model", "tiny", "--pretrained",
                  "none", "--mode", "trzsl", "--cache-dir", str(tmp_path / "c"), "--quiet"])


def test_unreachable_llm_warns_and_the_run_goes_on(tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    m = run(tmp_path, "--mismatch-t", "4", "--llm-url", f"http://127.0.0.1:{port}", "--llm-model", "x")
    assert 0.0 <= m["test_acc"] <= 1.0
    assert "no LLM class descriptions" in capsys.readouterr().err


def test_descriptions_file_is_used_and_malformed_file_is_a_clear_error(tmp_path):
    good = tmp_path / "d.json"
    good.write_text(json.dumps({n: [f"a {n} thing", f"something {n}"] for n in ["red", "green", "blue", "yellow"]}))
    run(tmp_path, "--mismatch-t", "4", "--descriptions", str(good))
    report = json.loads((tmp_path / "run" / "results.json").read_text())["concept_alignment"]
    assert report["chosen_descriptions"] and set(report["chosen_descriptions"]) <= {"red", "green", "blue", "yellow"}
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(common.UserError, match="bad.json"):
        run(tmp_path, "--mismatch-t", "4", "--descriptions", str(bad))
