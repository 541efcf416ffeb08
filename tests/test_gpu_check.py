"""tools/gpu_check.py at its CPU sizes: every timed step runs and the table is written as JSON (on a GPU machine,
run the tool itself: python tools/gpu_check.py).

Run: python -m pytest -q tests/test_gpu_check.py
"""

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_times_every_step_at_the_cpu_sizes_and_writes_its_table(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--device", "cpu", "--skip-tests", "--out", str(out)]) == 0  # tests/test_cuda.py runs apart
    report = json.loads(out.read_text())
    assert report["small"] and [row["step"] for row in report["rows"]] == ["encode", "kmeans", "detect", "cap", "coreg"]
    assert all(row["status"] == "ok" and row["seconds"] > 0 for row in report["rows"]), report["rows"]
    assert "encode" in capsys.readouterr().out
