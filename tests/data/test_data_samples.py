from __future__ import annotations

import pytest

from cvft.data.samples import (
    Sample,
    find_split_roots,
    is_ignored_file,
    read_label_csv,
    scan_class_folders,
    scan_split_folders,
    scan_unlabelled,
)
from cvft.errors import DatasetError

# --- class folders ----------------------------------------------------------------------------------------------


def test_scan_class_folders(make_class_folders, save_image):
    root = make_class_folders({"dog": 2, "cat": 3, "Bird": 1})
    save_image(root / "cat" / "nested" / "deep.jpg")
    (root / "cat" / ".DS_Store").write_bytes(b"\0")
    (root / "cat" / "README.md").write_text("about cats")
    (root / "dog" / "Thumbs.db").write_bytes(b"\0")
    save_image(root / ".ipynb_checkpoints" / "x.png")
    save_image(root / "dog" / ".hidden" / "y.png")
    (root / "labels.csv").write_text("not used")

    samples, names = scan_class_folders(root)

    assert names == ["Bird", "cat", "dog"]
    assert [s.target for s in samples] == [0, 1, 1, 1, 1, 2, 2]
    assert all(isinstance(s, Sample) for s in samples)
    assert root / "cat" / "nested" / "deep.jpg" in [s.path for s in samples]
    assert not any(part.startswith(".") for s in samples for part in s.path.relative_to(root).parts)


def test_scan_with_given_class_names(make_class_folders):
    root = make_class_folders({"cat": 1})
    samples, names = scan_class_folders(root, class_names=["ant", "cat"])
    assert names == ["ant", "cat"] and samples[0].target == 1
    with pytest.raises(DatasetError, match="cat"):
        scan_class_folders(root, class_names=["dog"])


def test_non_image_in_class_folder(make_class_folders):
    root = make_class_folders({"cat": 2, "dog": 2})
    (root / "dog" / "notes.docx").write_text("x")
    with pytest.raises(DatasetError, match="notes.docx") as info:
        scan_class_folders(root)
    assert "delete it" in str(info.value)


def test_empty_class_folder(make_class_folders):
    root = make_class_folders({"cat": 2})
    (root / "dog").mkdir()
    (root / "dog" / ".DS_Store").write_bytes(b"")
    with pytest.raises(DatasetError, match="dog") as info:
        scan_class_folders(root)
    assert "remove the folder" in str(info.value)


def test_empty_root(tmp_path):
    with pytest.raises(DatasetError, match="no class folders"):
        scan_class_folders(tmp_path)


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_class_folders(tmp_path / "nope")


def test_images_directly_in_root(tmp_path, save_image):
    save_image(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="sub-folder per class"):
        scan_class_folders(tmp_path)
    save_image(tmp_path / "cat" / "b.png")
    with pytest.raises(DatasetError, match="a.png"):
        scan_class_folders(tmp_path)


def test_is_ignored_file():
    assert is_ignored_file(".DS_Store") and is_ignored_file("README") and is_ignored_file("LICENSE.txt")
    assert not is_ignored_file("data.bin")


# --- CSV --------------------------------------------------------------------------------------------------------


