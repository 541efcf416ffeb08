"""Tests for common.py and zeroshot.py: the zero-shot run, the feature cache, CLIP weight loading,
one-line errors on bad input, prompt templates and metrics. CPU only, offline.

Run: python -m pytest -q tests/test_common.py
"""

import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import data
import demo
import zeroshot

REPO = Path(__file__).resolve().parent.parent
TINY = ["--clip-model", "tiny", "--pretrained", "none", "--quiet"]


def run_zeroshot(tmp_path, *args):
    """zeroshot.main in-process with the tiny random CLIP, cache and outputs under tmp_path. -> metrics"""
    return zeroshot.main([*args, *TINY, "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "out")])


def run_cli(tmp_path, *args, env=None, timeout=120):
    """`python zeroshot.py ARGS` as a user would type it. -> (exit code, stderr, seconds)"""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), **(env or {})}  # empty HF cache: no cached weights
    cmd = [
        sys.executable,
        "zeroshot.py",
        *args,
        "--quiet",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out-dir",
        str(tmp_path / "out"),
    ]
    start = time.time()
    r = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    return r.returncode, r.stderr, time.time() - start


def assert_one_line_error(rc, stderr):
    """Failed, no traceback, and the last stderr line is the single 'error: ...' line. -> that line"""
    assert rc != 0, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert lines, "nothing on stderr"
    assert sum("error:" in line for line in lines) == 1, stderr
    assert lines[-1].startswith("error:"), stderr
    return lines[-1]


