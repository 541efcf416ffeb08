"""The dataset table: `--data NAME` -> a loader giving the train and test images, their labels and the class
names CLIP reads. torchvision's datasets where it has them (downloaded with --download), image folders for
RESISC45 and CUB, any ImageFolder tree (`--data folder`), the offline demo world and a tiny synthetic set for
tests. Nothing here is part of either method; a missing dataset is one line that names the folder and the flags.

The six datasets of the CAP/FPL/GRIP/CPL tables are also read from the papers' ELEVATER-based data bundle
(<data-dir>/DTD/, EuroSAT/, Flowers102/, FGVCAircraft/, RESICS45/, CUB/) by the rules of the CAP release
(utils/prepare_data.py, data/dataset.py of github:Noahwangyuchen/CAP): the bundle is used when its folder holds
its class-name file, torchvision's (or the official) layout otherwise. ImageNet is an ImageFolder train/ + val/.

Every loader returns an `info` dict that results.json records: the layout read, the split sizes and a 12-hex
sha1 of each split's "path label" list (paths relative to the dataset root), so two runs can tell whether
they used the same split.

Beside the table: images as a torch Dataset and endless seeded batches of them, the class text a dataset brings
(its LLM domain, shipped descriptions, description files), the published zero-shot rows each run is checked
against (docs/paper_results.json), and the papers' settings (which images are labeled) with their metrics.
"""

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.datasets as D
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
from PIL import Image
from timm.data import ImageNetInfo  # a dependency of open_clip: the ImageNet-1k wnid list
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

import common
import demo  # the offline demo world and its tiny CLIP (registered with open_clip when demo is imported)

# ---------------------------------------------------------------------------------------------------------------
# Images as a torch Dataset. `samples`: anything indexable giving a PIL image or a path.


class ImageList(Dataset):
    """Indexable (image, label, index) with a transform; reads paths lazily, names unreadable files."""

    def __init__(self, samples, labels, transform):
        self.samples, self.labels, self.transform = samples, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = self.samples[i]
        img = img[0] if isinstance(img, tuple) else img  # torchvision datasets return (image, label)
        if isinstance(img, str):
            try:
                img = Image.open(img).convert("RGB")
            except Exception as e:  # unreadable image: stop and name it (documented choice)
                raise common.UserError(f"cannot read image {img}: {e}") from None
        elif hasattr(img, "convert"):
            img = img.convert("RGB")
        return self.transform(img), int(self.labels[i]), i


# ---------------------------------------------------------------------------------------------------------------
# The dataset table: class names, and one loader per --data name (DATASETS below)

# CLIP-style names used by FPL/CAP, in torchvision folder order
EUROSAT_CLASSNAMES = (
    "annual crop land, forest, brushland or shrubland, highway or road, "
    "industrial buildings or commercial buildings, pasture land, permanent crop land, "
    "residential buildings or homes or apartments, river, lake or sea"
).split(", ")
# the image folder of each name above
EUROSAT_FOLDERS = (
    "AnnualCrop, Forest, HerbaceousVegetation, Highway, Industrial, Pasture, PermanentCrop, Residential, River, SeaLake"
).split(", ")
RESISC45_CLASSNAMES = (
    "airplane, airport, baseball diamond, basketball court, beach, bridge, chaparral, church, "
    "circular farmland, cloud, commercial area, dense residential, desert, forest, freeway, golf course, "
    "ground track field, harbor, industrial area, intersection, island, lake, meadow, "
    "medium residential, mobile home park, mountain, overpass, palace, parking lot, railway, "
    "railway station, rectangular farmland, river, roundabout, runway, sea ice, ship, snowberg, "
    "sparse residential, stadium, storage tank, tennis court, terrace, thermal power station, wetland"
).split(", ")


def seeded_split(n, test_frac, seed):
    """Deterministic train/test index split for datasets that ship without one. -> (train_idx, test_idx)"""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = int(round(n * test_frac))
    return sorted(perm[n_test:]), sorted(perm[:n_test])


