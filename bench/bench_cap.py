"""Time one CAP training iteration (3 views of 32 images, text encoder over all classes, backward).

    python bench/bench_cap.py --clip-model tiny
    python bench/bench_cap.py --clip-model ViT-B-32 --classes 47 --iters 3     # random init, DTD-sized class count
Prints seconds per iteration and the peak resident memory of the process.
"""

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the top-level scripts
import cap
import common


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--clip-model", default="tiny")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    device = common.get_device(args.device)
    model, _, tok = common.load_clip(args.clip_model, "none", device)
    model.requires_grad_(False)
    learner, tokens = cap.build_maple(model.cpu(), tok, [f"class {i}" for i in range(args.classes)], 8)
    model, learner, tokens = model.to(device), learner.to(device), tokens.to(device)
    adapters = cap.build_adapters(model.text_projection.shape[1]).to(device)
    opt = torch.optim.SGD([*learner.parameters(), *adapters.parameters()], lr=0.01, momentum=0.9)
    size = model.visual.image_size[0]
    x = torch.randn(3 * args.batch_size, 3, size, size, device=device)  # main, weak, strong views
    y = torch.randint(args.classes, (args.batch_size,), device=device)
    M = torch.zeros(args.classes, args.classes, device=device)
    times = []
    for i in range(args.iters + 1):  # the first iteration is a warm-up
        t0 = time.time()
        with common.autocast(device):
            t = cap.adapt(adapters["text"], cap.encode_text_maple(model, learner, tokens))
            with torch.no_grad():
                v = cap.encode_image_maple(model, learner, x[: args.batch_size])
                q = 100 * cap.adapt(adapters["main"], v) @ t.T
            v = cap.encode_image_maple(model, learner, x[args.batch_size :])
            loss = cap.margin_cross_entropy(
                100 * cap.adapt(adapters["main"], v[: args.batch_size]) @ t.T, y, M
            ) + cap.fixmatch_loss(
                100 * cap.adapt(adapters["pseudo"], v[args.batch_size :]) @ t.T,
                q.argmax(1),
                torch.ones(args.batch_size, device=device),
                M,
            )
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.time() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{args.clip_model} on {device}, {torch.get_num_threads()} threads, batch {args.batch_size} x 3 views, "
        f"{args.classes} classes: {sum(times[1:]) / args.iters:.3f} s/iter, peak RSS {peak:.0f} MiB"
    )


if __name__ == "__main__":
    main()
