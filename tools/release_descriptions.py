"""Write the CAP release's class descriptions as our --descriptions files, one JSON per dataset.

The release hard-codes one description for each of a few classes per dataset (in its
data/text_augmentations.py); those classes, not the ones detection finds, are the described ones in its
runs. `cap.py --as-released --descriptions descriptions/<data>.json` uses them the same way.

    git clone https://github.com/Noahwangyuchen/CAP /tmp/CAP
    python tools/release_descriptions.py /tmp/CAP            # -> descriptions/<data>.json
    bash run.sh cap                                          # picks them up

The file is read with ast (no code from it is run).
"""

import ast
import json
import sys
from pathlib import Path

OUR_NAMES = {
    "EuroSAT": "eurosat",
    "RESICS45": "resisc45",
    "DTD": "dtd",
    "Flowers102": "flowers102",
    "CUB": "cub",
    "FGVCAircraft": "fgvc_aircraft",
}  # the release's dataset names -> our --data names


def read_text_augs(path):
    """The `text_augs = {dataset: {classname: sentence}}` literal of the release's text_augmentations.py."""
    for node in ast.parse(Path(path).read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "text_augs" for t in node.targets):
            return ast.literal_eval(node.value)
    raise SystemExit(f"{path}: no `text_augs = {{...}}` found")


def main(argv=None):
    argv = argv if argv is not None else sys.argv[1:]
    if not argv:
        raise SystemExit(__doc__)
    src = Path(argv[0]) / "data" / "text_augmentations.py"
    out = Path(argv[1] if len(argv) > 1 else "descriptions")
    out.mkdir(parents=True, exist_ok=True)
    for dataset, described in read_text_augs(src).items():
        if dataset in OUR_NAMES:  # class names are lower-case with spaces, as ours
            path = out / f"{OUR_NAMES[dataset]}.json"
            path.write_text(json.dumps({c.lower(): [d] for c, d in described.items()}, indent=1) + "\n")
            print(f"{path}: {len(described)} described classes")


if __name__ == "__main__":
    main()
