"""Dataset loading: the papers' data bundle (read by the CAP release's rules), torchvision's layout, ImageNet's
ImageFolder tree, and the info dict every loader returns. Each test writes a miniature tree into tmp_path; the
expected lists are written out by hand from the release's rules for that tree.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_data.py
"""

import json
from pathlib import Path

import pytest

import common
import data


def write(root, files):
    """files: {relative path: text, or None for an empty (image) file} -> root."""
    for rel, text in files.items():
        path = Path(root) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text if text is not None else "")
    return Path(root)


def rel_split(paths, base):
    return [Path(p).relative_to(base).as_posix() for p in paths]


def load(name, root, **kw):
    train, y_train, test, y_test, names, info = data.load_dataset(name, str(root), **kw)
    return train, y_train.tolist(), test, y_test.tolist(), names, info


# ---- one miniature bundle folder per dataset, in the layout the release reads


def dtd_bundle(root, test_lines="test.zip@banded/banded_0009.jpg 0\ntest.zip@blotchy/blotchy_0010.jpg 1\n"):
    return write(
        root,
        {
            "DTD/class_names.txt": "banded\nblotchy\nbraided\n",
            "DTD/train.txt": "train.zip@banded/banded_0001.jpg 0\ntrain.zip@braided/braided_0003.jpg 2\n",
            "DTD/val.txt": "val.zip@blotchy/blotchy_0002.jpg 1\n",
            "DTD/test.txt": test_lines,
            "DTD/train/banded/banded_0001.jpg": None,
            "DTD/train/braided/braided_0003.jpg": None,
            "DTD/val/blotchy/blotchy_0002.jpg": None,
            "DTD/test/banded/banded_0009.jpg": None,
            "DTD/test/blotchy/blotchy_0010.jpg": None,
            "DTD/val/banded/banded_0009.jpg": None,
        },
    )


def test_dtd_bundle_pools_train_and_val_and_prefixes_each_path_with_its_list_name(tmp_path):
    train, y_train, test, y_test, names, info = load("dtd", dtd_bundle(tmp_path))
    base = tmp_path / "DTD"
    assert rel_split(train, base) == [
        "train/banded/banded_0001.jpg",
        "train/braided/braided_0003.jpg",
        "val/blotchy/blotchy_0002.jpg",
    ]
    assert y_train == [0, 2, 1]
    assert rel_split(test, base) == ["test/banded/banded_0009.jpg", "test/blotchy/blotchy_0010.jpg"]
    assert y_test == [0, 1]
    assert names == ["banded", "blotchy", "braided"]
    assert info["layout"] == "bundle" and (info["n_train"], info["n_test"]) == (3, 2)


def test_flowers102_bundle_reads_paths_with_or_without_a_zip_prefix_and_keeps_the_files_class_order(tmp_path):
    write(
        tmp_path,
        {
            "Flowers102/class_names.txt": "pink primrose\nhard-leaved pocket orchid\ncanterbury bells\n",
            "Flowers102/train.txt": "train.zip@000/image_06736.jpg 0\n002/image_06001.jpg 2\n",
            "Flowers102/val.txt": "val.zip@001/image_05000.jpg 1\n",
            "Flowers102/test.txt": "test.zip@002/image_07000.jpg 2\n",
            "Flowers102/train/000/image_06736.jpg": None,
            "Flowers102/test/002/image_07000.jpg": None,
        },
    )
    train, y_train, test, y_test, names, _ = load("flowers102", tmp_path)
    base = tmp_path / "Flowers102"
    assert rel_split(train, base) == [
        "train/000/image_06736.jpg",
        "train/002/image_06001.jpg",
        "val/001/image_05000.jpg",
    ]
    assert y_train == [0, 2, 1]
    assert rel_split(test, base) == ["test/002/image_07000.jpg"] and y_test == [2]
    assert names == ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"]


def test_fgvc_aircraft_bundle_labels_each_image_by_its_class_folder_in_labels_txt_order(tmp_path):
    write(
        tmp_path,
        {
            "FGVCAircraft/labels.txt": "A380\nAn-12\nATR-42\nBAE 146-200\n",  # the bundle's order, not sorted
            # the last field is not read: the class is the first folder of the path (which may hold a space)
            "FGVCAircraft/train.txt": "train.zip@BAE 146-200/1234567.jpg 3\ntrain.zip@An-12/0000001.jpg 0\n",
            "FGVCAircraft/val.txt": "val.zip@A380/0000002.jpg 0\n",
            "FGVCAircraft/test.txt": "test.zip@ATR-42/0000003.jpg 1\n",
            "FGVCAircraft/train/BAE 146-200/1234567.jpg": None,
            "FGVCAircraft/test/ATR-42/0000003.jpg": None,
        },
    )
    train, y_train, test, y_test, names, _ = load("fgvc_aircraft", tmp_path)
    base = tmp_path / "FGVCAircraft"
    assert rel_split(train, base) == [
        "train/BAE 146-200/1234567.jpg",
        "train/An-12/0000001.jpg",
        "val/A380/0000002.jpg",
    ]
    assert y_train == [3, 1, 0]
    assert rel_split(test, base) == ["test/ATR-42/0000003.jpg"] and y_test == [2]
    assert names == ["A380", "An-12", "ATR-42", "BAE 146-200"]


