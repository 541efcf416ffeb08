"""The offline demo world (`--data demo`): procedural pattern images and a tiny CLIP pre-trained on them.

Ten classes of 32-px pattern images (stripes, checkerboards, dots, rings, plus signs, ...) are drawn
with random colours, rotations, offsets, scales and pixel noise from fixed seeds, so the world needs no
download and is the same everywhere. A 3-layer open_clip model ('tiny-demo', CLIP_CONFIG below) is then
pre-trained contrastively in-process on a separate set of such images with varied captions, the way CLIP
was trained on web image-text pairs. Its weights ship as assets/demo_clip_v<VERSION>.pt (clip_weights), so no
run pre-trains; tools/pretrain_demo.py shows the file is what pretrain() gives.

The captions plant the two failures CAP is about:
  * concept mismatch: the demo's "circles" and "crosses" were captioned "rings" and "plus signs". The words
    "circles" and "crosses" do occur, but for other things: as rare vague tags on the other classes' images
    and as the names of bright ("circles") and dark ("crosses") blank images. So 'a photo of a circles.'
    means something, differs from 'a photo of a crosses.', and points at no image of the demo: zero-shot
    almost never predicts these two classes, while their images still form their own clusters (the K-Means
    step of CAP §3.1 finds them). DESCRIPTIONS offers, per class, one description close to the
    pre-training captions among distractors.
  * concept confusion: thin and thick stripes have adjacent widths and share the caption word "stripes", and
    hard thick-stripe images are captioned as thin ones, so zero-shot predicts thin stripes more often.
and the one Co-Reg is about:
  * instance-level label noise: hard images (pixel-noisy or tiny) are captioned as a look-alike class in part
    of their captions and with "dirty" / "small" in the others, so template 0 ('a photo of a {}.') often names
    the look-alike while the templates with those words still name the true class: the 27-template candidate
    set keeps the true label, and a network trained on the pixels can see it.

    python zeroshot.py --data demo
    python zeroshot.py --data demo --templates small
"""

import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

import common

VERSION = 9  # bump when the images, captions or pre-training recipe change (renames the weight cache)
DOMAIN = "synthetic pattern image"
CLASSNAMES = [
    "thin stripes",
    "thick stripes",
    "checkerboard",
    "dots",
    "circles",
    "crosses",
    "triangles",
    "gradient",
    "zigzag",
    "blotches",
]
NAMED_BLANK_RATE = 0.5  # share of the blank images' captions that use a mismatched class name
GENERIC_RATE = 0.03  # share of the other classes' captions whose noun is a mismatched class name (a vague tag)
# Instance-level noise, the kind Co-Reg is for. Hard images (pixel-noisy, or a tiny pattern) are captioned as
# a look-alike class in CONFUSE_RATE of their captions, by the plain phrasings; their other captions name the true
# class and, at HARD_WORD_RATE, what makes them hard ("dirty", "small"). Easy images are captioned with their
# own class only, with "clean" / "large" at EASY_WORD_RATE. So the plain prompt 'a photo of a {}.' often names
# the look-alike for a hard image, while the templates with those words ('a photo of a dirty {}.', '... small
# {}.') still name its class: the true class stays in the 27-template candidate set, and the pixels, which a
# network trained on the pool sees, still show it.
NOISY_RATE = 0.3  # share of pixel-noisy images
TINY_SCALE = 0.15  # a pattern of scale s < TINY_SCALE is tiny ("small"); s > LARGE_SCALE is "large"
LARGE_SCALE = 0.6
TRI_APOTHEM = 0.27  # triangles' inradius / tiling period (smaller triangles: a narrow CNN takes them for dots)
THIN_W, THICK_W = (1.0, 1.4), (2.4, 2.8)  # stripe width in px = a + b * scale: thin [1, 2.4], thick [2.4, 5.2]
CONFUSE_RATE = 0.6
HARD_WORD_RATE = 1.0
EASY_WORD_RATE = 0.25
# Caption look-alikes of the hard images. The pairs keep away from the motif tilings (dots, triangles, rings, plus
# signs): pairing dots with zigzag and checkerboard with triangles merges those classes' CLIP features and makes
# CAP's mismatch detection depend on the K-Means seed (2 of 6 seeds lose a planted class). Thick stripes
# are captioned as thin ones one way only: that is CAP's planted confusion (zero-shot favours thin stripes).
LOOKALIKE = {
    "gradient": "blotches",
    "blotches": "gradient",
    "checkerboard": "zigzag",
    "zigzag": "checkerboard",
    "thick stripes": "thin stripes",
}
MISMATCHED = ["circles", "crosses"]  # pre-trained as "rings" / "plus signs" (first caption noun below)
CONFUSED = ["thin stripes", "thick stripes"]  # zero-shot over-predicts the first at the cost of the second

