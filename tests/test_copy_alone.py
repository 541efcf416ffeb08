"""The pieces a reader copies into another project run with torch alone: each listed function, pasted together with
the functions of its own file that it calls, into a namespace that holds only torch, torch.nn.functional as F,
torch.nn as nn, numpy as np and math, gives the same output as the original. And common.py imports with only its
declared dependencies (none of this project's other modules).

Run: python -m pytest -q tests/test_copy_alone.py
"""

import ast
import inspect
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cap
import common
import coreg

REPO = Path(__file__).resolve().parent.parent


def own_callees(module, fn):
    """Names of `module`'s top-level functions that fn's source calls or names, transitively, in source order."""
    found = []
    todo = [fn.__name__]
    while todo:
        tree = ast.parse(inspect.getsource(getattr(module, todo.pop())))
        for node in ast.walk(tree):
            name = node.id if isinstance(node, ast.Name) else None
            if name and name not in found and name != fn.__name__ and inspect.isfunction(getattr(module, name, None)):
                if getattr(module, name).__module__ == module.__name__:
                    found.append(name)
                    todo.append(name)
    return found


def pasted(module, name):
    """Paste module.name and the functions of its file it calls into a namespace holding only the allowed modules.
    -> the pasted function"""
    namespace = {"torch": torch, "F": F, "nn": nn, "np": np, "math": math}
    fn = getattr(module, name)
    for helper in [*own_callees(module, fn), name]:
        exec(compile(inspect.getsource(getattr(module, helper)), f"<pasted {helper}>", "exec"), namespace)
    return namespace[name]


def same(a, b):
    """Equal outputs: tensors exactly, containers element by element."""
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def g(seed=0):
    return torch.Generator().manual_seed(seed)


def updated_prototypes(update):
    """update_prototypes changes its first argument in place. -> the prototypes after one batch"""
    protos = torch.zeros(3, 3)
    update(protos, F.normalize(LOGITS, dim=1), TARGETS)
    return protos


S3 = torch.tensor([[1.0, 0.4, 0.2], [0.4, 1.0, 0.6], [0.2, 0.6, 1.0]])
LOGITS = torch.randn(6, 3, generator=g(1))  # [B, C]
TARGETS = torch.tensor([0, 1, 2, 0, 1, 2])
CAND = torch.tensor([[1, 1, 0], [0, 1, 0], [1, 1, 1], [0, 0, 1], [1, 0, 1], [0, 1, 1]], dtype=torch.bool)  # [B, C]

CASES = {  # (module, function) -> a call on a small input
    (cap, "calibrated_margin"): lambda f: (
        f(S3, torch.tensor([4.0, 2.0, 0.0]), 12.0),
        f(S3, torch.ones(3), 12.0, True),
    ),
    (cap, "margin_cross_entropy"): lambda f: f(LOGITS, TARGETS, S3),
    (cap, "fixmatch_loss"): lambda f: f(LOGITS, TARGETS, torch.tensor([1.0, 0, 1, 1, 0, 0]), S3),
    (cap, "match_log_odds"): lambda f: f(100 * torch.randn(4, 4, generator=g(2))),
    (cap, "class_similarity"): lambda f: f(F.normalize(LOGITS[:3], dim=1), F.normalize(LOGITS[3:], dim=1)),
    (cap, "intersect_low_t"): lambda f: f([0, 2], torch.tensor([1, 1, 1, 0, 2]), 2, 3),
    (cap, "initial_pseudolabels"): lambda f: f(LOGITS.softmax(1), torch.tensor([0, 2]), 2),
    (coreg, "candidate_sets"): lambda f: [
        f(torch.rand(5, 6, 3, generator=g(3)), mode) for mode in ("union", "topk", "ratio")
    ],
    (coreg, "partial_ce"): lambda f: f(LOGITS, CAND),
    (coreg, "neg_entropy"): lambda f: f(LOGITS),
    (coreg, "gmm_1d"): lambda f: f(torch.cat([torch.rand(20, generator=g(4)), 3 + torch.rand(20, generator=g(5))])),
    (coreg, "sharpen"): lambda f: f(LOGITS.softmax(1), 0.5),
    (coreg, "mixup"): lambda f: f(torch.randn(6, 3, 4, 4, generator=g(6)), LOGITS.softmax(1), 4.0, g(7)),
    (coreg, "supcon_mask"): lambda f: f(TARGETS[:3], torch.tensor([True, False, True]), TARGETS[3:], CAND[:3, 0]),
    (coreg, "supcon_loss"): lambda f: f(
        F.normalize(LOGITS[:2], dim=1),
        F.normalize(LOGITS, dim=1),
        torch.tensor([[0, 0, 1, 0, 0, 1], [0, 0, 0, 1, 1, 0]], dtype=torch.bool),
        torch.tensor([[0, 1, 1, 1, 1, 1], [1, 0, 1, 1, 1, 1]], dtype=torch.bool),
    ),
    (coreg, "update_prototypes"): lambda f: updated_prototypes(f),
    (coreg, "distribution_alignment"): lambda f: f(LOGITS[:2].softmax(1), LOGITS.softmax(1), torch.full((3,), 1 / 3)),
    (coreg, "maxi_cand_loss"): lambda f: f(LOGITS.softmax(1), CAND),
    (common, "kmeans"): lambda f: f(
        torch.cat([torch.randn(30, 2, generator=g(8)), 10 + torch.randn(30, 2, generator=g(9))]), 2
    ),
}


@pytest.mark.parametrize("module, name", CASES, ids=[f"{m.__name__}.{n}" for m, n in CASES])
def test_a_pasted_copy_needs_only_torch_numpy_and_math_and_gives_the_same_output(module, name):
    copy = pasted(module, name)
    assert same(CASES[module, name](copy), CASES[module, name](getattr(module, name)))


def test_common_imports_without_any_other_module_of_this_project():
    blocked = "import sys; sys.modules.update(dict.fromkeys(['data', 'demo', 'cap', 'coreg', 'zeroshot']))"
    code = f"{blocked}; import common; print(common.kmeans(common.torch.eye(4), 2)[1].tolist())"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