def decode_images(samples, labels, size, workers=0):
    """Decode every image once, Resize + CenterCrop to `size`. -> uint8 [N, 3, size, size]"""
    tf = v2.Compose([v2.Resize(size), v2.CenterCrop(size), v2.PILToTensor()])
    loader = DataLoader(
        ImageList(samples, labels, tf), batch_size=512, num_workers=workers, generator=torch.Generator()
    )
    return torch.cat([x for x, _, _ in loader])


def _require(path, what, flag="--data-dir"):
    if not Path(path).exists():
        raise common.UserError(
            f"{what} not found at {path}; pass {flag} pointing at it (or --download where supported)"
        )


def _torchvision(cls, root, download, **kw):
    """Build a torchvision dataset; 'not found' (or a failed download) becomes a one-line UserError, and what
    a failed download created under `root` is removed again (no empty folder left behind)."""
    root = Path(root)
    before = set(root.iterdir()) if root.is_dir() else None
    try:
        return cls(root=str(root), download=download, **kw)
    except (RuntimeError, FileNotFoundError, OSError, ValueError) as e:
        if download:  # offline or interrupted: undo what the attempt created
            for p in set(root.iterdir()) - before if before is not None else [root]:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            raise common.UserError(
                f"could not download {cls.__name__} into {root} ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:100] if str(e) else ''}); offline, try --data demo"
            ) from None
        bundle = {folder: marker for folder, marker, _ in BUNDLE.values()}.get(cls.__name__)
        also = f", or the data bundle's {cls.__name__}/ with its {bundle}" if bundle else ""
        raise common.UserError(
            f"{cls.__name__} not found under {root}; put it there (torchvision's layout{also}), "
            f"point --data-dir at its parent folder, or add --download; offline, try --data demo"
        ) from None


def _tv_pair(cls, root, download, names, train_kw, test_kw):
    """(samples, labels) for a torchvision dataset with several official parts per split."""
    out = []
    for kws in (train_kw, test_kw):
        samples, labels = [], []
        for kw in kws:
            ds = _torchvision(cls, root, download, **kw)
            samples += [str(p) for p in ds._image_files]
            labels += list(ds._labels)
        out.append((samples, torch.tensor(labels)))
    return out, names or ds.classes


def _load_dtd(root, download):
    parts, names = _tv_pair(D.DTD, root, download, None, [dict(split="train"), dict(split="val")], [dict(split="test")])
    return parts, [n.replace("_", " ") for n in names]


FLOWERS_RENAMES = {
    "globe-flower": "globe flower",
    "pink-yellow dahlia?": "pink and yellow dahlia",
    "ball moss": "air plant",
}  # torchvision's three odd names, as CLIP/CoOp/FPL/CAP spell them


def _load_flowers(root, download):
    names = [FLOWERS_RENAMES.get(n, n) for n in D.Flowers102.classes]
    return _tv_pair(D.Flowers102, root, download, names, [dict(split="train"), dict(split="val")], [dict(split="test")])


def _load_aircraft(root, download):
    return _tv_pair(D.FGVCAircraft, root, download, None, [dict(split="trainval")], [dict(split="test")])


def _folder_samples(root):
    """(paths, labels, classnames) of an ImageFolder-style tree root/<class>/<image>."""
    root = Path(root)
    if not root.is_dir():
        raise common.UserError(
            f"image folder {root} does not exist; pass --data-dir PATH to a root/<class>/<image> tree"
        )
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    ext = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
    paths, labels = [], []
    for c, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in ext)
        paths += [str(p) for p in files]
        labels += [c] * len(files)
    if not paths:
        raise common.UserError(
            f"image folder {root} holds no images in class sub-folders; expected root/<class>/<image>"
        )
    return paths, torch.tensor(labels), classes


def _split_folder(root, seed=0):
    """root/{train,test}/<class>/... if present, otherwise a seeded 80/20 split of root/<class>/..."""
    root = Path(root)
    if (root / "train").is_dir() and (root / "test").is_dir():
        p_tr, y_tr, names = _folder_samples(root / "train")
        p_te, y_te, _ = _folder_samples(root / "test")
        return [(p_tr, y_tr), (p_te, y_te)], names
    paths, labels, names = _folder_samples(root)
    tr, te = seeded_split(len(paths), 0.2, seed)
    return [([paths[i] for i in tr], labels[tr]), ([paths[i] for i in te], labels[te])], names