# The nouns of the pre-training captions. "circles" and "crosses" never appear: both are single BPE tokens,
# so their prompts collapse onto 'a photo.' (see pretraining_pairs). "thin" is rare, "stripes" shared.
CAPTION_NOUNS = {
    "thin stripes": ["fine lines", "narrow lines", "lines", "pinstripes", "thin lines", "thin stripes", "stripes"],
    "thick stripes": ["stripes", "thick stripes", "wide stripes", "bold stripes", "stripes"],
    "checkerboard": ["checkerboard", "checkered squares", "chessboard", "checkerboard squares"],
    "dots": ["dots", "polka dots", "spots", "tiny dots"],
    "circles": ["rings", "hollow rings", "ring pattern"],
    "crosses": ["plus signs", "plus shapes", "plus marks"],
    "triangles": ["triangles", "triangle shapes", "pointy triangles"],
    "gradient": ["gradient", "colour gradient", "smooth gradient", "colour fade"],
    "zigzag": ["zigzag", "zigzags", "zigzag pattern", "chevrons"],
    "blotches": ["blotches", "camouflage", "soft blotches", "splotches"],
}
CAPTION_TEMPLATES = [
    "a photo of {}.",
    "a photo of the {}.",
    "an image of {}.",
    "a picture of {}.",
    "a rendering of {}.",
    "a close-up photo of {}.",
    "{}.",
    "a pattern of {}.",
    "a drawing of {}.",
    "a texture of {}.",
]
BLANK_CAPTIONS = ["a photo.", "an image.", "a blank photo.", "a plain photo.", "a blank image."]
PRETRAIN_THREADS = 2  # the weights depend on it (float sums); its run time: docs/usage.md
# 'tiny-demo': 32-px open_clip ViT, width 64, 3 layers, 8x8 patches of 4 px (fine enough for the patterns).
CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "patch_size": 4},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
}
TINY_CLIP = {
    "embed_dim": 64,  # 'tiny', for tests: 2 layers, 4x4 patches of 8 px, ~3.4 M parameters (mostly tokens)
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
SPLIT_SEEDS = {"train": 0, "test": 1, "pretrain": 2, "blank": 3}  # pre-training never sees the demo's images
PER_CLASS = {"train": 300, "test": 100, "pretrain": 1000}

DESCRIPTIONS = {  # the demo's shipped "LLM" answers: per class one caption-like description among distractors
    "thin stripes": [
        "a pattern of fine lines packed closely together",
        "narrow parallel bands of two alternating colours",
        "a barcode-like texture of slender strokes",
        "pinstriped fabric seen up close",
        "a surface ruled with many hairline grooves",
    ],
    "thick stripes": [
        "a pattern of wide stripes in two colours",
        "broad parallel bars like an awning",
        "heavy diagonal bands of alternating paint",
        "a flag made of a few fat horizontal strips",
        "bold chunky lines with equal gaps",
    ],
    "checkerboard": [
        "a checkerboard of alternating squares",
        "a tiled floor of light and dark quadrilaterals",
        "a chess-like grid of contrasting cells",
        "a harlequin pattern of rotated diamonds",
        "a mosaic of square tiles in two tones",
    ],
    "dots": [
        "a pattern of polka dots in neat rows",
        "tiny filled discs spaced out evenly",
        "a speckled surface with round specks",
        "fabric printed with small spots",
        "a sheet of confetti laid in rows",
    ],
    "circles": [
        "round discs scattered across a surface",
        "a pattern of hollow rings repeated in rows",
        "concentric curves like the target of a dartboard",
        "a wreath of petals arranged in a circle",
        "bubbles floating in a glass of water",
    ],
    "crosses": [
        "a woven mesh of criss-crossing threads",
        "a pattern of plus signs repeated in rows",
        "crucifix figures hung on a wall",
        "diagonal strokes forming an x-shaped lattice",
        "hash marks scratched onto a board",
    ],
    "triangles": [
        "a pattern of pointy triangles in rows",
        "wedge-shaped tiles pointing the same way",
        "rows of little pyramids seen from above",
        "arrowheads arranged on a grid",
        "a sawtooth border of triangular teeth",
    ],
    "gradient": [
        "a smooth colour gradient from one side to the other",
        "a soft fade between two hues",
        "a sky at dusk turning from light to dark",
        "an airbrushed wash of colour without edges",
        "an evenly shaded blend with no pattern",
    ],
    "zigzag": [
        "a zigzag pattern of sharp back-and-forth lines",
        "chevrons stacked like a sergeant's stripes",
        "a lightning-bolt line repeated across the image",
        "rows of jagged teeth like a saw blade",
        "a wavy knitted texture with pointed peaks",
    ],
    "blotches": [
        "soft blotches of two colours like camouflage",
        "irregular patches with blurry edges",
        "a cow-hide pattern of large uneven spots",
        "ink spilled and smeared into puddles",
        "clouds of colour blending into each other",
    ],
}


# -----------------------------------------------------------------------------
# Drawing: each class is a soft mask m in [0, 1] of shape [32, 32], painted fg over bg

YY, XX = np.mgrid[0:32, 0:32] + 0.5  # pixel centres, [32, 32] each


def _rotated(rng):
    """Pixel coordinates (u, v) in a frame rotated by a random angle. -> two [32, 32] arrays."""
    t = rng.uniform(0, np.pi)
    return XX * np.cos(t) + YY * np.sin(t), -XX * np.sin(t) + YY * np.cos(t)


def _periodic_band(x, period, width, rng):
    """Anti-aliased bands of `width` px repeating every `period` px along coordinate x."""
    d = np.abs((x / period + rng.rand()) % 1 - 0.5) * period  # distance to the nearest band centre
    return np.clip(width / 2 - d + 0.5, 0, 1)


def draw_mask(c, s, rng):
    """Mask of class index c at scale s in [0, 1] (0 = small, 1 = large). -> [32, 32] float in [0, 1]."""
    name = CLASSNAMES[c]
    if name in ("thin stripes", "thick stripes"):  # widths THIN_W / THICK_W: adjacent ranges, so close at the seam
        w = THIN_W[0] + THIN_W[1] * s if name == "thin stripes" else THICK_W[0] + THICK_W[1] * s
        return _periodic_band(_rotated(rng)[0], w * rng.uniform(2.0, 2.8), w, rng)
    if name == "checkerboard":
        u, v = _rotated(rng)
        cell = 4 + 3 * s
        return ((np.floor(u / cell + rng.rand()) + np.floor(v / cell + rng.rand())) % 2).astype(float)
    if name in ("dots", "circles", "crosses", "triangles"):  # a rotated tiling of one motif (learnable per patch)
        period = 7 + 4 * s
        u, v = _rotated(rng)
        du, dv = [((a / period + rng.rand()) % 1 - 0.5) * period for a in (u, v)]  # offsets from the cell centre
        r = np.hypot(du, dv)
        if name == "dots":
            return np.clip(period * 0.22 - r + 0.5, 0, 1)
        if name == "circles":  # hollow rings
            return np.clip(0.7 - np.abs(r - period * 0.32) + 0.5, 0, 1)
        if name == "crosses":  # plus signs
            arm, half_width = period * 0.38, 0.75

            def bar(a, b):
                return np.minimum(arm - np.abs(a), half_width - np.abs(b))

            return np.clip(np.maximum(bar(du, dv), bar(dv, du)) + 0.5, 0, 1)
        phi = np.pi / 2 + np.arange(3)[:, None, None] * 2 * np.pi / 3  # triangles: 3 edge normals
        dist = du * np.cos(phi) + dv * np.sin(phi)  # [3, 32, 32]
        return np.clip(period * TRI_APOTHEM - dist.max(0) + 0.5, 0, 1)
    if name == "gradient":
        u = _rotated(rng)[0]
        return ((u - u.min()) / (u.max() - u.min())) ** rng.uniform(0.5, 2)
    if name == "zigzag":
        u, v = _rotated(rng)
        period, amp = 6 + 4 * s, rng.uniform(2.5, 4.5)
        tri = amp * (4 * np.abs((u / period) % 1 - 0.5) - 1)  # triangle wave in [-amp, amp]
        return _periodic_band(v - tri, 2 * amp + rng.uniform(2.5, 5), rng.uniform(1.4, 2.6), rng)
    # blotches: smooth noise upsampled from a coarse grid, thresholded softly
    k = 6 - int(3 * s)
    coarse = Image.fromarray(rng.rand(k, k).astype(np.float32), mode="F")
    smooth = np.asarray(coarse.resize((32, 32), Image.BILINEAR))
    return np.clip((smooth - 0.5) * rng.uniform(6, 12) + 0.5, 0, 1)


def draw_image(c, rng):
    """One image of class c with random colours, scale, polarity and noise. -> (uint8 [32, 32, 3], attributes)."""
    s, dark, noisy = rng.rand(), rng.rand() < 0.5, rng.rand() < NOISY_RATE
    bg = rng.uniform(0, 90, 3) if dark else rng.uniform(165, 255, 3)  # [3]
    fg = rng.uniform(150, 255, 3) if dark else rng.uniform(0, 110, 3)  # always contrasts with bg
    m = draw_mask(c, s, rng)[..., None]  # [32, 32, 1]
    img = bg * (1 - m) + fg * m + rng.normal(0, rng.uniform(15, 40) if noisy else 3, (32, 32, 3))
    return np.clip(img, 0, 255).astype(np.uint8), dict(
        noisy=noisy, tiny=s < TINY_SCALE, large=s > LARGE_SCALE, hard=noisy or s < TINY_SCALE
    )


def make_caption(c, attrs, rng):
    """A varied caption for an image of class c: phrasing, noun, and sometimes a property word.

    Hard images: at CONFUSE_RATE a plain caption of their look-alike class (LOOKALIKE), else their own class,
    with "dirty" (pixel-noisy) or "small" (tiny) at HARD_WORD_RATE. Their features end up between the two
    classes, and the templates that carry those words ('a photo of a dirty {}.', '... small {}.') lean to the
    true class: the templates disagree on hard images. Easy images: their own class, "clean" or "large" at
    EASY_WORD_RATE, so every template agrees on them.
    Brightness is never captioned: the features then ignore dark-vs-bright, which otherwise splits clusters.
    """
    name = CLASSNAMES[c]
    if attrs["hard"] and name in LOOKALIKE and rng.rand() < CONFUSE_RATE:
        nouns = CAPTION_NOUNS[LOOKALIKE[name]]
        return CAPTION_TEMPLATES[rng.randint(len(CAPTION_TEMPLATES))].format(nouns[rng.randint(len(nouns))])
    noun = CAPTION_NOUNS[name][rng.randint(len(CAPTION_NOUNS[name]))]
    if name not in MISMATCHED and rng.rand() < GENERIC_RATE:  # mismatched names as vague tags elsewhere
        noun = MISMATCHED[rng.randint(len(MISMATCHED))]
    if attrs["hard"]:
        words = (["dirty"] if attrs["noisy"] else []) + (["small"] if attrs["tiny"] else [])
        rate = HARD_WORD_RATE
    else:
        words, rate = ["clean"] + (["large"] if attrs["large"] else []), EASY_WORD_RATE
    adjective = [words[rng.randint(len(words))]] if rng.rand() < rate else []
    template = CAPTION_TEMPLATES[rng.randint(len(CAPTION_TEMPLATES))]
    return template.format(" ".join(adjective + [noun]))


def generate(split, captions_per_image=0):
    """All images of one split, class by class.
    -> (uint8 [N, 32, 32, 3], labels [N], captions [N][K], hard bool [N]: pixel-noisy or tiny)."""
    rng = np.random.RandomState(SPLIT_SEEDS[split])
    images, labels, captions, hard = [], [], [], []
    for c in range(len(CLASSNAMES)):
        for _ in range(PER_CLASS[split]):
            img, attrs = draw_image(c, rng)
            images.append(img)
            labels.append(c)
            hard.append(attrs["hard"])
            captions.append([make_caption(c, attrs, rng) for _ in range(captions_per_image)])
    return np.stack(images), torch.tensor(labels), captions, torch.tensor(hard)


def pretraining_pairs(captions_per_image, n_blank=500):
    """Captioned pre-training images plus `n_blank` pattern-free solid-colour ones.

    The blank images carry the planted mismatch: their captions are plain ("a photo.") or, at rate
    NAMED_BLANK_RATE, name a mismatched class, "circles" on bright and "crosses" on dark ones. So the text
    encoder knows both words, as two different things, and neither as the patterns the demo calls by these
    names (those are captioned "rings" and "plus signs"): the prompts 'a photo of a circles.' and 'a photo of
    a crosses.' stay distinct from each other and from every other class, and point at no image of the
    demo, the way a real class name can mean something else than what a dataset shows.
    -> (uint8 [N, 32, 32, 3], captions [N][K])
    """
    images, _, captions, _ = generate("pretrain", captions_per_image)
    rng = np.random.RandomState(SPLIT_SEEDS["blank"])
    colour = rng.uniform(0, 255, (n_blank, 1, 1, 3))  # [n, 1, 1, 3]
    blank = colour + rng.normal(0, 3, (n_blank, 32, 32, 3))  # solid colours
    blank_captions = []
    for bright in colour.mean((1, 2, 3)) > 127.5:
        word = MISMATCHED[0] if bright else MISMATCHED[1]
        blank_captions.append(
            [
                CAPTION_TEMPLATES[rng.randint(len(CAPTION_TEMPLATES))].format(word)
                if rng.rand() < NAMED_BLANK_RATE
                else BLANK_CAPTIONS[rng.randint(len(BLANK_CAPTIONS))]
                for _ in range(captions_per_image)
            ]
        )
    return np.concatenate([images, np.clip(blank, 0, 255).astype(np.uint8)]), captions + blank_captions


def load_demo_dataset():
    """The demo's labelled splits, as data.py's loaders give them.
    -> ([(train PIL images, labels), (test PIL images, labels)], classnames)"""
    parts = []
    for split in ("train", "test"):
        images, labels, _, _ = generate(split)
        parts.append(([Image.fromarray(im) for im in images], labels))
    return parts, list(CLASSNAMES)


# -----------------------------------------------------------------------------
# Contrastive pre-training of the tiny CLIP (Radford et al. 2021, §2.3: symmetric InfoNCE)


def to_clip_tensor(images):
    """uint8 [N, 32, 32, 3] -> float [N, 3, 32, 32] normalised like the tiny model's eval preprocess."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # [N, 3, 32, 32]
    return (x - torch.tensor(OPENAI_DATASET_MEAN)[:, None, None]) / torch.tensor(OPENAI_DATASET_STD)[:, None, None]


def clip_loss(image_features, text_features, logit_scale):
    """Symmetric cross-entropy over the B x B image-text similarities; pair i is the positive of row i."""
    logits = logit_scale.exp().clamp(max=100) * image_features @ text_features.T  # [B, B]
    target = torch.arange(len(logits))  # [B]
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def pretrain(model, tokenizer, steps=700, batch_size=128, lr=3e-3, seed=0, captions_per_image=4, progress=iter):
    """Train every parameter of a randomly initialised 'tiny-demo' CLIP on pre-training pairs, in place.

    progress wraps the step range (a progress bar or periodic log line; plain `iter` prints nothing).
    -> model (eval mode)
    """
    images, captions = pretraining_pairs(captions_per_image)
    x = to_clip_tensor(images)  # [N, 3, 32, 32]
    # OpenAI's CLIP ends training at logit scale 100 (its clamp); fixing it there from the start gives the tiny
    # model CLIP-like narrow cosine ranges, so the papers' constants (τ = 0.85, m = 12, 100·cos) fit the demo.
    model.logit_scale.data.fill_(math.log(100))
    model.logit_scale.requires_grad_(False)
    tokens = tokenizer(sum(captions, [])).view(len(x), captions_per_image, -1)  # [N, K, L]
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, fused=True)
    warmup = max(1, steps // 10)  # a linear warm-up factor times the cosine over all steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1, (t + 1) / warmup) * common.cosine(t, steps))
    g = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(PRETRAIN_THREADS)  # a fixed count: float sums, so the weights, depend on it
    try:
        for _ in progress(range(steps)):
            idx = torch.randint(len(x), (batch_size,), generator=g)  # [B]
            pick = torch.randint(captions_per_image, (batch_size,), generator=g)  # [B]: one caption per image
            image_features = model.encode_image(x[idx], normalize=True)  # [B, D]
            text_features = model.encode_text(tokens[idx, pick], normalize=True)  # [B, D]
            loss = clip_loss(image_features, text_features, model.logit_scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def register_tiny_clips():
    """Register 'tiny' (tests) and 'tiny-demo' (this world) with open_clip, in-process: no download."""
    for name, cfg in {"tiny": TINY_CLIP, "tiny-demo": CLIP_CONFIG}.items():
        if name not in open_clip.list_models():
            path = Path(tempfile.mkdtemp()) / f"{name}.json"
            path.write_text(json.dumps(cfg))
            open_clip.add_model_config(path)


register_tiny_clips()  # at import: every script that reads the dataset table can load 'tiny' and 'tiny-demo'


# -----------------------------------------------------------------------------
# The demo CLIP's weights: shipped with the repository, pre-trained again only if they are missing or unreadable

WEIGHTS = Path(__file__).resolve().parent / "assets" / f"demo_clip_v{VERSION}.pt"


def _readable(path):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return isinstance(state, dict) and "logit_scale" in state
    except Exception:
        return False


def clip_weights(cache_dir, quiet=False):
    """--pretrained demo -> a weights file: the shipped assets/demo_clip_v<VERSION>.pt, else one pre-trained
    earlier into --cache-dir, else pre-train now (minutes on a CPU: docs/usage.md) and cache it there."""
    cached = Path(cache_dir) / WEIGHTS.name
    for path in (WEIGHTS, cached):
        if path.exists():
            if _readable(path):
                return path
            print(f"demo CLIP: {path} is unreadable (truncated?); not using it", file=sys.stderr)
    print(f"demo CLIP: pre-training the tiny CLIP on synthetic image-caption pairs into {cached} (minutes on a CPU)")
    start = time.time()
    model, _, tokenizer = common.load_clip("tiny-demo", "none")
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
        pretrain(model, tokenizer, progress=lambda it: common.progress(it, "pre-train demo CLIP", quiet))
    common.save_atomic(model.state_dict(), cached)
    print(f"demo CLIP: pre-trained in {time.time() - start:.0f}s")
    return cached
