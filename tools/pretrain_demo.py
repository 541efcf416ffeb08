"""Pre-train the demo world's tiny CLIP from scratch and compare it with the shipped weights.

The repository ships assets/demo_clip_v<VERSION>.pt so that no demo command waits for a pre-training; this script
shows they are what demo.pretrain gives (its run time: docs/usage.md). Float sums depend on the CPU's vector units,
so another CPU may differ in the last bits; the script then prints the largest difference.

    python tools/pretrain_demo.py                 # pre-train, compare with the shipped file
    python tools/pretrain_demo.py --out new.pt    # also keep the fresh weights
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import demo  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="also save the fresh weights here")
    args = p.parse_args()
    start = time.time()
    model, _, tokenizer = common.load_clip("tiny-demo", "none")
    demo.pretrain(model, tokenizer, progress=lambda it: common.progress(it, "pre-train demo CLIP"))
    fresh = model.state_dict()
    if args.out:
        common.save_atomic(fresh, args.out)
    shipped = torch.load(demo.WEIGHTS, map_location="cpu", weights_only=True)
    diff = max((fresh[k].float() - shipped[k].float()).abs().max().item() for k in shipped)
    same = all(torch.equal(fresh[k], shipped[k]) for k in shipped)
    print(
        f"pre-trained in {time.time() - start:.0f}s; {'bit-identical to' if same else f'max |diff| {diff:.3g} from'} "
        f"{demo.WEIGHTS.name}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
