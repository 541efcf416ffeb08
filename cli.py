"""The command-line flags zeroshot.py, cap.py and coreg.py share, standard library only.

Why a separate file: importing torch takes 5-17 s, so each script builds its parser from this module and
checks the command line *before* its torch import; `--help` and a bad flag (`--data nosuch`,
`--epochs 0`) are then answered at once. DATASET_NAMES are the keys of data.DATASETS (asserted there).
Being imported before torch also makes it the place for the one OpenMP setting that must precede torch.
"""
import argparse
import os

# On a machine whose cores other jobs also use, torch's OpenMP threads spin-wait for each other at every
# parallel op; measured here under load: the demo CLIP's pre-training 24 s a step with 2 spinning threads,
# 1.8 s with PASSIVE (sleeping) waits. It is read once, when torch loads. An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

class UserError(Exception):
    """A problem the user can fix (missing data, weights, bad flag): common.run_cli prints it as one line,
    no traceback, exit code 2."""


DATASET_NAMES = ["cifar10", "cifar100", "cub", "demo", "dtd", "eurosat", "fashion_mnist", "fer2013",
                 "fgvc_aircraft", "flowers102", "folder", "gtsrb", "resisc45", "svhn", "synthetic"]


def _int_at_least(text, low):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value


def positive_int(text):
    """argparse type for counts and sizes: an int ≥ 1, else a one-line usage error at parse time."""
    return _int_at_least(text, 1)


def nonneg_int(text):
    return _int_at_least(text, 0)


def add_common_args(p):
    """The flags every script shares, with the same names and meanings."""
    # data
    p.add_argument("--data", default="dtd", choices=DATASET_NAMES, help="dataset name")
    p.add_argument("--data-dir", default="data", help="root folder holding the datasets")
    p.add_argument("--download", action="store_true", help="let torchvision download missing datasets")
    # CLIP
    p.add_argument("--clip-model", default=None, help="open_clip model (default ViT-B-32; tiny-demo for --data demo)")
    p.add_argument("--pretrained", default=None,
                   help="open_clip tag (default openai), a local weights file, or none (random init)")
    # system
    p.add_argument("--seed", type=int, default=1, help="optimisation seed (CAP runs seeds 1-3)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="training batch size (method default if unset)")
    p.add_argument("--workers", type=nonneg_int, default=0, help="DataLoader worker processes")
    p.add_argument("--cache-dir", default="cache", help="feature, weight and LLM response cache")
    p.add_argument("--no-cache", action="store_true", help="recompute features instead of reading the cache")
    p.add_argument("--out-dir", default=None, help="where results.json goes (default runs/<script>-<data>-...)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p
