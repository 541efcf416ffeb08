"""pytest setup for the unit tests: the repository root on sys.path (the scripts are top-level modules),
and one torch thread. The tests use tiny models, for which a second thread buys nothing and, on a busy
2-core machine, oversubscription makes small ops far slower.

Run from the repository root: python -m pytest -q tests/
"""

import os
import sys
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (read once, when torch loads): on a shared machine a spinning
# thread holds the core its sibling's barrier waits for.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
torch.set_num_threads(1)
