"""Bad input and interrupted runs: each ends with one line on stderr and a non-zero exit, no traceback;
what can be checked at start-up is checked before any work, and no finished result is lost.

The scripts run as a user would type them (subprocesses, the tiny random CLIP on the synthetic set and a few
steps) where the exit code and stderr are the point, or in-process where that is clearer. CPU only, offline.

Run from the repository root: python -m pytest -q tests/test_inputs.py
"""

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import cap
import common
import coreg
import data
import demo
import zeroshot

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = {"zeroshot": zeroshot, "cap": cap, "coreg": coreg}
TINY = ["--clip-model", "tiny", "--pretrained", "none", "--quiet"]
SYNTHETIC = ["--data", "synthetic", *TINY]
SHORT = {
    "zeroshot": [],
    "cap": ["--epochs", "1", "--iters", "1", "--batch-size", "8"],  # a few steps each
    "coreg": ["--arch", "narrow", "--epochs", "1", "--warm-up", "1", "--batch-size", "16"],
}


def run_script(tmp_path, script, *args):
    """`python <script>.py ARGS --cache-dir tmp/cache --out-dir tmp/out` (unless ARGS name them), one thread.
    -> subprocess.CompletedProcess with text stdout and stderr"""
    dirs = [] if "--cache-dir" in args else ["--cache-dir", str(tmp_path / "cache")]
    dirs += [] if "--out-dir" in args else ["--out-dir", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}
    return subprocess.run(
        [sys.executable, f"{script}.py", *args, *dirs],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )


def one_line_error(rc, stderr, warnings_allowed=False):
    """Failed with exit code 2, no traceback, and stderr is the one 'error: ...' line (after 'warning: ...'
    lines of the run when warnings_allowed). -> that line"""
    assert rc == 2, (rc, stderr)
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:"), stderr
    earlier = lines[:-1]
    assert not earlier or (warnings_allowed and all(line.startswith("warning:") for line in earlier)), stderr
    return lines[-1]


