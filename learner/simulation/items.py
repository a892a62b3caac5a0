"""Reading a labelled image set: a class-per-folder tree, a CSV manifest (path, label and group columns) or a
zip of either (such as a project's training-set export) into Items, checked before anything is ingested.
No Django."""

from __future__ import annotations

import csv
import logging
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import SimulationError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"})
# Hotkeys 1-9 on the annotator page.
MAX_CLASSES = 9


@dataclass(frozen=True)
class Item:
    path: Path
    label: str
    group: str


def read_items(
    source: Path,
    *,
    path_column: str = "path",
    label_column: str = "label",
    group_column: str = "group_id",
    extract_to: Path | None = None,
) -> list[Item]:
    """Items from a CSV manifest (paths relative to it), a class-per-folder tree, or a zip of either.

    In a folder tree ``CLASS/GROUP/image`` the middle folder is the group (patient, slide, case);
    with images directly under ``CLASS/`` each image is its own group. A zip is unpacked into
    ``extract_to`` (ingest needs files); a ``manifest.csv`` at its top level is read as the
    manifest (the training-set export's, whose label column keeps names a folder cannot hold).
    """
    if source.is_file() and zipfile.is_zipfile(source):
        if extract_to is None:
            raise SimulationError("A zip source needs a folder to unpack into.")
        root = unpack(source, extract_to)
        manifest = root / "manifest.csv"
        if manifest.is_file():
            return _items_from_manifest(manifest, path_column, label_column, group_column)
        return _items_from_folders(root)
    if source.is_file():
        return _items_from_manifest(source, path_column, label_column, group_column)
    if source.is_dir():
        return _items_from_folders(source)
    raise SimulationError(f"{source} is neither a folder of class folders nor a CSV manifest.")


def unpack(archive: Path, folder: Path) -> Path:
    """Unpack ``archive`` into ``folder``, refusing names that would land outside it and links."""
    folder.mkdir(parents=True, exist_ok=True)
    root = folder.resolve()
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            target = (root / info.filename).resolve()
            is_link = stat.S_ISLNK(info.external_attr >> 16)
            if is_link or not target.is_relative_to(root) or "\\" in info.filename:
                raise SimulationError(f"{archive.name} holds {info.filename!r}, which would unpack outside {folder}.")
        zf.extractall(root)
    return root


def _items_from_manifest(manifest: Path, path_column: str, label_column: str, group_column: str) -> list[Item]:
    with manifest.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {path_column, label_column} - set(reader.fieldnames or [])
        if missing:
            raise SimulationError(
                f"{manifest.name} has no {', '.join(sorted(missing))} column; "
                f"name them with --path-column / --label-column."
            )
        has_group = group_column in (reader.fieldnames or [])
        rows = list(reader)
    items = []
    for row in rows:
        path = Path(row[path_column])
        path = path if path.is_absolute() else manifest.parent / path
        group = row[group_column] if has_group and row[group_column] else f"image:{row[path_column]}"
        items.append(Item(path=path, label=row[label_column], group=group))
    if not has_group:
        logger.warning("%s has no %r column: each image is its own group.", manifest.name, group_column)
    return _checked(items, manifest)


def _items_from_folders(root: Path) -> list[Item]:
    items = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(class_dir.rglob("*")):
            if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
                continue
            relative = path.relative_to(class_dir)
            group = f"{class_dir.name}/{relative.parts[0]}" if len(relative.parts) > 1 else f"image:{path.name}"
            items.append(Item(path=path, label=class_dir.name, group=group))
    return _checked(items, root)


def _checked(items: list[Item], source: Path) -> list[Item]:
    labels = sorted({i.label for i in items})
    if len(labels) < 2:
        raise SimulationError(f"{source} has {len(labels)} class(es); a simulation needs at least two.")
    if len(labels) > MAX_CLASSES:
        raise SimulationError(
            f"{source} has {len(labels)} classes; the platform supports at most {MAX_CLASSES} (hotkeys 1-9)."
        )
    missing = [i.path for i in items if not i.path.is_file()]
    if missing:
        raise SimulationError(f"{len(missing)} listed images do not exist, e.g. {missing[0]}.")
    return items