def make_image_folder(root, classes=("cat", "dog", "fox"), per_class=5, seed=0):
    """root/<class>/<i>.png with random 40x40 RGB images. -> root"""
    from PIL import Image

    rng = np.random.RandomState(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.randint(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


# -----------------------------------------------------------------------------
# zeroshot.py end to end and the feature cache


def test_zeroshot_writes_results_and_a_second_run_hits_the_feature_cache(tmp_path, capsys):
    first = run_zeroshot(tmp_path, "--data", "synthetic")
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {"config", "metrics", "versions"} <= set(res)
    assert res["config"]["data"] == "synthetic" and res["config"]["clip_model"] == "tiny"
    assert {"torch", "open_clip"} <= set(res["versions"])
    assert res["metrics"] == pytest.approx(first)
    assert 0 <= first["test_acc"] <= 1 and 0 <= first["pseudolabel_acc"] <= 1
    assert "feature cache hit" not in capsys.readouterr().out

    second = run_zeroshot(tmp_path, "--data", "synthetic")
    assert capsys.readouterr().out.count("feature cache hit") == 2  # train and test
    assert second == first


def test_truncated_cache_file_is_reported_in_one_line_and_recomputed(tmp_path, capsys):
    first = run_zeroshot(tmp_path, "--data", "synthetic")
    capsys.readouterr()
    cache_file = sorted((tmp_path / "cache").glob("synthetic_train_*.pt"))[0]
    data = cache_file.read_bytes()
    cache_file.write_bytes(data[: len(data) // 2])

    second = run_zeroshot(tmp_path, "--data", "synthetic")
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if cache_file.name in line]
    assert len(warnings) == 1 and "unreadable" in warnings[0] and "recomputing" in warnings[0], err
    assert out.count("feature cache hit") == 1  # only the intact test-split cache
    assert second == first
    assert cache_file.stat().st_size == len(data)  # rewritten in full


def test_folder_dataset_runs_end_to_end_on_a_seeded_80_20_split(tmp_path):
    root = make_image_folder(tmp_path / "imgs")
    train, y_train, test, y_test, names, info = data.load_dataset("folder", str(root))
    assert names == ["cat", "dog", "fox"]
    assert info["layout"] == "folder" and (info["n_train"], info["n_test"]) == (12, 3)
    assert (len(train), len(test)) == (12, 3)
    assert sorted(train + test) == sorted(str(p) for p in root.rglob("*.png"))
    assert data.load_dataset("folder", str(root))[2] == test  # same split every time

    metrics = run_zeroshot(tmp_path, "--data", "folder", "--data-dir", str(root))
    assert all(math.isfinite(v) for v in metrics.values())
    assert json.loads((tmp_path / "out" / "results.json").read_text())["config"]["data"] == "folder"


def test_a_folder_whose_split_changed_gets_new_features(tmp_path, capsys):
    """Same path, same image count, classes renamed so the images come in another order: the cache is keyed by
    the split's content (data.load_dataset's hash), so stale features are never paired with the new labels."""
    root = make_image_folder(tmp_path / "imgs")
    run_zeroshot(tmp_path, "--data", "folder", "--data-dir", str(root))
    (root / "cat").rename(root / "zebra")  # cat's images now sort last
    capsys.readouterr()
    run_zeroshot(tmp_path, "--data", "folder", "--data-dir", str(root))
    assert "feature cache hit" not in capsys.readouterr().out


def test_two_image_folders_do_not_share_a_feature_cache(tmp_path, capsys):
    a = make_image_folder(tmp_path / "a", seed=0)
    b = make_image_folder(tmp_path / "b", seed=1)  # same size, different pixels
    run_zeroshot(tmp_path, "--data", "folder", "--data-dir", str(a))
    run_zeroshot(tmp_path, "--data", "folder", "--data-dir", str(b))
    assert "feature cache hit" not in capsys.readouterr().out
    run_zeroshot(tmp_path, "--data", "folder", "--data-dir", str(a))
    assert capsys.readouterr().out.count("feature cache hit") == 2


# -----------------------------------------------------------------------------
# CLIP loading


def test_tiny_clip_saved_as_state_dict_loads_back_with_identical_image_features(tmp_path):
    model, _, _ = common.load_clip("tiny", "none")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move away from the seed-0 init, so a load that does nothing would fail
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    f = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), f)

    loaded, _, _ = common.load_clip("tiny", str(f))
    fresh, _, _ = common.load_clip("tiny", "none")
    images = torch.randn(4, 3, 32, 32, generator=g)  # [4, 3, 32, 32]
    with torch.no_grad():
        want = model.encode_image(images)  # [4, 64]
        assert torch.equal(loaded.encode_image(images), want)
        assert not torch.allclose(fresh.encode_image(images), want)
    assert not loaded.training


def test_loading_clip_leaves_the_callers_random_state_unchanged(tmp_path):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    common.load_clip("tiny", "none")
    f = tmp_path / "tiny.pt"
    torch.save(common.load_clip("tiny", "none")[0].state_dict(), f)
    common.load_clip("tiny", str(f))
    assert torch.equal(torch.get_rng_state(), before)


def test_a_copied_weights_file_keeps_its_feature_cache_and_an_edited_one_does_not(tmp_path, capsys):
    def run(weights):
        zeroshot.main(
            [
                "--data",
                "synthetic",
                "--clip-model",
                "tiny",
                "--pretrained",
                str(weights),
                "--quiet",
                "--cache-dir",
                str(tmp_path / "cache"),
                "--out-dir",
                str(tmp_path / "out"),
            ]
        )
        return capsys.readouterr().out.count("feature cache hit")

    model = common.load_clip("tiny", "none")[0]
    a, b = tmp_path / "a" / "w.pt", tmp_path / "b" / "w.pt"
    a.parent.mkdir()
    b.parent.mkdir()
    torch.save(model.state_dict(), a)
    assert run(a) == 0
    b.write_bytes(a.read_bytes())
    assert run(b) == 2  # same content at another path: train and test features come from the cache
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    torch.save(model.state_dict(), b)
    assert run(b) == 0  # other content: other features


# -----------------------------------------------------------------------------
# Bad input: one line on stderr, non-zero exit, no traceback (each run as a user would)


def test_unknown_dataset_is_refused_with_the_list_of_choices(tmp_path):
    rc, err, _ = run_cli(tmp_path, "--data", "nope", *TINY)
    assert rc != 0 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "invalid choice: 'nope'" in last and "'synthetic'" in last and "'dtd'" in last


def test_missing_dataset_without_download_fails_in_one_line(tmp_path):
    (tmp_path / "data").mkdir()
    rc, err, _ = run_cli(tmp_path, "--data", "dtd", "--data-dir", str(tmp_path / "data"), *TINY)
    line = assert_one_line_error(rc, err)
    assert "DTD" in line and "--download" in line and "--data demo" in line and "download=True" not in line


def test_weights_that_cannot_be_downloaded_fail_fast_in_one_line(tmp_path):
    # On a machine with internet, HF_HUB_OFFLINE stops a real 600 MB download; offline, the real path runs.
    env = {"HF_HUB_OFFLINE": "1"} if common._hub_reachable() else {}
    rc, err, seconds = run_cli(
        tmp_path, "--data", "synthetic", "--clip-model", "ViT-B-32", "--pretrained", "openai", env=env
    )
    line = assert_one_line_error(rc, err)
    assert "--pretrained" in line
    # "fast" = no download retries (huggingface_hub's back-off sleeps about 23 s per file). Compared with a run
    # that fails at the same point without any download, so a busy CI machine slows both alike.
    _, _, reference = run_cli(tmp_path, "--data", "synthetic", "--clip-model", "ViT-B-32", "--pretrained", "x.pt")
    assert seconds < reference + 15, (seconds, reference)


def test_missing_weights_file_fails_in_one_line(tmp_path):
    rc, err, _ = run_cli(tmp_path, "--data", "synthetic", "--clip-model", "tiny", "--pretrained", "missing.pt")
    line = assert_one_line_error(rc, err)
    assert "missing.pt" in line and "--pretrained" in line


@pytest.mark.parametrize("folder", ["empty", "does-not-exist"])
def test_image_folder_that_is_empty_or_missing_fails_in_one_line(tmp_path, folder):
    (tmp_path / "empty").mkdir()
    rc, err, _ = run_cli(tmp_path, "--data", "folder", "--data-dir", str(tmp_path / folder), *TINY)
    line = assert_one_line_error(rc, err)
    assert str(tmp_path / folder) in line


def test_unreadable_image_in_a_folder_is_named_in_a_one_line_error(tmp_path):
    root = make_image_folder(tmp_path / "imgs")
    (root / "dog" / "bad.png").write_bytes(b"this is not a png")
    rc, err, _ = run_cli(tmp_path, "--data", "folder", "--data-dir", str(root), *TINY)
    line = assert_one_line_error(rc, err)
    assert line.startswith("error: cannot read image") and str(root / "dog" / "bad.png") in line


def test_unreadable_image_is_named_in_a_one_line_error_also_with_dataloader_workers(tmp_path, capsys):
    root = make_image_folder(tmp_path / "imgs")
    (root / "dog" / "bad.png").write_bytes(b"this is not a png")
    with pytest.raises(SystemExit) as exit_:  # in-process: the same path as the CLI, without a 3 s start-up
        common.run_cli(lambda: run_zeroshot(tmp_path, "--data", "folder", "--data-dir", str(root), "--workers", "1"))
    line = assert_one_line_error(exit_.value.code, capsys.readouterr().err)
    assert str(root / "dog" / "bad.png") in line


# -----------------------------------------------------------------------------
# Prompt templates and the zero-shot classifier


def test_zero_shot_weights_for_one_template_equal_the_normalised_text_embedding():
    model, _, tokenizer = common.load_clip("tiny", "none")
    names = ["red", "green", "blue"]
    W = common.zero_shot_weights(model, tokenizer, names, ["a photo of a {}."])  # [3, 64]
    with torch.no_grad():
        want = F.normalize(model.encode_text(tokenizer([f"a photo of a {n}." for n in names])), dim=-1)  # [3, 64]
    assert W.shape == (3, 64) and W.dtype == torch.float32
    torch.testing.assert_close(W, want)


def test_template_sets_have_27_small_and_80_imagenet_entries_each_with_a_placeholder():
    assert common.get_templates("single") == ["a photo of a {}."]
    for name, n in (("small", 27), ("imagenet", 80)):
        templates = common.get_templates(name)
        assert len(templates) == n and len(set(templates)) == n
        assert all("{}" in t for t in templates)


# -----------------------------------------------------------------------------
# Metrics


def test_accuracy_and_per_class_accuracy_on_a_hand_example():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    pred = torch.tensor([0, 1, 1, 1, 0, 0])
    assert common.accuracy(pred, labels) == pytest.approx(3 / 6)
    torch.testing.assert_close(common.per_class_accuracy(pred, labels, 4)[:3], torch.tensor([0.5, 2 / 3, 0.0]))
    assert math.isnan(common.per_class_accuracy(pred, labels, 4)[3])  # class 3 absent from labels


# -----------------------------------------------------------------------------
# QuickGELU follows the weights, and more bad input


@pytest.fixture
def tiny_tags(tmp_path, monkeypatch):
    """Two pretrained tags of the 'tiny' model that resolve to a local state_dict instead of a download:
    'qg' trained with QuickGELU (like OpenAI's CLIP), 'plain' with GELU."""
    import open_clip
    import open_clip.factory
    import open_clip.pretrained

    demo.register_tiny_clips()
    f = tmp_path / "tiny.pt"
    torch.save(open_clip.create_model("tiny").state_dict(), f)
    cfg = dict(url="", hf_hub="", mean=None, std=None)
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "tiny", {"qg": {**cfg, "quick_gelu": True}, "plain": cfg})
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda *a, **k: str(f))
    monkeypatch.setattr(common, "_hub_reachable", lambda *a, **k: True)
    return f