def usage_error(r, flag):
    """argparse refused `flag`: exit code 2, no traceback, its usage block, then one 'error:' line naming it."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert sum("error:" in line for line in lines) == 1 and lines[-1].startswith(
        f"{r.args[1]}: error: argument {flag}:"
    ), r.stderr
    return lines[-1]


def in_process_error(capsys, script, argv):
    """script.main(argv) through common.run_cli, as the command line runs it. -> the one stderr line"""
    with pytest.raises(SystemExit) as exit_:
        common.run_cli(lambda: SCRIPTS[script].main(argv))
    return one_line_error(exit_.value.code, capsys.readouterr().err)


def no_work(monkeypatch):
    """From here on, loading the data and CLIP (the first work of every script) fails the test."""

    def prepare(*a, **k):
        raise AssertionError("the run started its work before refusing its input")

    monkeypatch.setattr(data, "prepare", prepare)


def strict_json(path):
    """Parse a file as strict JSON: NaN and Infinity are errors."""

    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, not strict JSON")

    return json.loads(Path(path).read_text(), parse_constant=refuse)


# -----------------------------------------------------------------------------
# The dataset


@pytest.mark.parametrize("script", ["zeroshot", "cap", "coreg"])
def test_a_folder_dataset_with_one_class_is_refused_in_one_line(tmp_path, script):
    from PIL import Image

    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    rng = np.random.RandomState(0)
    for i in range(5):
        Image.fromarray(rng.randint(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "cat" / f"{i}.png")
    r = run_script(tmp_path, script, "--data", "folder", "--data-dir", str(tmp_path / "imgs"), *TINY, *SHORT[script])
    line = one_line_error(r.returncode, r.stderr)
    assert "1 class" in line and "at least 2" in line, line
    assert not (tmp_path / "out").exists()  # a refused run leaves no empty output folder behind


# -----------------------------------------------------------------------------
# The learning rate, and a run that diverges


@pytest.mark.parametrize("script", ["cap", "coreg"])
def test_a_learning_rate_of_nan_is_refused_at_parse_time(tmp_path, script):
    r = run_script(tmp_path, script, *SYNTHETIC, *SHORT[script], "--lr", "nan")
    assert "finite" in usage_error(r, "--lr")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", ["cap", "coreg"])
def test_a_negative_learning_rate_is_a_one_line_usage_error(tmp_path, script):
    r = run_script(tmp_path, script, *SYNTHETIC, *SHORT[script], "--lr", "-1")
    assert "-1" in usage_error(r, "--lr")


@pytest.mark.parametrize("script", ["zeroshot", "cap", "coreg"])
@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_a_seed_outside_numpys_range_is_a_one_line_usage_error(capsys, script, seed):
    with pytest.raises(SystemExit) as exit_:
        SCRIPTS[script].parse_args(["--data", "synthetic", "--seed", seed])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].endswith(
        f"argument --seed: must be an integer {'>= 0' if seed == '-1' else '<= 4294967295'}, got {seed}"
    )


def test_a_run_whose_loss_becomes_non_finite_stops_in_one_line_and_writes_no_results(tmp_path):
    r = run_script(tmp_path, "cap", *SYNTHETIC, "--epochs", "2", "--iters", "2", "--lr", "1e30")  # NaN in epoch 1
    line = one_line_error(r.returncode, r.stderr, warnings_allowed=True)
    assert "diverged" in line and "--lr" in line, line
    for path in tmp_path.rglob("results*.json"):  # none is expected; any there must be strict JSON
        strict_json(path)
    assert not (tmp_path / "out" / "results.json").exists()


def test_a_coreg_epoch_with_a_nan_loss_stops_the_run_with_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(coreg, "partial_ce", lambda logits, *a, **k: logits.sum() * float("nan"))  # warm-up diverges
    with pytest.raises(common.UserError, match="diverged"):
        coreg.main(
            [*SYNTHETIC, *SHORT["coreg"], "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "out")]
        )
    assert not (tmp_path / "out" / "results.json").exists()


def test_results_json_is_strict_json_with_null_for_nan_and_infinity(tmp_path):
    from types import SimpleNamespace

    run = SimpleNamespace(config={"lr": 0.01}, start=0.0, out_dir=tmp_path)
    common.finish_run(
        run,
        {"test_acc": float("nan"), "gap": float("-inf"), "per_class": torch.tensor([0.5, math.nan]), "n": np.int64(3)},
        "summary",
        extra={"history": [{"loss": float("inf")}]},
    )
    res = strict_json(tmp_path / "results.json")
    assert res["metrics"] == {"test_acc": None, "gap": None, "per_class": [0.5, None], "n": 3}
    assert res["history"] == [{"loss": None}]


# -----------------------------------------------------------------------------
# The device


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="checks the message on a machine without MPS")
def test_device_mps_without_mps_names_mps_not_the_weights_file(tmp_path):
    weights = tmp_path / "tiny.pt"
    torch.save(common.load_clip("tiny", "none")[0].state_dict(), weights)
    r = run_script(
        tmp_path,
        "zeroshot",
        "--data",
        "synthetic",
        "--clip-model",
        "tiny",
        "--pretrained",
        str(weights),
        "--device",
        "mps",
        "--quiet",
    )
    line = one_line_error(r.returncode, r.stderr)
    assert "MPS" in line and "--device" in line and str(weights) not in line, line


# -----------------------------------------------------------------------------
# The output folders: checked at start-up, before any work


@pytest.mark.parametrize("script", ["zeroshot", "cap", "coreg"])
def test_a_read_only_cache_dir_is_refused_in_one_line_before_any_work(tmp_path, monkeypatch, capsys, script):
    """Also as root, whom a read-only mode does not stop: the folder's temp files are refused instead."""
    folder = tmp_path / "cache"
    folder.mkdir()
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*a, dir=None, **k):
        if dir is not None and Path(dir).resolve() == folder.resolve():
            raise PermissionError(13, "Permission denied", str(dir))
        return real_mkstemp(*a, dir=dir, **k)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    no_work(monkeypatch)
    line = in_process_error(
        capsys, script, [*SYNTHETIC, *SHORT[script], "--cache-dir", str(folder), "--out-dir", str(tmp_path / "out")]
    )
    assert "--cache-dir" in line and str(folder) in line and "not writable" in line, line


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write to a read-only folder")
def test_a_cache_dir_without_write_permission_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        r = run_script(tmp_path, "zeroshot", *SYNTHETIC, "--cache-dir", str(folder))
    finally:
        folder.chmod(0o755)
    line = one_line_error(r.returncode, r.stderr)
    assert "--cache-dir" in line and "not writable" in line, line


