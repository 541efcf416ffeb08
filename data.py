"""The dataset table: `--data NAME` -> a loader giving the train and test images, their labels and the class
names CLIP reads. torchvision's datasets where it has them (downloaded with --download), image folders for
RESISC45 and CUB, any ImageFolder tree (`--data folder`), the offline demo world and a tiny synthetic set for
tests. Nothing here is part of either method; a missing dataset is one line that names the folder and the flags.
"""
from pathlib import Path

import torch

import common  # UserError (common imports this module too: names are looked up at call time)
import demo  # the offline demo world; it imports nothing of ours


# `samples` is anything indexable giving a PIL image or an image path.

EUROSAT_CLASSNAMES = [  # CLIP-style names used by FPL/CAP, in torchvision folder order
    "annual crop land", "forest", "brushland or shrubland", "highway or road",
    "industrial buildings or commercial buildings", "pasture land", "permanent crop land",
    "residential buildings or homes or apartments", "river", "lake or sea"]
RESISC45_CLASSNAMES = [
    "airplane", "airport", "baseball diamond", "basketball court", "beach", "bridge", "chaparral",
    "church", "circular farmland", "cloud", "commercial area", "dense residential", "desert", "forest",
    "freeway", "golf course", "ground track field", "harbor", "industrial area", "intersection",
    "island", "lake", "meadow", "medium residential", "mobile home park", "mountain", "overpass",
    "palace", "parking lot", "railway", "railway station", "rectangular farmland", "river",
    "roundabout", "runway", "sea ice", "ship", "snowberg", "sparse residential", "stadium",
    "storage tank", "tennis court", "terrace", "thermal power station", "wetland"]


def seeded_split(n, test_frac, seed):
    """Deterministic train/test index split for datasets that ship without one. -> (train_idx, test_idx)"""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = int(round(n * test_frac))
    return sorted(perm[n_test:]), sorted(perm[:n_test])


def _require(path, what, flag="--data-dir"):
    if not Path(path).exists():
        raise common.UserError(f"{what} not found at {path}; pass {flag} pointing at it (or --download where supported)")


def _torchvision(cls, root, download, **kw):
    """Build a torchvision dataset; 'not found' (or a failed download) becomes a one-line UserError, and what
    a failed download created under `root` is removed again (no empty folder left behind)."""
    root = Path(root)
    before = set(root.iterdir()) if root.is_dir() else None
    try:
        return cls(root=str(root), download=download, **kw)
    except (RuntimeError, FileNotFoundError, OSError, ValueError) as e:
        if download:  # offline or interrupted: undo what the attempt created
            import shutil
            for p in (set(root.iterdir()) - before if before is not None else [root]):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            raise common.UserError(f"could not download {cls.__name__} into {root} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:100] if str(e) else ''}); offline, try --data demo") from None
        raise common.UserError(f"{cls.__name__} not found under {root}; put it there (torchvision's layout), point "
                        f"--data-dir at its parent folder, or add --download; offline, try --data demo") from None


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
    parts, names = _tv_pair(__import__("torchvision").datasets.DTD, root, download, None,
                            [dict(split="train"), dict(split="val")], [dict(split="test")])
    return parts, [n.replace("_", " ") for n in names]


FLOWERS_RENAMES = {"globe-flower": "globe flower", "pink-yellow dahlia?": "pink and yellow dahlia",
                   "ball moss": "air plant"}  # torchvision's three odd names, as CLIP/CoOp/FPL/CAP spell them


def _load_flowers(root, download):
    from torchvision.datasets import Flowers102
    names = [FLOWERS_RENAMES.get(n, n) for n in Flowers102.classes]
    return _tv_pair(Flowers102, root, download, names, [dict(split="train"), dict(split="val")], [dict(split="test")])


def _load_aircraft(root, download):
    from torchvision.datasets import FGVCAircraft
    return _tv_pair(FGVCAircraft, root, download, None, [dict(split="trainval")], [dict(split="test")])