def resisc45_bundle(root):
    cats = [{"id": 0, "name": "sea_ice"}, {"id": 1, "name": "airplane"}, {"id": 2, "name": "baseball_diamond"}]

    def split(*files):
        return json.dumps(
            {
                "images": [{"id": i, "file_name": f} for i, f in enumerate(files)],  # noqa
                "annotations": [],
                "categories": cats,
            }
        )

    return write(
        root,
        {
            "RESICS45/train.json": split(
                "train.zip@baseball_diamond/baseball_diamond_001.jpg", "train.zip@airplane/airplane_010.jpg"
            ),
            "RESICS45/val.json": split("val.zip@sea_ice/sea_ice_005.jpg"),
            "RESICS45/test.json": split("test.zip@airplane/airplane_100.jpg", "sea_ice/sea_ice_200.jpg"),
            "RESICS45/baseball_diamond/baseball_diamond_001.jpg": None,
            "RESICS45/airplane/airplane_100.jpg": None,
        },
    )


def test_resisc45_bundle_names_classes_from_categories_and_finds_images_in_class_folders(tmp_path):
    train, y_train, test, y_test, names, _ = load("resisc45", resisc45_bundle(tmp_path))
    base = tmp_path / "RESICS45"
    assert names == ["sea ice", "airplane", "baseball diamond"]
    assert rel_split(train, base) == [
        "baseball_diamond/baseball_diamond_001.jpg",
        "airplane/airplane_010.jpg",
        "sea_ice/sea_ice_005.jpg",
    ]
    assert y_train == [2, 1, 0]
    assert rel_split(test, base) == ["airplane/airplane_100.jpg", "sea_ice/sea_ice_200.jpg"] and y_test == [1, 0]


CUB_FILES = {
    "CUB_200_2011/classes.txt": "1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n3 003.Sooty_Albatross\n",
    "CUB_200_2011/images.txt": "1 001.Black_footed_Albatross/Black_Footed_Albatross_0001_796111.jpg\n"
    "2 002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg\n"
    "3 003.Sooty_Albatross/Sooty_Albatross_0003_1078.jpg\n"
    "4 001.Black_footed_Albatross/Black_Footed_Albatross_0002_55.jpg\n",
    "CUB_200_2011/train_test_split.txt": "1 1\n2 0\n3 1\n4 0\n",
    "CUB_200_2011/images/001.Black_footed_Albatross/Black_Footed_Albatross_0001_796111.jpg": None,
    "CUB_200_2011/images/002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg": None,
}


def test_cub_bundle_splits_by_train_test_split_txt_and_cleans_class_names(tmp_path):
    write(tmp_path / "CUB", CUB_FILES)
    train, y_train, test, y_test, names, info = load("cub", tmp_path)
    base = tmp_path / "CUB"
    assert rel_split(train, base) == [
        "CUB_200_2011/images/001.Black_footed_Albatross/Black_Footed_Albatross_0001_796111.jpg",
        "CUB_200_2011/images/003.Sooty_Albatross/Sooty_Albatross_0003_1078.jpg",
    ]
    assert y_train == [0, 2]
    assert rel_split(test, base) == [
        "CUB_200_2011/images/002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg",
        "CUB_200_2011/images/001.Black_footed_Albatross/Black_Footed_Albatross_0002_55.jpg",
    ]
    assert y_test == [1, 0]
    assert names == ["black footed albatross", "laysan albatross", "sooty albatross"]
    assert info["layout"] == "bundle"


def test_cub_official_layout_gives_the_same_split_and_hashes_as_the_bundle(tmp_path):
    bundle = load("cub", write(tmp_path / "a" / "CUB", CUB_FILES).parent)
    official = load("cub", write(tmp_path / "b", CUB_FILES))
    assert official[5]["layout"] == "official"
    assert official[1] == bundle[1] and official[3] == bundle[3] and official[4] == bundle[4]
    assert [official[5][k] for k in ("train_hash", "test_hash")] == [bundle[5][k] for k in ("train_hash", "test_hash")]