def _load_eurosat(root, download):
    ds = _torchvision(D.EuroSAT, root, download)
    paths, labels = [p for p, _ in ds.samples], torch.tensor(ds.targets)
    tr, te = seeded_split(len(paths), 0.2, seed=0)  # Co-Reg: random 80/20 (seeded here, unseeded there)
    names = EUROSAT_CLASSNAMES if ds.classes[0] == "AnnualCrop" else ds.classes
    return [([paths[i] for i in tr], labels[tr]), ([paths[i] for i in te], labels[te])], names


def _load_resisc45(root, download):
    base = Path(root) / "NWPU-RESISC45"
    _require(base, "RESISC45 (root/NWPU-RESISC45/<class>/<image>.jpg, or the data bundle's root/RESICS45/train.json)")
    parts, _ = _split_folder(base)
    return parts, RESISC45_CLASSNAMES


def _load_cub(root, download):
    """CUB-200-2011 as it unpacks: <root>/CUB_200_2011/{classes.txt, images.txt, train_test_split.txt, images/}."""
    base = Path(root)
    _require(
        base / "CUB_200_2011" / "images.txt",
        "CUB-200-2011 (root/CUB_200_2011/images.txt, images/, train_test_split.txt, or the data bundle's "
        "root/CUB/CUB_200_2011/)",
    )
    pool, test, names = _cub_rows(base / "CUB_200_2011")
    return _rows_to_parts(base, pool, test), names


def _load_small_tv(name):
    """Co-Reg's small-image datasets, each with its official train/test split."""

    def load(root, download):
        cls, kw_tr, kw_te = {
            "cifar10": (D.CIFAR10, dict(train=True), dict(train=False)),
            "cifar100": (D.CIFAR100, dict(train=True), dict(train=False)),
            "fashion_mnist": (D.FashionMNIST, dict(train=True), dict(train=False)),
            "svhn": (D.SVHN, dict(split="train"), dict(split="test")),
            "gtsrb": (D.GTSRB, dict(split="train"), dict(split="test")),
            "fer2013": (D.FER2013, dict(split="train"), dict(split="test")),
        }[name]
        parts = []
        for kw in (kw_tr, kw_te):
            ds = _torchvision(cls, root, False if name == "fer2013" else download, **kw)
            labels = (
                [ds[i][1] for i in range(len(ds))]
                if name in ("gtsrb", "fer2013")
                else (ds.labels if name == "svhn" else ds.targets)
            )
            parts.append((ds, torch.as_tensor(labels)))
        names = getattr(ds, "classes", None) or SMALL_CLASSNAMES[name]
        return parts, list(names)

    return load


SMALL_CLASSNAMES = {
    "svhn": [str(i) for i in range(10)],
    "fer2013": ["angry", "disgusted", "fearful", "happy", "sad", "surprised", "neutral"],
    "gtsrb": [f"traffic sign {i}" for i in range(43)],  # torchvision ships no GTSRB names
}


def _load_synthetic(root, download):
    """4 classes of coloured noise, 64 train / 32 test 32-px images, fixed generation seed. For tests."""
    g = torch.Generator().manual_seed(0)
    colours = torch.tensor([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]], dtype=torch.float)
    parts = []
    for n in (64, 32):
        labels = torch.arange(n) % 4
        pix = colours[labels][:, :, None, None] + 40 * torch.randn(n, 3, 32, 32, generator=g)
        pix = pix.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        parts.append(([Image.fromarray(p) for p in pix], labels))
    return parts, ["red", "green", "blue", "yellow"]


# ---------------------------------------------------------------------------------------------------------------
# What results.json records about the data: the layout read, the split sizes and a fingerprint of each split.


def _digest(rows):
    """[(path or token, label)] -> 12 hex chars of sha1 over the lines "<path> <label>" joined by newlines."""
    text = "\n".join(f"{r} {int(y)}" for r, y in rows)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def _sample_rows(samples, labels, root):
    """One split -> [(token, label)] to fingerprint: image paths relative to `root` (POSIX), each image's pixel
    sha1 for in-memory PIL images, or the labels alone for a dataset object (reading every image takes minutes)."""
    labels = [int(y) for y in labels]
    first = samples[0] if isinstance(samples, list) and samples else None
    if isinstance(first, str):
        return [(Path(os.path.relpath(p, root)).as_posix(), y) for p, y in zip(samples, labels)]
    if hasattr(first, "tobytes"):
        return [(hashlib.sha1(im.tobytes()).hexdigest()[:12], y) for im, y in zip(samples, labels)]
    return [("", y) for y in labels]


