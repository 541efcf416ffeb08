"""Zero-shot CLIP: the baseline CAP and Co-Reg are measured against.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (arXiv 2103.00020).
Classifies each image by the cosine between its CLIP embedding and the template-averaged text
embedding of every class name. On the training pool it also reports what the two methods start
from: pseudolabel accuracy and the per-class prediction counts (the imbalance CAP attacks).

    python zeroshot.py --data dtd
    python zeroshot.py --data eurosat --templates small
    python zeroshot.py --data demo                       # offline demo world
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle OpenMP threads sleep (docs/usage.md)

import argparse  # noqa: E402

import torch

import common
import data


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(p, data.DATASETS)
    p.add_argument(
        "--templates",
        default="single",
        choices=["single", "small", "imagenet"],
        help="prompt set: 'a photo of a {}.' (FPL/CAP), Co-Reg's 27 templates or the 80 ImageNet ones",
    )
    return common.parse_args(p, argv, data.CLIP_DEFAULTS)


def prediction_counts(pred, num_classes):
    """How many pool images zero-shot assigns to each class. -> [C]"""
    return torch.bincount(pred, minlength=num_classes)


def main(argv=None):
    args = parse_args(argv)
    run = common.start_run(args, f"runs/zeroshot-{args.data}-{args.templates}")
    d = data.prepare(args, run.device)
    C, prompt_set = len(d.classnames), common.PROMPT_SET_NAMES[args.templates]

    # zero-shot classifier: one template-averaged text embedding per class
    W = common.zero_shot_weights(
        d.model, d.tokenizer, d.classnames, common.get_templates(args.templates), run.device
    ).cpu()  # [C, D]
    pred_test = (d.f_test @ W.T).argmax(1)  # [M]
    pred_train = (d.f_train @ W.T).argmax(1)  # [N]: the pseudolabels both methods start from
    counts, acc = prediction_counts(pred_train, C), common.accuracy(pred_test, d.y_test)
    per_class = common.per_class_accuracy(pred_test, d.y_test, C)
    print("per-class zero-shot predictions on the train pool (true count -> predicted count):")
    true_counts = torch.bincount(d.y_train, minlength=C)
    for c in counts.argsort().tolist():
        print(
            f"  {d.classnames[c]:>32s}  {true_counts[c].item():5d} -> {counts[c].item():5d}"
            f"  test acc {100 * per_class[c].item():5.1f}"
        )
    check = common.check_zeroshot(acc, args, prompt_set)
    pl_acc = common.accuracy(pred_train, d.y_train)
    metrics = {
        "test_acc": acc,
        "pseudolabel_acc": pl_acc,
        "pred_count_min": counts.min().item(),
        "pred_count_max": counts.max().item(),
        "classes_never_predicted": int((counts == 0).sum()),
    }
    common.save_atomic(
        {"train_pred": pred_train, "test_pred": pred_test, "classnames": d.classnames}, run.out_dir / "pseudolabels.pt"
    )
    summary = (
        f"zero-shot ({prompt_set}) | test acc {100 * acc:.2f} | pseudolabel acc {100 * pl_acc:.2f} | "
        f"pred count min {metrics['pred_count_min']} max {metrics['pred_count_max']}"
    )
    return common.finish_run(
        run,
        metrics,
        summary,
        extra={
            "clip": {"model": args.clip_model, "pretrained": d.pretrained},
            "prompt_set": prompt_set,
            "split": d.split_info,
            "zeroshot_check": check,
            "prediction_counts": dict(zip(d.classnames, counts.tolist())),
            "per_class_test_acc": dict(zip(d.classnames, per_class.tolist())),
        },
    )


if __name__ == "__main__":
    common.run_cli(main)