# ---- EuroSAT: the test images also sit in the class folders the pool is listed from


def eurosat_bundle(root):
    return write(
        root,
        {
            "EuroSAT/class_names.txt": "annual crop land\nforest\nlake or sea\n",
            "EuroSAT/test.txt": "test.zip@AnnualCrop/AnnualCrop_2.jpg 0\ntest.zip@SeaLake_1.jpg 2\n",
            "EuroSAT/AnnualCrop/AnnualCrop_1.jpg": None,
            "EuroSAT/AnnualCrop/AnnualCrop_2.jpg": None,
            "EuroSAT/Forest/Forest_1.jpg": None,
            "EuroSAT/Forest/Forest_2.jpg": None,
            "EuroSAT/SeaLake/SeaLake_1.jpg": None,
        },
    )


def test_eurosat_bundle_drops_the_test_images_from_the_pool_and_says_how_many(tmp_path, capsys):
    train, y_train, test, y_test, names, info = load("eurosat", eurosat_bundle(tmp_path))
    base = tmp_path / "EuroSAT"
    assert rel_split(train, base) == ["AnnualCrop/AnnualCrop_1.jpg", "Forest/Forest_1.jpg", "Forest/Forest_2.jpg"]
    assert y_train == [0, 1, 1]
    assert rel_split(test, base) == ["AnnualCrop/AnnualCrop_2.jpg", "SeaLake/SeaLake_1.jpg"] and y_test == [0, 2]
    assert names == ["annual crop land", "forest", "lake or sea"]
    assert info["n_test_dropped_from_pool"] == 2 and info["n_test_in_pool"] == 0 and info["n_train"] == 3
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "dropped 2 test images" in out[0] and "--as-released" in out[0]


def test_eurosat_bundle_as_released_keeps_the_test_images_in_the_pool(tmp_path, capsys):
    train, y_train, test, y_test, _, info = load("eurosat", eurosat_bundle(tmp_path), as_released=True)
    assert rel_split(train, tmp_path / "EuroSAT") == [
        "AnnualCrop/AnnualCrop_1.jpg",
        "AnnualCrop/AnnualCrop_2.jpg",
        "Forest/Forest_1.jpg",
        "Forest/Forest_2.jpg",
        "SeaLake/SeaLake_1.jpg",
    ]
    assert y_train == [0, 0, 1, 1, 2] and y_test == [0, 2]
    assert info["n_test_dropped_from_pool"] == 0 and info["n_test_in_pool"] == 2
    assert "dropped" not in capsys.readouterr().out


def test_eurosat_bundle_with_an_unknown_class_name_is_one_error_naming_the_file(tmp_path):
    eurosat_bundle(tmp_path)
    (tmp_path / "EuroSAT" / "class_names.txt").write_text("annual crop land\nmoon\n")
    with pytest.raises(common.UserError, match=r"class_names\.txt.*'moon'"):
        data.load_dataset("eurosat", str(tmp_path))


# ---- malformed bundle files


@pytest.mark.parametrize(
    "line",
    ["test.zip@banded/banded_0009.jpg", "test.zip@banded/banded_0009.jpg zero", "test.zip@banded/banded_0009.jpg 3"],
)
def test_a_malformed_list_line_is_one_error_naming_the_file_and_the_line(tmp_path, line):
    dtd_bundle(tmp_path, test_lines=f"test.zip@banded/banded_0009.jpg 0\n\n{line}\n")
    with pytest.raises(common.UserError) as e:
        data.load_dataset("dtd", str(tmp_path))
    assert str(tmp_path / "DTD" / "test.txt") in str(e.value) and "line 3" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_resisc45_entry_without_a_class_folder_is_one_error_naming_the_file_and_the_entry(tmp_path):
    resisc45_bundle(tmp_path)
    meta = json.loads((tmp_path / "RESICS45" / "val.json").read_text())
    meta["images"].append({"id": 9, "file_name": "val.zip@loose.jpg"})
    (tmp_path / "RESICS45" / "val.json").write_text(json.dumps(meta))
    with pytest.raises(common.UserError, match=r"val\.json, images\[1\]"):
        data.load_dataset("resisc45", str(tmp_path))


def test_a_bundle_list_whose_images_are_missing_names_the_first_missing_file(tmp_path):
    dtd_bundle(tmp_path)
    (tmp_path / "DTD" / "train" / "banded" / "banded_0001.jpg").unlink()
    with pytest.raises(common.UserError, match="banded_0001.jpg"):
        data.load_dataset("dtd", str(tmp_path))