def _csv(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_read_label_csv_single_label(tmp_path, save_image):
    for name in ("a.png", "sub/b.png", "c.png"):
        save_image(tmp_path / name)
    path = _csv(tmp_path / "labels.csv", "path,label,extra\na.png,dog,1\nsub/b.png,cat,2\n\nc.png, dog ,3\n")
    samples, names = read_label_csv(path)
    assert names == ["cat", "dog"]
    assert samples == [
        Sample(tmp_path / "a.png", 1),
        Sample(tmp_path / "sub" / "b.png", 0),
        Sample(tmp_path / "c.png", 1),
    ]


def test_read_label_csv_root_bom_and_numeric_labels(tmp_path, save_image):
    save_image(tmp_path / "images" / "a.png")
    save_image(tmp_path / "images" / "b.png")
    absolute = save_image(tmp_path / "elsewhere" / "c.png")
    path = _csv(tmp_path / "meta" / "labels.csv", f"\ufeffPath,Label\na.png,10\nb.png,2\n{absolute},2\n")
    samples, names = read_label_csv(path, root=tmp_path / "images")
    assert names == ["2", "10"]
    assert [s.target for s in samples] == [1, 0, 0]
    assert samples[2].path == absolute


def test_read_label_csv_multi_label(tmp_path, save_image):
    save_image(tmp_path / "a.png")
    save_image(tmp_path / "b.png")
    path = _csv(tmp_path / "labels.csv", "path,label\na.png,street|car | person|car\nb.png,car\n")
    samples, names = read_label_csv(path, multi_label=True)
    assert names == ["car", "person", "street"]
    assert samples[0].target == (0, 1, 2)
    assert samples[1].target == (0,)


def test_read_label_csv_with_class_names(tmp_path, save_image):
    save_image(tmp_path / "a.png")
    path = _csv(tmp_path / "val.csv", "path,label\na.png,cat\n")
    samples, names = read_label_csv(path, class_names=["ant", "cat", "dog"])
    assert names == ["ant", "cat", "dog"] and samples[0].target == 1
    with pytest.raises(DatasetError, match="line 2") as info:
        read_label_csv(path, class_names=["dog"])
    assert "'cat'" in str(info.value)


def test_missing_csv(tmp_path):
    with pytest.raises(DatasetError, match="nothere.csv"):
        read_label_csv(tmp_path / "nothere.csv")


def test_csv_row_with_missing_image(tmp_path, save_image):
    save_image(tmp_path / "a.png")
    path = _csv(tmp_path / "labels.csv", "path,label\na.png,cat\nghost.png,dog\nghost2.png,dog\n")
    with pytest.raises(DatasetError) as info:
        read_label_csv(path)
    message = str(info.value)
    assert "line 3" in message and "ghost.png" in message
    assert "line 4" in message and "ghost2.png" in message
    assert "2 image(s)" in message


@pytest.mark.parametrize("multi_label", [False, True])
def test_csv_empty_label(tmp_path, save_image, multi_label):
    save_image(tmp_path / "a.png")
    path = _csv(tmp_path / "labels.csv", "path,label\na.png,cat\na.png,\n")
    with pytest.raises(DatasetError, match="line 3.*empty label"):
        read_label_csv(path, multi_label=multi_label)


def test_csv_several_labels_without_multi_label(tmp_path, save_image):
    save_image(tmp_path / "a.png")
    path = _csv(tmp_path / "labels.csv", "path,label\na.png,cat|dog\n")
    with pytest.raises(DatasetError, match="multi_label=True"):
        read_label_csv(path)


@pytest.mark.parametrize("text", ["file,class\na.png,cat\n", "", "path,label\n"])
def test_csv_bad_header_or_no_rows(tmp_path, text):
    with pytest.raises(DatasetError, match="labels.csv"):
        read_label_csv(_csv(tmp_path / "labels.csv", text))


# --- unlabelled -------------------------------------------------------------------------------------------------


def test_scan_unlabelled(tmp_path, save_image):
    save_image(tmp_path / "b.png")
    save_image(tmp_path / "a" / "z.jpg")
    save_image(tmp_path / ".hidden.png")
    (tmp_path / "notes.txt").write_text("x")
    files = scan_unlabelled(tmp_path)
    assert files == [tmp_path / "a" / "z.jpg", tmp_path / "b.png"]
    assert scan_unlabelled(tmp_path / "b.png") == [tmp_path / "b.png"]


def test_scan_unlabelled_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_unlabelled(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="holds no images"):
        scan_unlabelled(tmp_path)
    with pytest.raises(DatasetError, match="not an image"):
        scan_unlabelled(tmp_path / "notes.txt")


# --- train / val / test layout ----------------------------------------------------------------------------------


def test_split_layout(tmp_path, make_class_folders):
    make_class_folders({"cat": 3, "dog": 2, "emu": 2}, root=tmp_path / "train")
    make_class_folders({"cat": 1, "dog": 1}, root=tmp_path / "valid")
    make_class_folders({"dog": 1}, root=tmp_path / "test")
    roots = find_split_roots(tmp_path)
    assert roots.train.name == "train" and roots.val.name == "valid" and roots.test.name == "test"

    splits, names = scan_split_folders(tmp_path)

    assert names == ["cat", "dog", "emu"]
    assert [s.target for s in splits["val"]] == [0, 1]
    assert [s.target for s in splits["test"]] == [1]
    assert len(splits["train"]) == 7


def test_no_split_layout(make_class_folders):
    assert find_split_roots(make_class_folders({"cat": 1})) is None


def test_val_class_missing_from_train(tmp_path, make_class_folders):
    make_class_folders({"cat": 2, "dog": 2}, root=tmp_path / "train")
    make_class_folders({"cat": 1, "zebra": 1}, root=tmp_path / "val")
    with pytest.raises(DatasetError, match="zebra") as info:
        scan_split_folders(tmp_path)
    assert "val split" in str(info.value)


def test_two_validation_folders(tmp_path, make_class_folders):
    make_class_folders({"cat": 1}, root=tmp_path / "train")
    make_class_folders({"cat": 1}, root=tmp_path / "val")
    make_class_folders({"cat": 1}, root=tmp_path / "validation")
    with pytest.raises(DatasetError, match="several val folders"):
        find_split_roots(tmp_path)