@pytest.mark.parametrize("script", ["zeroshot", "cap", "coreg"])
def test_a_cache_dir_that_is_a_file_is_refused_in_one_line_before_any_work(tmp_path, monkeypatch, capsys, script):
    (tmp_path / "cache").write_text("not a folder")
    no_work(monkeypatch)
    line = in_process_error(
        capsys,
        script,
        [*SYNTHETIC, *SHORT[script], "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "out")],
    )
    assert "--cache-dir" in line and "is a file" in line, line
    assert (tmp_path / "cache").read_text() == "not a folder"


def test_a_cache_dir_that_is_a_file_ends_the_script_with_one_line(tmp_path):
    (tmp_path / "cache").write_text("not a folder")
    r = run_script(tmp_path, "zeroshot", *SYNTHETIC)
    assert "--cache-dir" in one_line_error(r.returncode, r.stderr)


@pytest.mark.parametrize("script", ["zeroshot", "cap", "coreg"])
def test_an_out_dir_that_is_a_file_is_refused_in_one_line_before_any_work(tmp_path, monkeypatch, capsys, script):
    (tmp_path / "out").write_text("not a folder")
    no_work(monkeypatch)
    line = in_process_error(
        capsys,
        script,
        [*SYNTHETIC, *SHORT[script], "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "out")],
    )
    assert "--out-dir" in line and "is a file" in line, line
    assert (tmp_path / "out").read_text() == "not a folder"


def test_an_out_dir_that_is_a_file_ends_the_script_with_one_line_before_training(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    r = run_script(tmp_path, "coreg", *SYNTHETIC, *SHORT["coreg"])
    assert "--out-dir" in one_line_error(r.returncode, r.stderr)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.pt"))  # no features computed


# -----------------------------------------------------------------------------
# The demo CLIP's weights file


@pytest.mark.parametrize("where", ["shipped", "cached"])
def test_a_truncated_demo_weights_file_is_reported_in_one_line_and_pre_trained_again(
    tmp_path, monkeypatch, capsys, where
):
    cache = tmp_path / "cache"
    cache.mkdir()
    shipped = tmp_path / "assets" / demo.WEIGHTS.name
    truncated = shipped if where == "shipped" else cache / demo.WEIGHTS.name
    truncated.parent.mkdir(exist_ok=True)
    torch.save(common.load_clip("tiny-demo", "none")[0].state_dict(), truncated)  # a readable file, then cut
    full = truncated.read_bytes()
    truncated.write_bytes(full[: len(full) // 2])
    monkeypatch.setattr(demo, "WEIGHTS", shipped)  # missing when where == "cached"
    calls = []

    def pretrain(model, tokenizer, **kw):  # stands in for the minutes-long pre-training: the control flow is tested
        calls.append(kw)
        return model.eval()

    monkeypatch.setattr(demo, "pretrain", pretrain)
    path = demo.clip_weights(cache, quiet=True)
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if str(truncated) in line and "unreadable" in line] and len(
        [line for line in err.splitlines() if str(truncated) in line]
    ) == 1, err
    assert len(calls) == 1 and Path(path) == cache / demo.WEIGHTS.name
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert "logit_scale" in state and Path(path).stat().st_size > len(full) // 2
    assert common.load_clip("tiny-demo", str(path))[0] is not None
    assert not list(cache.glob("*.tmp"))


# -----------------------------------------------------------------------------
# Ctrl-C


def test_ctrl_c_prints_interrupted_and_exits_130(capsys):
    def main():
        raise KeyboardInterrupt

    try:
        with pytest.raises(SystemExit) as exit_:
            common.run_cli(main)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt went through run_cli")
    assert exit_.value.code == 130
    assert capsys.readouterr().err == "interrupted\n"


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT")
def test_ctrl_c_during_training_exits_130_and_keeps_the_earlier_results(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    earlier = json.dumps({"config": {"seed": 1}, "metrics": {"test_acc": 0.5}})
    (out / "results.json").write_text(earlier)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}
    cmd = [
        sys.executable,
        "coreg.py",
        "--data",
        "synthetic",
        "--clip-model",
        "tiny",
        "--pretrained",
        "none",
        "--arch",
        "narrow",
        "--epochs",
        "1000",
        "--warm-up",
        "1",
        "--batch-size",
        "16",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out-dir",
        str(out),
    ]  # not --quiet: one line per epoch
    # SIGINT as a terminal delivers it: a parent that ignores it (a pytest-xdist worker does) passes that on
    p = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        training = any(line.startswith("epoch ") for line in p.stdout)  # stops reading at the first epoch line
        assert training, p.stderr.read()
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, err
    assert err.strip() == "interrupted", err
    assert (out / "results.json").read_text() == earlier  # the finished result is kept, nothing half-written
    assert not list(tmp_path.rglob("*.tmp")) and sorted(f.name for f in out.iterdir()) == ["results.json"]