def _info(layout, root, parts, **extra):
    """parts [(train samples, labels), (test samples, labels)] -> {layout, n_train, n_test, train_hash, test_hash}."""
    (train, y_train), (test, y_test) = parts
    return dict(
        layout=layout,
        n_train=len(y_train),
        n_test=len(y_test),
        train_hash=_digest(_sample_rows(train, y_train, root)),
        test_hash=_digest(_sample_rows(test, y_test, root)),
        **extra,
    )


def _plain(loader, layout):
    """A DATASETS loader from one that knows a single layout: its (parts, classnames) plus their info."""

    def load(root, download, as_released=False):
        parts, names = loader(root, download)
        return parts, list(names), _info(layout, root, parts)

    return load


# ---------------------------------------------------------------------------------------------------------------
# The papers' data bundle (ELEVATER-based, distributed by FPL/GRIP and CPL), read as the CAP release reads it:
# classes from utils/prepare_data.py (get_class_names), the pool (train + val) and the test set from
# get_labeled_and_unlabeled_data, where each image file sits from data/dataset.py. Labels are 0-based class indices.


def _rows_to_parts(base, *splits):
    """Splits of rows [(path relative to base, label)] -> [(paths, labels [N] int64), ...]."""
    return [([str(base / r) for r, _ in rows], torch.tensor([y for _, y in rows], dtype=torch.long)) for rows in splits]


def _bundle_result(base, pool, test, names, **extra):
    """The pool's and the test set's rows [(path relative to base, label)] -> (parts, classnames, info)."""
    for what, rows in (("train pool", pool), ("test set", test)):
        if not rows:
            raise common.UserError(f"the data bundle's {base} gives an empty {what}")
        if not (base / rows[0][0]).is_file():
            raise common.UserError(
                f"{base / rows[0][0]} (first image of the {what}) not found; the bundle's "
                f"{base.name}/ should hold the images where its lists put them"
            )
    info = dict(
        layout="bundle", n_train=len(pool), n_test=len(test), train_hash=_digest(pool), test_hash=_digest(test), **extra
    )
    return _rows_to_parts(base, pool, test), list(names), info


def _read_lines(path):
    """-> [(line number, stripped text)] of a text file's non-blank lines; a missing file is one line."""
    if not path.is_file():
        raise common.UserError(f"{path} not found; the data bundle's {path.parent.name}/ folder should hold it")
    return [(i, t.strip()) for i, t in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if t.strip()]


def _class_names(path):
    """class_names.txt / labels.txt: one name a line, in label order, used as written (already CLIP-style)."""
    return [t for _, t in _read_lines(path)]


def _list_rows(path, n_classes=None):
    """An ELEVATER list file, lines "<zip>@<image path> <label>" (or "<image path> <label>").
    -> [(line number, image path, label)]. As the release: the path is what follows the last '@' (it may hold
    spaces: FGVCAircraft's class folders), the label the last field, a 0-based index into the class-name file
    (checked when n_classes is given; FGVCAircraft's is not read)."""
    rows = []
    for i, text in _read_lines(path):
        fields = text.rsplit(" ", 1)
        rel = fields[0].split("@")[-1].strip()
        if len(fields) != 2 or not rel or (n_classes is not None and not fields[1].isdigit()):
            raise common.UserError(f"{path}, line {i}: expected '<image path> <class index>', got {text[:80]!r}")
        label = int(fields[1]) if n_classes is not None else None
        if label is not None and label >= n_classes:
            raise common.UserError(
                f"{path}, line {i}: class index {label}, but the class-name file lists "
                f"{n_classes} names (indices 0-{n_classes - 1})"
            )
        rows.append((i, rel, label))
    return rows


