"""tools/summarize.py and docs/paper_results.json: the table against the published numbers, and the file itself.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_summarize.py
(a second or two, CPU only: the runs are fake results.json files written into pytest's tmp_path).
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("summarize", ROOT / "tools" / "summarize.py")
summarize = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(summarize)

PAPER = {  # a small stand-in for docs/paper_results.json, so that the arithmetic below is fixed
    "_about": "test table",
    "cap": {
        "ul": {
            "dtd": {"ViT-B-32": {"value": 55.29, "source": "test Tab. 1", "metric": "top1"}},
            "eurosat": {
                "ViT-B-32": {
                    "value": None,
                    "source": "test Tab. 1",
                    "metric": "top1",
                    "note": "not transcribed: no copy",
                }
            },
        },
        "trzsl": {
            "dtd": {
                "ViT-B-32": {
                    "value": 60.0,
                    "source": "test Tab. 1",
                    "metric": "harmonic_mean",
                    "secondary": True,
                    "note": "from a summary",
                }
            }
        },
    },
    "zeroshot": {
        "ul": {"dtd": {"ViT-B-32": {"value": 43.2, "source": "test README", "metric": "top1"}}},
        "trzsl": {
            "dtd": {
                "ViT-B-32": {
                    "value": None,
                    "source": "test README",
                    "metric": "harmonic_mean",
                    "note": "not published: '-' in the README",
                }
            }
        },
    },
    "baselines": {"grip_test": {"ul": {"dtd": {"ViT-B-32": {"value": 46.1, "source": "test README"}}}}},
}


def write_run(folder, config, metrics, **extra):
    folder.mkdir(parents=True)
    res = {"config": {"clip_model": None, **config}, "metrics": metrics, "elapsed_s": 1.0, **extra}
    (folder / "results.json").write_text(json.dumps(res))


def cap_run(root, data, mode, seed, metrics):
    write_run(
        root / f"{data}-{mode}-seed{seed}",
        {"data": data, "mode": mode, "seed": seed},
        metrics,
        clip={"model": "ViT-B-32", "pretrained": "openai"},
        concept_alignment={},
    )


@pytest.fixture
def paper_file(tmp_path):
    path = tmp_path / "paper_results.json"
    path.write_text(json.dumps(PAPER))
    return path


def table_rows(lines):
    """{(dataset, setting, model): [cells]} from the printed markdown table."""
    rows = {}
    for line in lines:
        if line.startswith("| ") and not line.startswith("| dataset"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[tuple(cells[:3])] = cells[3:]
    return rows


def run_table(root, method, paper_file, capsys):
    summarize.main([str(root), "--paper", method, "--results", str(paper_file)])
    return table_rows(capsys.readouterr().out.splitlines())


def test_a_row_shows_the_paper_value_the_mean_and_std_over_three_seeds_and_their_difference(
    tmp_path, paper_file, capsys
):
    for seed, acc in zip((1, 2, 3), (0.56, 0.57, 0.58)):
        cap_run(tmp_path / "runs", "dtd", "ul", seed, {"test_acc": acc, "zeroshot_test_acc": 0.44})
    rows = run_table(tmp_path / "runs", "cap", paper_file, capsys)
    # by hand: mean (56 + 57 + 58) / 3 = 57.00, sample std 1.00, 57.00 - 55.29 = +1.71; zero-shot 44.00 - 43.2 = +0.80
    assert rows[("dtd", "ul", "ViT-B-32")] == ["55.29", "57.00 ± 1.00", "3", "+1.71", "43.2", "44.00 ± 0.00", "+0.80"]


def test_trzsl_rows_compare_the_harmonic_mean_and_star_a_secondary_paper_value(tmp_path, paper_file, capsys):
    for seed, h in zip((1, 2, 3), (0.60, 0.62, 0.67)):
        cap_run(
            tmp_path / "runs",
            "dtd",
            "trzsl",
            seed,
            {"test_acc": 0.9, "harmonic_mean": h, "zeroshot_test_acc": 0.5, "zeroshot_harmonic_mean": 0.4},
        )
    rows = run_table(tmp_path / "runs", "cap", paper_file, capsys)
    std = math.sqrt(((60 - 63) ** 2 + (62 - 63) ** 2 + (67 - 63) ** 2) / 2)  # 3.61
    assert rows[("dtd", "trzsl", "ViT-B-32")] == [
        "60*",
        f"63.00 ± {std:.2f}",
        "3",
        "+3.00",
        "not published",
        "40.00 ± 0.00",
        "—",
    ]


def test_cells_without_a_published_number_or_without_runs_say_so(tmp_path, paper_file, capsys):
    cap_run(tmp_path / "runs", "dtd", "ul", 1, {"test_acc": 0.5, "zeroshot_test_acc": 0.4})
    rows = run_table(tmp_path / "runs", "cap", paper_file, capsys)
    assert rows[("dtd", "ssl", "ViT-B-32")] == ["not published", "not run", "0", "—", "not published", "not run", "—"]
    assert rows[("eurosat", "ul", "ViT-B-32")][:4] == ["not transcribed", "not run", "0", "—"]
    assert len(rows) == 18  # the six datasets x UL / SSL / TRZSL, whether run or not


def test_the_command_line_ends_with_one_table(tmp_path, paper_file):
    cap_run(tmp_path / "runs", "dtd", "ul", 1, {"test_acc": 0.5, "zeroshot_test_acc": 0.4})
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "summarize.py"),
            str(tmp_path / "runs"),
            "--paper",
            "cap",
            "--results",
            str(paper_file),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    first = next(i for i, line in enumerate(out) if line.startswith("|"))
    assert all(line.startswith("|") for line in out[first:]) and len(out[first:]) == 2 + 18


def test_zero_shot_runs_fill_the_ul_and_ssl_rows_and_other_methods_runs_are_left_out(tmp_path, paper_file, capsys):
    root = tmp_path / "runs"
    write_run(
        root / "dtd",
        {"data": "dtd", "seed": 1, "templates": "80"},
        {"test_acc": 0.45, "pseudolabel_acc": 0.4},
        clip={"model": "ViT-B-32", "pretrained": "openai"},
    )
    cap_run(root, "dtd", "ul", 1, {"test_acc": 0.9, "zeroshot_test_acc": 0.45})
    rows = run_table(root, "zeroshot", paper_file, capsys)
    assert rows[("dtd", "ul", "ViT-B-32")] == ["43.2", "45.00 ± 0.00", "1", "+1.80"]
    assert rows[("dtd", "ssl", "ViT-B-32")] == ["not published", "45.00 ± 0.00", "1", "—"]


def test_runs_of_another_model_get_their_own_row(tmp_path, paper_file, capsys):
    write_run(
        tmp_path / "runs" / "dtd-ul-seed1",
        {"data": "dtd", "mode": "ul", "seed": 1, "clip_model": "ViT-L-14"},
        {"test_acc": 0.7},
        concept_alignment={},
    )
    rows = run_table(tmp_path / "runs", "cap", paper_file, capsys)
    assert rows[("dtd", "ul", "ViT-L-14")][:4] == ["not published", "70.00 ± 0.00", "1", "—"]
    assert rows[("dtd", "ul", "ViT-B-32")][1] == "not run"


def test_published_looks_up_methods_baselines_and_slash_model_names():
    assert summarize.published("cap", "dtd", "ul", "ViT-B/32", PAPER)["value"] == 55.29
    assert summarize.published("zeroshot", "dtd", "ul", None, PAPER)["source"] == "test README"
    assert summarize.published("grip_test", "dtd", "ul", "ViT-B-32", PAPER)["value"] == 46.1
    assert summarize.published("cap", "dtd", "ssl", "ViT-B-32", PAPER) is None
    assert summarize.published("zeroshot", "flowers102", "ul", "ViT-B/32")["value"] == 63.7  # GRIP README, CLIP


def cells(node, path=()):
    """Every {value, ...} cell of docs/paper_results.json with its key path."""
    if isinstance(node, dict) and "value" in node:
        yield path, node
    elif isinstance(node, dict):
        for key, child in node.items():
            yield from cells(child, path + (key,))


def test_paper_results_parses_and_every_number_has_a_source():
    table = json.loads((ROOT / "docs" / "paper_results.json").read_text())
    assert table["_about"].strip()
    found = list(cells({k: v for k, v in table.items() if not k.startswith("_")}))
    assert len(found) > 100
    for path, cell in found:
        assert cell["value"] is None or isinstance(cell["value"], (int, float)), path
        assert isinstance(cell.get("source"), str) and cell["source"].strip(), path
        if cell["value"] is None:
            assert cell.get("note", "").startswith(("not published", "not transcribed")), path
        if cell.get("secondary"):
            assert cell.get("note"), path


def test_paper_results_uses_the_repository_dataset_keys_and_open_clip_model_names():
    table = json.loads((ROOT / "docs" / "paper_results.json").read_text())
    known = {
        "flowers102",
        "resisc45",
        "dtd",
        "eurosat",
        "cub",
        "fgvc_aircraft",
        "mnist",
        "cifar10",
        "cifar100",
        "svhn",
        "fashion_mnist",
        "fer2013",
        "gtsrb",
    }
    for path, _ in cells({k: v for k, v in table.items() if not k.startswith("_")}):
        *_, setting, data, model = path
        assert setting in {"ul", "ssl", "trzsl", "npll"} and data in known and "/" not in model, path


def test_every_paper_group_of_run_sh_ends_with_its_summary_table():
    text = (ROOT / "run.sh").read_text()
    for call in ("runs/zeroshot --paper zeroshot", "runs/$what --paper cap", "runs/coreg --paper coreg"):
        assert f"tools/summarize.py {call}" in text