def activations(model):
    from open_clip.transformer import QuickGELU

    kinds = {type(m) for m in model.modules() if isinstance(m, (QuickGELU, torch.nn.GELU))}
    return {k.__name__ for k in kinds}


def test_weights_trained_with_quickgelu_run_with_quickgelu(tiny_tags, recwarn):
    assert activations(common.load_clip("tiny", "qg")[0]) == {"QuickGELU"}
    assert activations(common.load_clip("tiny", "plain")[0]) == {"GELU"}
    assert not [w for w in recwarn if "QuickGELU" in str(w.message)]


def test_loading_weights_offline_leaves_the_root_loggers_level_as_it_was(tiny_tags, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(common, "_hub_reachable", lambda *a, **k: False)  # the offline path quiets the loggers
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", logging.WARNING)
    common.load_clip("tiny", "qg")
    assert root.level == logging.WARNING


def test_openai_torchscript_file_runs_with_quickgelu(tmp_path):
    import open_clip

    demo.register_tiny_clips()
    model = open_clip.create_model("tiny", force_quick_gelu=True).eval()
    f = tmp_path / "ViT-tiny.pt"  # OpenAI's release format: a TorchScript archive, its state_dict our keys
    model.attn_mask = model._buffers.pop("attn_mask")  # OpenAI's CLIP keeps the mask as a plain attribute
    torch.jit.save(torch.jit.trace_module(model, {"encode_image": torch.zeros(1, 3, 32, 32)}), str(f))
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    assert common._is_torchscript(f) and not common._is_torchscript(tmp_path / "sd.pt")
    loaded = common.load_clip("tiny", str(f))[0]
    assert activations(loaded) == {"QuickGELU"}
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(images), model.encode_image(images), atol=1e-5)