def _bundle_indexed(base, as_released=False):
    """DTD/ and Flowers102/ (the release reads both alike): class_names.txt; train.txt + val.txt are the pool,
    test.txt the test set; a line's image is <base>/<split>/<path after '@'>, its label the line's index."""
    names = _class_names(base / "class_names.txt")
    rows = {
        split: [(f"{split}/{rel}", y) for _, rel, y in _list_rows(base / f"{split}.txt", len(names))]
        for split in ("train", "val", "test")
    }
    return _bundle_result(base, rows["train"] + rows["val"], rows["test"], names)


def _bundle_aircraft(base, as_released=False):
    """FGVCAircraft/: labels.txt (the 100 variants, '/' written '-', in the bundle's order, not torchvision's);
    train.txt + val.txt are the pool, test.txt the test set. As the release: the image is <base>/<split>/<path>
    and its class is the path's first folder looked up in labels.txt; the line's own index is not read."""
    names = _class_names(base / "labels.txt")
    index = {n: c for c, n in enumerate(names)}
    rows = {}
    for split in ("train", "val", "test"):
        rows[split] = []
        for i, rel, _ in _list_rows(base / f"{split}.txt"):
            folder = rel.split("/")[0].strip()
            if folder not in index:
                raise common.UserError(
                    f"{base / f'{split}.txt'}, line {i}: class folder '{folder}' is not a name in {base / 'labels.txt'}"
                )
            rows[split].append((f"{split}/{rel}", index[folder]))
    return _bundle_result(base, rows["train"] + rows["val"], rows["test"], names)


def _bundle_eurosat(base, as_released=False):
    """EuroSAT/: class_names.txt (CLIP-style names), one image folder per class, test.txt. As the release: the
    pool is every file of every class folder (os.listdir there, sorted here), the test set is test.txt, and
    every file, test files included, is <base>/<its name up to the first '_'>/<its name>. So the test images
    are in the pool too: dropped from it here (one line says how many) unless as_released, as the paper's
    EuroSAT cells were run (trained on them, unlabelled)."""
    names = _class_names(base / "class_names.txt")
    folder_of = dict(zip(EUROSAT_CLASSNAMES, EUROSAT_FOLDERS))
    unknown = [n for n in names if n not in folder_of]
    if unknown:
        raise common.UserError(
            f"{base / 'class_names.txt'}: unknown EuroSAT class name(s) {unknown}; "
            f"expected names among {EUROSAT_CLASSNAMES}"
        )
    pool = []
    for c, name in enumerate(names):
        folder = base / folder_of[name]
        if not folder.is_dir():
            raise common.UserError(f"EuroSAT class folder {folder} not found; the bundle keeps one per class")
        pool += [
            (f"{folder.name}/{f}", c)
            for f in sorted(os.listdir(folder))
            if not f.startswith(".") and (folder / f).is_file()
        ]
    test = []
    for _, rel, y in _list_rows(base / "test.txt", len(names)):
        f = rel.split("/")[-1]
        test.append((f"{f.split('_')[0]}/{f}", y))
    in_test = {r for r, _ in test}
    overlap = sum(r in in_test for r, _ in pool)
    if not as_released:
        pool = [(r, y) for r, y in pool if r not in in_test]
        print(f"eurosat: dropped {overlap} test images from the train pool (--as-released keeps them, as the release)")
    return _bundle_result(
        base,
        pool,
        test,
        names,
        n_test_dropped_from_pool=0 if as_released else overlap,
        n_test_in_pool=overlap if as_released else 0,
    )


def _json_images(path):
    """A COCO-style RESICS45 split file -> (the parsed object, [(index in "images", file_name after '@')])."""
    if not path.is_file():
        raise common.UserError(f"{path} not found; the data bundle's {path.parent.name}/ folder should hold it")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise common.UserError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    images = meta.get("images") if isinstance(meta, dict) else None
    if not isinstance(images, list):
        raise common.UserError(f'{path}: no "images" list (expected COCO-style {{"images": [...], ...}})')
    out = []
    for k, d in enumerate(images):
        name = d.get("file_name") if isinstance(d, dict) else None
        if not isinstance(name, str) or "/" not in name.split("@")[-1]:
            raise common.UserError(
                f"{path}, images[{k}]: expected a \"file_name\" like '<zip>@<class>/<image>', got {str(d)[:80]!r}"
            )
        out.append((k, name.split("@")[-1]))
    return meta, out


