"""pytest setup for the unit tests: the repository root on sys.path (the scripts are top-level modules),
and one torch thread. The tests use tiny models, for which a second thread buys nothing and, on a busy
2-core machine, oversubscription made a CAP iteration 100x slower (2.1 s vs 0.022 s, measured)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
torch.set_num_threads(1)