# ---- the info dict


def test_info_hashes_agree_for_the_same_tree_and_differ_for_a_different_split(tmp_path):
    first = load("dtd", dtd_bundle(tmp_path / "a"))[5]
    again = load("dtd", dtd_bundle(tmp_path / "b"))[5]  # same tree elsewhere: the hashes use relative paths
    other = load("dtd", dtd_bundle(tmp_path / "c", test_lines="test.zip@banded/banded_0009.jpg 0\n"))[5]
    assert set(first) == {"layout", "n_train", "n_test", "train_hash", "test_hash"}
    assert all(len(first[k]) == 12 and int(first[k], 16) >= 0 for k in ("train_hash", "test_hash"))
    assert first == again
    assert other["test_hash"] != first["test_hash"] and other["train_hash"] == first["train_hash"]
    assert other["n_test"] == 1


@pytest.mark.parametrize("name,layout", [("synthetic", "generated"), ("demo", "generated")])
def test_generated_datasets_give_info_with_a_stable_hash(name, layout):
    info = data.load_dataset(name)[5]
    assert info["layout"] == layout and info["n_train"] > 0 and info["n_test"] > 0
    assert data.load_dataset(name)[5] == info


def test_folder_dataset_gives_info_with_its_layout_and_counts(tmp_path):
    write(tmp_path, {f"{c}/{i}.png": None for c in ("cat", "dog") for i in range(5)})
    info = data.load_dataset("folder", str(tmp_path))[5]
    assert (info["layout"], info["n_train"], info["n_test"]) == ("folder", 8, 2)


# ---- torchvision's layout is still read when no bundle folder is there


def test_without_a_bundle_folder_the_missing_data_error_names_torchvisions_layout(tmp_path):
    (tmp_path / "DTD").mkdir()  # a folder without class_names.txt is not the bundle's
    with pytest.raises(common.UserError, match="torchvision"):
        data.load_dataset("dtd", str(tmp_path))


def test_torchvision_dtd_layout_is_detected_and_read(tmp_path):
    write(
        tmp_path,
        {
            "dtd/dtd/labels/train1.txt": "banded/banded_0001.jpg\nzig_zagged/zig_zagged_0001.jpg\n",
            "dtd/dtd/labels/val1.txt": "banded/banded_0002.jpg\n",
            "dtd/dtd/labels/test1.txt": "banded/banded_0003.jpg\nzig_zagged/zig_zagged_0002.jpg\n",
            "dtd/dtd/images/banded/banded_0001.jpg": None,
        },
    )
    train, y_train, test, y_test, names, info = load("dtd", tmp_path)
    assert rel_split(train, tmp_path / "dtd/dtd/images") == [
        "banded/banded_0001.jpg",
        "zig_zagged/zig_zagged_0001.jpg",
        "banded/banded_0002.jpg",
    ]
    assert y_train == [0, 1, 0] and y_test == [0, 1] and names == ["banded", "zig zagged"]
    assert info["layout"] == "torchvision" and (info["n_train"], info["n_test"]) == (3, 2)


# ---- ImageNet

IMAGENET_TREE = {
    f"{split}/{wnid}/{i}.JPEG": None
    for split in ("train", "val")
    for wnid in ("n15075141", "n01440764", "n01443537")
    for i in range(2)
}


@pytest.mark.parametrize("under", ["imagenet", "."])
def test_imagenet_folder_maps_wnids_to_open_clips_class_names(tmp_path, under):
    write(tmp_path / under, IMAGENET_TREE)
    train, y_train, test, y_test, names, info = load("imagenet", tmp_path)
    assert names == ["tench", "goldfish", "toilet paper"]  # n01440764, n01443537, n15075141
    assert rel_split(train, tmp_path / under)[:2] == ["train/n01440764/0.JPEG", "train/n01440764/1.JPEG"]
    assert y_train == [0, 0, 1, 1, 2, 2] and y_test == [0, 0, 1, 1, 2, 2]
    assert info["layout"] == "folder" and (info["n_train"], info["n_test"]) == (6, 6)


def test_imagenet_folder_that_is_not_a_wnid_is_one_error(tmp_path):
    write(tmp_path / "imagenet", {**IMAGENET_TREE, "train/cats/0.JPEG": None, "val/cats/0.JPEG": None})
    with pytest.raises(common.UserError, match="cats"):
        data.load_dataset("imagenet", str(tmp_path))


def test_missing_imagenet_names_both_accepted_places(tmp_path):
    with pytest.raises(common.UserError, match="imagenet.*train/.*val/"):
        data.load_dataset("imagenet", str(tmp_path))