def _bundle_resisc45(base, as_released=False):
    """RESICS45/ (the release's spelling): train.json + val.json are the pool, test.json the test set. As the
    release: the class names are train.json's "categories" names in that order, '_' read as ' '; an image's
    class is the first folder of its file_name (after '@'), '_' read as ' ', and the image is
    <base>/<its name without the last '_' part>/<its name> (baseball_diamond_001.jpg -> baseball_diamond/)."""
    split_files = {split: _json_images(base / f"{split}.json") for split in ("train", "val", "test")}
    cats = split_files["train"][0].get("categories")
    if not isinstance(cats, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in cats):
        raise common.UserError(f'{base / "train.json"}: expected a "categories" list of {{"name": ...}}')
    names = [c["name"].replace("_", " ") for c in cats]
    index = {n: c for c, n in enumerate(names)}
    rows = {}
    for split, (_, images) in split_files.items():
        rows[split] = []
        for k, name in images:
            cls, img = name.split("/")[0].replace("_", " "), name.split("/")[-1]
            if cls not in index:
                raise common.UserError(
                    f"{base / f'{split}.json'}, images[{k}]: class '{cls}' is not among train.json's categories"
                )
            rows[split].append((f"{'_'.join(img.split('_')[:-1])}/{img}", index[cls]))
    return _bundle_result(base, rows["train"] + rows["val"], rows["test"], names)


def _cub_fields(path, what):
    """CUB's "<image or class id> <value>" files -> [(line number, value)]."""
    rows = _read_lines(path)
    for i, t in rows:
        if len(t.split()) < 2:
            raise common.UserError(f"{path}, line {i}: expected '<id> <{what}>', got {t[:80]!r}")
    return [(i, t.split()[-1]) for i, t in rows]


def _cub_rows(cub):
    """CUB_200_2011/'s official files, read as the release reads them. The class names are classes.txt's
    "<n> <k>.<Name_Of_Bird>" -> "name of bird"; the pool is the images (images.txt) marked non-zero in
    train_test_split.txt, matched line by line, the test set the rest; an image's class is its folder, cleaned
    the same way. -> (pool, test, classnames), rows (path relative to cub's parent, label)."""
    clean = lambda folder: folder.split(".")[-1].strip().replace("_", " ").lower()  # noqa: E731
    names = [clean(t) for _, t in _cub_fields(cub / "classes.txt", "class folder")]
    index = {n: c for c, n in enumerate(names)}
    files = _cub_fields(cub / "images.txt", "image path")
    flags = _cub_fields(cub / "train_test_split.txt", "is_training_image")
    if len(flags) != len(files):
        raise common.UserError(f"{cub / 'train_test_split.txt'} has {len(flags)} lines, images.txt {len(files)}")
    pool, test = [], []
    for (i, f), (j, flag) in zip(files, flags):
        if not flag.isdigit():
            raise common.UserError(f"{cub / 'train_test_split.txt'}, line {j}: expected '<image id> <0 or 1>'")
        if clean(f.split("/")[0]) not in index:
            raise common.UserError(f"{cub / 'images.txt'}, line {i}: the folder of {f} is not in classes.txt")
        (pool if int(flag) else test).append((f"{cub.name}/images/{f}", index[clean(f.split("/")[0])]))
    return pool, test, names


def _bundle_cub(base, as_released=False):
    """CUB/ holds the official CUB_200_2011/ (see _cub_rows)."""
    pool, test, names = _cub_rows(base / "CUB_200_2011")
    return _bundle_result(base, pool, test, names)


BUNDLE = {  # --data name -> (the bundle's folder, the file that marks it as the bundle's, its reader)
    "dtd": ("DTD", "class_names.txt", _bundle_indexed),
    "eurosat": ("EuroSAT", "class_names.txt", _bundle_eurosat),
    "flowers102": ("Flowers102", "class_names.txt", _bundle_indexed),
    "fgvc_aircraft": ("FGVCAircraft", "labels.txt", _bundle_aircraft),
    "resisc45": ("RESICS45", "train.json", _bundle_resisc45),
    "cub": ("CUB", "CUB_200_2011/images.txt", _bundle_cub),
}