def _folder_samples(root):
    """(paths, labels, classnames) of an ImageFolder-style tree root/<class>/<image>."""
    root = Path(root)
    if not root.is_dir():
        raise common.UserError(f"image folder {root} does not exist; pass --data-dir PATH to a root/<class>/<image> tree")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    ext = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
    paths, labels = [], []
    for c, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in ext)
        paths += [str(p) for p in files]
        labels += [c] * len(files)
    if not paths:
        raise common.UserError(f"image folder {root} holds no images in class sub-folders; expected root/<class>/<image>")
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
    from torchvision.datasets import EuroSAT
    ds = _torchvision(EuroSAT, root, download)
    paths, labels = [p for p, _ in ds.samples], torch.tensor(ds.targets)
    tr, te = seeded_split(len(paths), 0.2, seed=0)  # Co-Reg: random 80/20 (seeded here, unseeded there)
    names = EUROSAT_CLASSNAMES if ds.classes[0] == "AnnualCrop" else ds.classes
    return [([paths[i] for i in tr], labels[tr]), ([paths[i] for i in te], labels[te])], names


def _load_resisc45(root, download):
    base = Path(root) / "NWPU-RESISC45"
    _require(base, "RESISC45 (root/NWPU-RESISC45/<class>/<image>.jpg)")
    parts, _ = _split_folder(base)
    return parts, RESISC45_CLASSNAMES


def _load_cub(root, download):
    base = Path(root) / "CUB_200_2011"
    _require(base / "images.txt", "CUB-200-2011 (root/CUB_200_2011/images.txt, images/, train_test_split.txt)")
    files = [l.split()[1] for l in (base / "images.txt").read_text().splitlines()]
    is_train = [l.split()[1] == "1" for l in (base / "train_test_split.txt").read_text().splitlines()]
    classes = [l.split()[1] for l in (base / "classes.txt").read_text().splitlines()]  # "001.Black_footed_Albatross"
    labels = torch.tensor([int(f.split(".")[0]) - 1 for f in files])
    parts = []
    for keep in (True, False):
        idx = [i for i, t in enumerate(is_train) if t == keep]
        parts.append(([str(base / "images" / files[i]) for i in idx], labels[idx]))
    return parts, [c.split(".", 1)[1].replace("_", " ").lower() for c in classes]


def _load_small_tv(name):
    """Co-Reg's small-image datasets, each with its official train/test split."""
    def load(root, download):
        import torchvision.datasets as D
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
            labels = [ds[i][1] for i in range(len(ds))] if name in ("gtsrb", "fer2013") else \
                (ds.labels if name == "svhn" else ds.targets)
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
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    colours = torch.tensor([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]], dtype=torch.float)
    parts = []
    for n in (64, 32):
        labels = torch.arange(n) % 4
        pix = colours[labels][:, :, None, None] + 40 * torch.randn(n, 3, 32, 32, generator=g)
        pix = pix.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        parts.append(([Image.fromarray(p) for p in pix], labels))
    return parts, ["red", "green", "blue", "yellow"]


DATASETS = {  # name -> loader(root, download) -> ([(train_samples, labels), (test_samples, labels)], classnames)
    "dtd": _load_dtd, "eurosat": _load_eurosat, "flowers102": _load_flowers,
    "fgvc_aircraft": _load_aircraft, "resisc45": _load_resisc45, "cub": _load_cub,
    **{n: _load_small_tv(n) for n in ("cifar10", "cifar100", "svhn", "fashion_mnist", "gtsrb", "fer2013")},
    "folder": lambda root, download: _split_folder(root), "synthetic": _load_synthetic,
    "demo": lambda root, download: demo.load_demo_dataset(),
}


def load_dataset(name, data_dir="data", download=False):
    """-> (train_samples, train_labels [N], test_samples, test_labels [M], classnames)."""
    if name not in DATASETS:
        raise common.UserError(f"unknown dataset '{name}'; choose one of {sorted(DATASETS)}")
    ((train, y_train), (test, y_test)), classnames = DATASETS[name](data_dir, download)
    return train, y_train, test, y_test, list(classnames)
