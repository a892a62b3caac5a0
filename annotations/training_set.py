"""A project's labelled patches as a training set: a zip that ``manage.py simulate`` (and any
class-per-folder loader, such as torchvision's ImageFolder) reads, streamed as it is made.

Layout::

    manifest.csv                       one row per patch (written first: a reader may stop there)
    <class>/<group>/<patch id>.png     the patch at the project's patch size, lossless

``group`` is the slide's group (patient, case), else the slide's name, so a loader that holds out
by the middle folder keeps a patient's patches together. Folder names are the label and group with
path separators and leading dots replaced; the manifest keeps the exact names.

Memory: the database is read in chunks (:data:`CHUNK` patches), each patch is read, encoded and
sent before the next, and what is kept for the whole archive is three small integer arrays of the
chosen patches (so the images match the manifest even if a vote lands mid-export) and the zip's
central directory.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from array import array
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from django.db.models import Q

from .models import Consensus, LabelClass, Patch, Project, Slide, Vote
from .slides import tiles
from .zip_stream import ZipStream

logger = logging.getLogger(__name__)

CHUNK = 1000
# Bytes gathered before a chunk is handed to the server: fewer, larger writes.
SEND_BYTES = 1 << 20
PNG_COMPRESS_LEVEL = 3  # lossless either way; 3 is ~2x faster than the default 6 for ~5% more bytes

MANIFEST_FIELDS = [
    "path",
    "label",
    "group_id",
    "patch_id",
    "slide",
    "x",
    "y",
    "size",
    "status",
    "method",
    "confidence",
    "posterior",
    "vote_count",
    "agreement",
    "votes",
    "provenance",
    "is_gold",
]
# Statuses that carry a label: a pending patch has none yet.
STATUSES = [s for s in Consensus.Status.values if s != Consensus.Status.PENDING]
# What a round trains on (learner.round_stages.FINAL_LABEL_STATUSES): the default export.
FINAL_STATUSES = [Consensus.Status.AGREED, Consensus.Status.EXPERT]


class TrainingSetError(Exception):
    """The export cannot start; the message says why."""


_UNSAFE = re.compile(r"[/\\\x00]")


def folder_name(text: str) -> str:
    """A path component that cannot climb out of, or hide in, the archive's tree."""
    name = _UNSAFE.sub("_", text).lstrip(".").strip() or "_"
    return name[:120]


@dataclass(frozen=True)
class Selection:
    """The patches an export covers, fixed when the manifest is written."""

    patch_ids: np.ndarray
    label_index: np.ndarray
    group_index: np.ndarray
    labels: list[str]
    groups: list[str]

    def __len__(self) -> int:
        return len(self.patch_ids)

    def path(self, row: int) -> str:
        label, group = self.labels[int(self.label_index[row])], self.groups[int(self.group_index[row])]
        return f"{folder_name(label)}/{folder_name(group)}/{int(self.patch_ids[row])}.png"


def _consensus(project: Project, statuses: Sequence[str]) -> Any:
    """Labelled patches on ready slides that have pixels to read."""
    return (
        Consensus.objects.filter(
            project=project, label__isnull=False, status__in=list(statuses), patch__slide__status=Slide.Status.READY
        )
        .exclude(Q(patch__slide__file="") | Q(patch__slide__file__isnull=True))
        .order_by("patch_id")
    )


def check_statuses(statuses: Sequence[str]) -> None:
    unknown = set(statuses) - set(STATUSES)
    if unknown or not statuses:
        raise TrainingSetError(f"Choose consensus statuses among {', '.join(STATUSES)}, comma-separated.")


def count(project: Project, statuses: Sequence[str] = FINAL_STATUSES) -> int:
    return int(_consensus(project, statuses).count())


def _votes(patch_ids: list[int]) -> dict[int, list[dict[str, str]]]:
    by_patch: dict[int, list[dict[str, str]]] = defaultdict(list)
    rows = (
        Vote.objects.filter(patch_id__in=patch_ids, is_active=True)
        .order_by("patch_id", "id")
        .values_list("patch_id", "annotator__username", "label__name", "role", "provenance")
    )
    for pid, annotator, label, role, provenance in rows:
        by_patch[pid].append({"annotator": annotator, "label": label, "role": role, "provenance": provenance})
    return by_patch