def _bundle_or(name, fallback, layout="torchvision"):
    """A DATASETS loader: the bundle's <root>/<folder>/ when its marker file is there, else `fallback`'s layout."""
    folder, marker, reader = BUNDLE[name]
    other = _plain(fallback, layout)

    def load(root, download, as_released=False):
        base = Path(root) / folder
        if (base / marker).is_file():
            return reader(base, as_released)
        return other(root, download)

    return load


# ---------------------------------------------------------------------------------------------------------------
# ImageNet-1k as an ImageFolder tree


def _imagenet_wnids():
    """The 1,000 ImageNet-1k WordNet ids in sorted order: the standard class index order, the order of open_clip's
    IMAGENET_CLASSNAMES. open_clip and torchvision ship no wnid list; timm (a dependency of open_clip) does."""
    wnids = list(ImageNetInfo().label_names())
    if len(wnids) != 1000 or wnids != sorted(wnids):
        raise common.UserError(f"timm's ImageNet-1k wnid list is not the 1,000 sorted ids (got {len(wnids)})")
    return wnids


def _load_imagenet(root, download, as_released=False):
    """<root>/imagenet/{train,val}/<wnid>/<image> (or <root>/{train,val}/...), val/ sorted into wnid folders as
    torchvision's ImageNet or the usual valprep script leave it. The classes are train/'s wnid folders, sorted
    (all 1,000: the standard index), named by open_clip's IMAGENET_CLASSNAMES; val/ must have the same folders."""
    root = Path(root)
    base = next((b for b in (root / "imagenet", root) if (b / "train").is_dir() and (b / "val").is_dir()), None)
    if base is None:
        raise common.UserError(
            f"ImageNet not found: expected {root / 'imagenet'}/ (or {root}/) to hold train/ and "
            f"val/ with one folder per wnid (n01440764, ...); pass --data-dir"
        )
    name_of = dict(zip(_imagenet_wnids(), IMAGENET_CLASSNAMES))
    p_train, y_train, wnids = _folder_samples(base / "train")
    unknown = [w for w in wnids if w not in name_of]
    if unknown:
        raise common.UserError(f"{base / 'train'}: folder(s) {unknown[:3]} are not ImageNet-1k wnids (n01440764, ...)")
    p_test, y_test, wnids_val = _folder_samples(base / "val")
    if wnids_val != wnids:
        raise common.UserError(
            f"{base / 'val'} has other class folders than {base / 'train'} ({len(wnids_val)} vs "
            f"{len(wnids)}); sort val/ into the same wnid folders"
        )
    parts = [(p_train, y_train), (p_test, y_test)]
    return parts, [name_of[w] for w in wnids], _info("folder", base, parts)


DATASETS = {  # name -> loader(root, download, as_released=False)
    #   -> ([(train_samples, labels), (test_samples, labels)], classnames, info)
    "dtd": _bundle_or("dtd", _load_dtd),
    "eurosat": _bundle_or("eurosat", _load_eurosat),
    "flowers102": _bundle_or("flowers102", _load_flowers),
    "fgvc_aircraft": _bundle_or("fgvc_aircraft", _load_aircraft),
    "resisc45": _bundle_or("resisc45", _load_resisc45, "folder"),
    "cub": _bundle_or("cub", _load_cub, "official"),
    **{
        n: _plain(_load_small_tv(n), "torchvision")
        for n in ("cifar10", "cifar100", "svhn", "fashion_mnist", "gtsrb", "fer2013")
    },
    "imagenet": _load_imagenet,
    "folder": _plain(lambda root, download: _split_folder(root), "folder"),
    "synthetic": _plain(_load_synthetic, "generated"),
    "demo": _plain(lambda root, download: demo.load_demo_dataset(), "generated"),
}

