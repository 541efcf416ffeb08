"""Benchmark: common.encode_images against a bare open_clip forward loop over the same images.

encode_images adds a DataLoader (per-item __getitem__ and collation), label gathering, L2 normalisation
and the CPU copy on top of model.encode_image; this measures what that costs. ViT-B-32 with random
weights (no download), pre-made 3x224x224 tensors and an identity transform, so image decoding and
preprocessing are out of both timings. Target: ratio >= 0.9.

    python bench/bench_encode.py                      # 256 images, batch 64, 2 CPU threads
    python bench/bench_encode.py --n-images 512 --device cuda
"""

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the top-level scripts
import common
import data


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-images", type=int, default=256, help="images encoded per timed run")
    p.add_argument("--batch-size", type=int, default=64, help="batch size for both loops")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each loop, alternating; best is kept")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    return p.parse_args(argv)


@torch.no_grad()
def bare_forward(model, images, batch_size, device):
    """The floor: encode_image over contiguous slices, nothing else. -> [N, D]"""
    feats = []
    for i in range(0, len(images), batch_size):
        with common.autocast(device):
            feats.append(model.encode_image(images[i : i + batch_size].to(device)))  # [B, D]
    return torch.cat(feats)


def timed(fn):
    """-> (seconds, result), synchronising CUDA so the clock sees the finished work."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, _, _ = common.load_clip("ViT-B-32", "none", device)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.n_images, 3, 224, 224, generator=g)  # [N, 3, 224, 224], already "preprocessed"
    labels = torch.arange(args.n_images) % 10  # [N]
    dataset = data.ImageList(list(images), labels, transform=lambda x: x)  # yields (tensor, label, index)

    runs = {
        "bare": lambda n: bare_forward(model, images[:n], args.batch_size, device),
        "encode_images": lambda n: common.encode_images(
            model, torch.utils.data.Subset(dataset, range(n)), device, batch_size=args.batch_size, quiet=True
        )[0],
    }
    for name, fn in runs.items():  # warm-up: one batch each
        fn(args.batch_size)
    best = {name: float("inf") for name in runs}
    for r in range(args.repeats):  # alternate, so drift in machine load hits both alike
        for name, fn in runs.items():
            seconds, feats = timed(lambda: fn(args.n_images))
            best[name] = min(best[name], seconds)
            print(f"run {r + 1} | {name:>13s} | {seconds:6.2f}s | {args.n_images / seconds:7.1f} images/s")

    # both paths compute the same features (encode_images L2-normalises)
    ref = torch.nn.functional.normalize(runs["bare"](args.batch_size).float(), dim=-1)
    torch.testing.assert_close(runs["encode_images"](args.batch_size).to(ref.device), ref, rtol=1e-4, atol=1e-5)

    # the overhead alone, with a model that costs nothing: robust to a busy machine, unlike the ratio above
    stub = SimpleNamespace(encode_image=lambda x: x[:, 0, 0, :64])  # [B, 64]
    overhead = min(
        timed(lambda: common.encode_images(stub, dataset, device, batch_size=args.batch_size, quiet=True))[0]
        - timed(lambda: bare_forward(stub, images, args.batch_size, device))[0]
        for _ in range(5)
    )
    print(
        f"encode_images overhead without the model: {1000 * overhead / args.n_images:.3f} ms/image "
        f"({100 * overhead / best['bare']:.2f} % of the bare forward time)"
    )

    ips = {name: args.n_images / s for name, s in best.items()}
    ratio = ips["encode_images"] / ips["bare"]
    print(
        f"best | bare {ips['bare']:.1f} images/s | encode_images {ips['encode_images']:.1f} images/s | "
        f"ratio {ratio:.3f} (target >= 0.9) | {args.n_images} images, batch {args.batch_size}, "
        f"{args.threads} threads, {device}"
    )
    return ratio


if __name__ == "__main__":
    main()
