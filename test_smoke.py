"""Smoke test: every script runs end to end, in-process, on the tiny random CLIP and generated images
(zero-shot, CAP in UL, SSL and TRZSL, Co-Reg), and writes results.json as strict JSON. Run time: docs/usage.md.

Run: python -m pytest -q test_smoke.py          (the unit tests: python -m pytest -q tests/)
"""

import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle OpenMP threads sleep, not spin

import pytest  # noqa: E402
import torch  # noqa: E402

import cap
import coreg
import zeroshot

torch.set_num_threads(1)  # tiny models: a second thread buys nothing and oversubscribes a busy machine
TINY = ["--data", "synthetic", "--clip-model", "tiny", "--pretrained", "none", "--quiet"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def refuse(name):
    raise ValueError(f"results.json holds {name}, which strict JSON has no word for")


def run(script, tmp_path, cache, *extra):
    out = tmp_path / script.__name__
    metrics = script.main([*TINY, "--cache-dir", cache, "--out-dir", str(out), *extra])
    saved = json.loads((out / "results.json").read_text(), parse_constant=refuse)  # NaN/Infinity would raise
    assert saved["metrics"].keys() == metrics.keys() and 0 <= metrics["test_acc"] <= 1
    assert saved["config"]["data"] == "synthetic" and "versions" in saved
    return metrics


def test_zeroshot_runs(tmp_path, cache):
    run(zeroshot, tmp_path, cache)


@pytest.mark.parametrize("mode", ["ul", "ssl", "trzsl"])
def test_cap_runs_in_every_setting(tmp_path, cache, mode):
    metrics = run(cap, tmp_path, cache, "--mode", mode, "--epochs", "2", "--iters", "2", "--batch-size", "8")
    assert ("harmonic_mean" in metrics) == (mode == "trzsl")
    assert (tmp_path / "cap" / "cap_prompts.pt").exists() and (tmp_path / "cap" / "pseudolabels.pt").exists()


def test_coreg_runs(tmp_path, cache):
    run(
        coreg,
        tmp_path,
        cache,
        "--arch",
        "narrow",
        "--epochs",
        "3",
        "--warm-up",
        "1",
        "--start-cont",
        "0",
        "--batch-size",
        "16",
    )