# Which CLIP a dataset uses when --clip-model / --pretrained are not given (default: ViT-B-32 with OpenAI's
# weights): the demo world has its own tiny CLIP, whose weights ship in assets/ (demo.clip_weights).
CLIP_DEFAULTS = {"demo": {"clip_model": "tiny-demo", "pretrained": "demo"}}
# What each dataset's images are, for CAP's LLM prompt ("... visual descriptions of <class>, a <domain>").
DOMAINS = {
    "dtd": "texture",
    "eurosat": "satellite image",
    "resisc45": "satellite image",
    "flowers102": "flower",
    "fgvc_aircraft": "aircraft",
    "cub": "bird",
    "imagenet": "object",
    "demo": "synthetic pattern image",
}
# The class descriptions a dataset ships, used by CAP when no LLM answers (§3.1): the demo world's own.
SHIPPED_DESCRIPTIONS = {"demo": demo.DESCRIPTIONS}


def load_dataset(name, data_dir="data", download=False, as_released=False):
    """-> (train_samples, train_labels [N], test_samples, test_labels [M], classnames, info).

    info = {layout: "bundle" | "torchvision" | "official" | "folder" | "generated", n_train, n_test,
    train_hash, test_hash}, plus n_test_dropped_from_pool and n_test_in_pool for the bundle's EuroSAT. A hash is
    12 hex chars of sha1 over the split's "<path relative to the dataset root> <label>" lines (see _digest); an
    in-memory split hashes each image's pixels (PIL) or, for a dataset object, the labels alone.
    as_released keeps EuroSAT's test images in its train pool, as the CAP release does."""
    if name not in DATASETS:
        raise common.UserError(f"unknown dataset '{name}'; choose one of {sorted(DATASETS)}")
    ((train, y_train), (test, y_test)), classnames, info = DATASETS[name](data_dir, download, as_released)
    return train, y_train, test, y_test, list(classnames), info


# ---------------------------------------------------------------------------------------------------------------
# A dataset together with CLIP and the image features of both splits


@dataclass
class Prepared:
    """A dataset with the CLIP that reads it and both splits' image features (every script's first step)."""

    train: list  # training images (PIL images, paths or a dataset object), indexable
    y_train: torch.Tensor  # [N] true labels (for reports only: the methods never train on them in UL)
    test: list  # test images
    y_test: torch.Tensor  # [M]
    classnames: list  # the names CLIP reads
    split_info: dict  # layout, sizes and the splits' fingerprints, for results.json
    model: torch.nn.Module  # open_clip CLIP, eval mode
    preprocess: object  # its image transform
    tokenizer: object
    pretrained: str  # the weights: an open_clip tag or a file
    f_train: torch.Tensor  # [N, D] image features, L2-normalised float32
    f_test: torch.Tensor  # [M, D]


def prepare(args, device, keep_test_in_pool=False):
    """Load the dataset and CLIP, and encode both splits once (cached), drawing no global random numbers."""
    train, y_train, test, y_test, classnames, info = load_dataset(
        args.data, args.data_dir, args.download, as_released=keep_test_in_pool
    )
    if len(classnames) < 2 or len(torch.unique(y_train)) < 2:
        raise common.UserError(
            f"--data {args.data}: found {len(classnames)} class(es) in {args.data_dir}; classification needs at least 2"
        )
    pretrained = demo.clip_weights(args.cache_dir, args.quiet) if args.pretrained == "demo" else args.pretrained
    model, preprocess, tokenizer = common.load_clip(args.clip_model, pretrained, device)
    data_key = args.data  # a folder dataset is keyed by its path too: two folders must not share a cache
    if args.data == "folder":
        data_key += "-" + hashlib.sha1(str(Path(args.data_dir).resolve()).encode()).hexdigest()[:8]
    feats = {}
    for split, samples, labels in (("train", train, y_train), ("test", test, y_test)):
        split_key = f"{split}_{info[split + '_hash']}" if info.get(split + "_hash") else split  # the split's content
        cache = None
        if not args.no_cache:
            cache = common.cache_path(args.cache_dir, data_key, split_key, args.clip_model, pretrained)
        images = ImageList(samples, labels, preprocess)
        feats[split], _ = common.encode_images(
            model, images, device, workers=args.workers, cache_file=cache, quiet=args.quiet
        )
    f_train, f_test = feats["train"], feats["test"]  # [N, D], [M, D]
    clip = (model, preprocess, tokenizer, str(pretrained))
    return Prepared(train, y_train, test, y_test, classnames, info, *clip, f_train, f_test)