def _manifest(project: Project, statuses: Sequence[str]) -> Iterator[tuple[dict[str, Any], int, int]]:
    """Manifest rows with each row's label id and slide id, in patch order, chunk by chunk."""
    fields = (
        "patch_id", "label_id", "label__name", "status", "method", "confidence", "posterior", "vote_count",
        "agreement", "patch__x", "patch__y", "patch__size", "patch__is_gold", "patch__slide_id",
    )  # fmt: skip
    slides = {
        pk: (name, group or name)
        for pk, name, group in Slide.objects.filter(project=project).values_list("pk", "name", "group")
    }
    rows = _consensus(project, statuses).values_list(*fields)
    chunk: list[tuple[Any, ...]] = []
    iterator = rows.iterator(chunk_size=CHUNK)
    while True:
        chunk.clear()
        for row in iterator:
            chunk.append(row)
            if len(chunk) == CHUNK:
                break
        if not chunk:
            return
        votes = _votes([row[0] for row in chunk])
        for pid, label_id, label, status, method, conf, post, n, agree, x, y, size, gold, slide_id in chunk:
            slide, group = slides[slide_id]
            record = {
                "label": label,
                "group_id": group,
                "patch_id": pid,
                "slide": slide,
                "x": x,
                "y": y,
                "size": size,
                "status": status,
                "method": method,
                "confidence": round(conf, 6),
                "posterior": json.dumps(post, sort_keys=True),
                "vote_count": n,
                "agreement": round(agree, 6),
                "votes": json.dumps(votes.get(pid, [])),
                "provenance": ";".join(sorted({v["provenance"] for v in votes.get(pid, [])})),
                "is_gold": gold,
            }
            yield record, label_id, slide_id


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def stream(project: Project, statuses: Sequence[str] = FINAL_STATUSES) -> Iterator[bytes]:
    """The archive's bytes, in chunks of about :data:`SEND_BYTES` (never an empty one)."""
    check_statuses(statuses)
    zs = ZipStream()
    label_rows = list(LabelClass.objects.filter(project=project).order_by("order").values_list("pk", "name"))
    label_pos = {pk: i for i, (pk, _) in enumerate(label_rows)}
    group_pos: dict[int, int] = {}
    groups: list[str] = []
    # array, not list: 8 bytes a patch rather than a list slot plus an int object
    ids, label_index, group_index = array("q"), array("h"), array("i")

    pending = bytearray()

    def ready(data: bytes) -> bytes | None:
        pending.extend(data)
        if len(pending) < SEND_BYTES:
            return None
        chunk = bytes(pending)
        pending.clear()
        return chunk

    with zs.open("manifest.csv") as entry:
        text = io.TextIOWrapper(entry, encoding="utf-8", newline="", write_through=True)
        writer = csv.DictWriter(text, fieldnames=MANIFEST_FIELDS)
        writer.writeheader()
        for record, label_id, slide_id in _manifest(project, statuses):
            if slide_id not in group_pos:
                group_pos[slide_id] = len(groups)
                groups.append(record["group_id"])
            ids.append(record["patch_id"])
            label_index.append(label_pos[label_id])
            group_index.append(group_pos[slide_id])
            record["path"] = (
                f"{folder_name(record['label'])}/{folder_name(record['group_id'])}/{record['patch_id']}.png"
            )
            writer.writerow(record)
            if (chunk := ready(zs.take())) is not None:
                yield chunk
        text.flush()
        text.detach()
    selection = Selection(
        patch_ids=np.frombuffer(ids, dtype=np.int64),
        label_index=np.frombuffer(label_index, dtype=np.int16),
        group_index=np.frombuffer(group_index, dtype=np.int32),
        labels=[name for _, name in label_rows],
        groups=groups,
    )
    for start in range(0, len(selection), CHUNK):
        chunk_ids = [int(pid) for pid in selection.patch_ids[start : start + CHUNK]]
        patches = Patch.objects.select_related("slide", "project").in_bulk(chunk_ids)
        for offset, pid in enumerate(chunk_ids):
            patch = patches.get(pid)
            if patch is None:
                # Deleted (with its slide) since the manifest was written: nothing to read.
                logger.warning("Training-set export of project %s: patch %s vanished", project.pk, pid)
                continue
            data = zs.add(selection.path(start + offset), _png(tiles.read_patch(patch)))
            if (chunk := ready(data)) is not None:
                yield chunk
    pending.extend(zs.close())
    if pending:
        yield bytes(pending)
