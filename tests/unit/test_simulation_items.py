"""Reading a labelled image set for the simulation: folder trees, CSV manifests, and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from learner.simulation.errors import SimulationError
from learner.simulation.items import Item, read_items


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not read here")
    return path


def test_a_folder_tree_gives_the_class_and_the_group_folder(tmp_path: Path) -> None:
    a = touch(tmp_path / "benign" / "patient1" / "a.png")
    b = touch(tmp_path / "benign" / "patient1" / "deeper" / "b.JPG")
    c = touch(tmp_path / "tumour" / "c.tif")
    touch(tmp_path / "tumour" / "notes.txt")  # not an image

    items = read_items(tmp_path)

    assert items == [
        Item(path=a, label="benign", group="benign/patient1"),
        Item(path=b, label="benign", group="benign/patient1"),
        Item(path=c, label="tumour", group="image:c.tif"),  # directly under its class: its own group
    ]


def test_a_manifest_resolves_paths_beside_it_and_reads_the_named_columns(tmp_path: Path) -> None:
    a = touch(tmp_path / "img" / "a.png")
    b = touch(tmp_path / "img" / "b.png")
    manifest = tmp_path / "set.csv"
    manifest.write_text(f"file,diagnosis,patient\nimg/a.png,benign,p1\n{b},tumour,\n")

    items = read_items(manifest, path_column="file", label_column="diagnosis", group_column="patient")

    assert items == [Item(path=a, label="benign", group="p1"), Item(path=b, label="tumour", group=f"image:{b}")]


def test_without_a_group_column_each_image_is_its_own_group(tmp_path: Path) -> None:
    touch(tmp_path / "a.png")
    touch(tmp_path / "b.png")
    manifest = tmp_path / "set.csv"
    manifest.write_text("path,label\na.png,x\nb.png,y\n")

    assert [i.group for i in read_items(manifest)] == ["image:a.png", "image:b.png"]


def test_a_manifest_without_the_label_column_says_which_option_names_it(tmp_path: Path) -> None:
    manifest = tmp_path / "set.csv"
    manifest.write_text("path,diagnosis\na.png,x\n")

    with pytest.raises(SimulationError, match="no label column; name them with --path-column / --label-column"):
        read_items(manifest)


def test_it_refuses_a_single_class_too_many_classes_and_missing_images(tmp_path: Path) -> None:
    touch(tmp_path / "one" / "only" / "a.png")
    with pytest.raises(SimulationError, match="1 class"):
        read_items(tmp_path / "one")

    for k in range(10):
        touch(tmp_path / "ten" / f"class{k}" / "a.png")
    with pytest.raises(SimulationError, match="10 classes; the platform supports at most 9"):
        read_items(tmp_path / "ten")

    manifest = tmp_path / "set.csv"
    manifest.write_text("path,label\nmissing.png,x\none/only/a.png,y\n")
    with pytest.raises(SimulationError, match="1 listed images do not exist"):
        read_items(manifest)

    with pytest.raises(SimulationError, match="neither a folder of class folders nor a CSV manifest"):
        read_items(tmp_path / "nowhere")