def test_weights_file_of_random_bytes_fails_in_one_line(tmp_path):
    f = tmp_path / "junk.pt"
    f.write_bytes(os.urandom(4096))
    rc, err, _ = run_cli(tmp_path, "--data", "synthetic", "--clip-model", "tiny", "--pretrained", str(f))
    line = assert_one_line_error(rc, err)
    assert "junk.pt" in line and "weights_only" not in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda_says_so_in_one_line(tmp_path):
    rc, err, _ = run_cli(tmp_path, "--data", "synthetic", "--device", "cuda", *TINY)
    line = assert_one_line_error(rc, err)
    assert "CUDA is not available" in line


def test_failed_download_names_the_folder_and_leaves_nothing_behind(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(self, *a, **k):
        (tmp_path / "data" / "dtd" / "dtd").mkdir(parents=True)  # what torchvision creates before fetching
        raise RuntimeError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.datasets.DTD, "_download", offline)
    (tmp_path / "data").mkdir()
    with pytest.raises(common.UserError, match="--data demo"):
        data.load_dataset("dtd", str(tmp_path / "data"), download=True)
    assert list((tmp_path / "data").iterdir()) == []


@pytest.mark.parametrize(
    "script,flag,value,low",
    [
        ("cap", "--epochs", "0", 1),
        ("cap", "--epochs", "-1", 1),
        ("cap", "--iters", "0", 1),
        ("cap", "--batch-size", "0", 1),
        ("cap", "--n-main", "0", 1),
        ("cap", "--n-descriptions", "0", 1),
        ("coreg", "--epochs", "0", 1),
        ("coreg", "--batch-size", "0", 1),
        ("coreg", "--queue-size", "0", 1),
        ("zeroshot", "--workers", "-3", 0),
    ],
)
def test_counts_and_sizes_out_of_range_are_refused_at_parse_time(script, flag, value, low, capsys):
    module = __import__(script)
    with pytest.raises(SystemExit) as e:
        module.parse_args(["--data", "synthetic", flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert f"argument {flag}: " in err[-1] and f">= {low}, got {value}" in err[-1], err[-1]
    assert "Traceback" not in "".join(err)


def test_rerun_into_the_same_out_dir_keeps_the_earlier_results(tmp_path, capsys):
    def finish(seed, acc):
        run = SimpleNamespace(config={"seed": seed}, start=time.time(), out_dir=tmp_path)
        common.finish_run(run, {"test_acc": acc}, f"run {seed}")
        return tmp_path / "results.json"

    first = finish(1, 0.5)
    os.utime(first, (1e9, 1e9))  # an old file: its kept copy is named by its time
    finish(2, 0.7)
    assert json.loads(first.read_text())["config"] == {"seed": 2}
    kept = [p for p in tmp_path.glob("results-*.json")]
    assert len(kept) == 1 and json.loads(kept[0].read_text())["config"] == {"seed": 1}
    assert "moved to" in capsys.readouterr().out


def test_two_processes_writing_the_same_cache_entry_both_finish_and_the_file_loads(tmp_path):
    path = tmp_path / "cache" / "entry.pt"
    code = (
        "import sys, torch, common\n"
        "for i in range(20):\n"
        "    common.save_atomic({'features': torch.full((2000, 64), float(sys.argv[1])),"
        " 'labels': torch.arange(2000)},"
        f" {str(path)!r})\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(v)], cwd=REPO, stderr=subprocess.PIPE, text=True)
        for v in (1, 2)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    hit = common.load_cached(path, ("features", "labels"))
    assert hit is not None and hit["features"].shape == (2000, 64) and hit["features"].unique().numel() == 1
    assert not list(path.parent.glob("*.tmp"))  # no temporary file left behind


def test_progress_off_a_terminal_prints_plain_lines_not_bars(capsys):
    items = list(common.progress(range(3), "encode", quiet=False, every=0.0))  # pytest's stdout is no terminal
    out = capsys.readouterr().out
    assert items == [0, 1, 2] and out.splitlines() == [f"encode: {i}/3 (0s)" for i in (1, 2, 3)] and "\r" not in out
    assert list(common.progress(range(3), "encode", quiet=True, every=0.0)) == [0, 1, 2]
    assert capsys.readouterr().out == ""


def test_each_top_level_module_can_be_imported_first():
    """Every module imports alone, in a fresh state: common, then demo, then data, then the scripts build on one
    another. One interpreter; our modules are dropped from sys.modules between the imports (torch stays loaded)."""
    ours = ["common", "data", "demo", "zeroshot", "cap", "coreg"]
    code = (
        f"import importlib, sys\n"
        f"for first in {ours!r}:\n"
        f"    for m in {ours!r}:\n"
        f"        sys.modules.pop(m, None)\n"
        f"    importlib.import_module(first)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("script", ["cap", "coreg", "zeroshot"])
def test_each_script_refuses_an_unknown_dataset_and_answers_help(script, capsys):
    module = __import__(script)
    with pytest.raises(SystemExit) as e:
        module.parse_args(["--data", "nosuch"])
    assert e.value.code == 2
    assert "error: argument --data: invalid choice: 'nosuch'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        module.parse_args(["--help"])
    assert e.value.code == 0 and "--data" in capsys.readouterr().out


def test_scripts_ask_openmp_for_passive_waits_before_torch_loads():
    """Idle OpenMP threads then sleep instead of spinning; the setting is read once, when torch loads."""
    for name in ("cap.py", "coreg.py", "zeroshot.py", "common.py"):
        lines = (REPO / name).read_text().splitlines()
        setting = lines.index(
            next(line for line in lines if line.startswith('os.environ.setdefault("OMP_WAIT_POLICY"'))
        )
        imports_before = {line for line in lines[:setting] if line.startswith(("import ", "from "))}
        assert imports_before == {"import os"}, (name, imports_before)
    code = (
        "import os; os.environ.pop('OMP_WAIT_POLICY', None); import zeroshot, torch; "
        "print(os.environ['OMP_WAIT_POLICY'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "PASSIVE", out.stderr
