"""pytest setup: one torch thread. The tests use tiny models, for which a second thread buys nothing and,
on a busy 2-core machine, oversubscription made a CAP iteration 100x slower (2.1 s vs 0.022 s, measured)."""
import torch

torch.set_num_threads(1)
