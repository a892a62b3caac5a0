"""Adding slides to a project and processing them into a patch grid: this module owns the name and
format checks, the streaming upload, the file inspection, the slide row's creation and the ingest
task's body.

Three ways in, one path through: the REST upload, the browser upload page and
``manage.py import_slides`` all stream the file into an :class:`IncomingFile` (a temporary file
under ``MEDIA_ROOT/incoming/``, counted against ``settings.MAX_UPLOAD_BYTES`` and hashed as it
arrives) and hand it to :func:`add_slide`, which refuses bad input with a :class:`SlideRejected`
sentence before any row exists, or stores the file at ``slides/<project>/<slide>-<token>/<name>``,
creates the ``processing`` row and queues the ``annotations.tasks.ingest_slide`` task
(:mod:`annotations.slides.tasks`) after commit.

:func:`ingest` (the task's body) reads metadata, makes the thumbnail, detects tissue and writes
the patch grid. It is idempotent: a re-run replaces the thumbnail and brings the patch rows to the
current grid (unchanged patches keep their ids, votes and tasks). A slide that cannot be processed
ends ``failed`` with a reason, and its file, thumbnail and patches are removed.

Where the files live and when they are deleted: :mod:`annotations.slides.media`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.core.exceptions import SuspiciousFileOperation
from django.db import IntegrityError, transaction
from django.dispatch import Signal
from django.utils.text import get_valid_filename

from annotations import queue
from annotations.domain import tissue
from annotations.models import Patch, Project, Slide
from histoloop.units import human_bytes

from . import media, tiles

logger = logging.getLogger(__name__)

SUPPORTED_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ptif", ".qptiff", ".ndpi", ".scn", ".bif", ".dcm", ".png", ".jpg", ".jpeg",
)  # fmt: skip
TIFF_EXTENSIONS = frozenset({".svs", ".tif", ".tiff", ".ptif", ".qptiff", ".ndpi", ".scn", ".bif"})
CHUNK_BYTES = 1024 * 1024
INCOMING_DIR = "incoming"
MIN_TISSUE_FRACTION = tissue.DEFAULT_MIN_FRACTION

# Sent (with ``slide_id``) once an ingest has made a slide ready and committed its patch grid. The learner
# listens (learner.apps) and queues the slide's embedding in the background; slides know nothing of it.
slide_ready = Signal()


class SlideRejected(Exception):
    """Bad input, refused before anything is kept. ``str(exc)`` is a sentence for the user."""

    def __init__(self, message: str, *, code: str = "invalid", status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status


def supported_formats() -> str:
    return ", ".join(SUPPORTED_EXTENSIONS)


def too_large(limit: int | None = None) -> SlideRejected:
    limit = settings.MAX_UPLOAD_BYTES if limit is None else limit
    return SlideRejected(
        f"The file is larger than the {human_bytes(limit)} limit for slides; nothing was kept.",
        code="too_large",
        status=413,
    )


def clean_filename(filename: str) -> str:
    """A safe base name with a supported extension, or SlideRejected."""
    base = Path(str(filename).replace("\\", "/")).name
    try:
        name = get_valid_filename(base)
    except SuspiciousFileOperation as exc:
        raise SlideRejected(f"'{base}' is not a usable file name.") from exc
    extension = Path(name).suffix.lower()
    if extension not in SUPPORTED_EXTENSIONS:
        shown = extension or "no extension"
        raise SlideRejected(
            f"'{base}' is not a supported slide format ({shown}); use one of {supported_formats()}.",
            code="unsupported",
        )
    return name[:200]


class IncomingFile:
    """A file arriving in chunks: written under MEDIA_ROOT/incoming/, counted and hashed.

    Deleted on exit from its ``with`` block (or :meth:`discard`) unless :meth:`keep_as` moved it.
    """

    def __init__(self, filename: str, *, limit: int | None = None) -> None:
        self.name = clean_filename(filename)
        self.limit = settings.MAX_UPLOAD_BYTES if limit is None else limit
        directory = Path(settings.MEDIA_ROOT) / INCOMING_DIR
        directory.mkdir(parents=True, exist_ok=True)
        handle, path = tempfile.mkstemp(dir=directory, prefix="upload-", suffix=Path(self.name).suffix.lower())
        self.path = Path(path)
        self._file: Any = os.fdopen(handle, "wb")
        self._hash = hashlib.sha256()
        self.size = 0
        self.kept = False

    @classmethod
    def from_path(cls, path: Path, *, limit: int | None = None) -> IncomingFile:
        """Copy a file in chunks (the slide store never refers to files outside MEDIA_ROOT)."""
        limit = settings.MAX_UPLOAD_BYTES if limit is None else limit
        clean_filename(path.name)
        if path.stat().st_size > limit:
            raise too_large(limit)
        incoming = cls(path.name, limit=limit)
        try:
            with path.open("rb") as source:
                incoming.write_all(iter(partial(source.read, CHUNK_BYTES), b""))
        except BaseException:
            incoming.discard()
            raise
        return incoming

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            self.discard()
            raise too_large(self.limit)
        self._hash.update(chunk)
        self._file.write(chunk)

    def write_all(self, chunks: Iterable[bytes]) -> None:
        for chunk in chunks:
            self.write(chunk)
        self.close()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    @property
    def checksum(self) -> str:
        return self._hash.hexdigest()

    def discard(self) -> None:
        self.close()
        if not self.kept:
            self.path.unlink(missing_ok=True)

    def keep_as(self, destination: Path) -> None:
        self.close()
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path, destination)
        self.kept = True

    def __enter__(self) -> IncomingFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.discard()


@dataclass
class SlideFacts:
    """What the slide's file says about itself."""

    width: int
    height: int
    levels: int
    tile_width: int
    tile_height: int
    mpp: float | None
    magnification: float | None
    source: str
    bands: int | None = None
    frames: int = 1
    dtype: str = ""

    def metadata(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "tile_width": self.tile_width,
            "tile_height": self.tile_height,
            "bands": self.bands,
            "frames": self.frames,
            "dtype": self.dtype,
        }


def read_facts(source: Any) -> SlideFacts:
    meta = source.getMetadata()
    mm_x = meta.get("mm_x")
    magnification = meta.get("magnification")
    return SlideFacts(
        width=int(meta["sizeX"]),
        height=int(meta["sizeY"]),
        levels=int(meta["levels"]),
        tile_width=int(meta["tileWidth"]),
        tile_height=int(meta["tileHeight"]),
        mpp=round(float(mm_x) * 1000, 6) if mm_x else None,
        magnification=round(float(magnification), 3) if magnification else None,
        source=str(getattr(source, "name", type(source).__name__)),
        bands=meta.get("bandCount"),
        frames=len(meta.get("frames") or []) or 1,
        dtype=str(meta.get("dtype") or ""),
    )


def inspect_file(path: Path, name: str) -> SlideFacts:
    """Check that a file is a complete, readable slide (cheap: headers only); SlideRejected if not."""
    if Path(name).suffix.lower() in TIFF_EXTENSIONS:
        _refuse_truncated_tiff(path, name)
    try:
        source = tiles.open_uncached(path)
        facts = read_facts(source)
    except Exception as exc:  # SlideReadError, or a reader library failing on bad bytes
        logger.info("Reading %s failed: %r", name, exc)
        raise SlideRejected(unreadable_message(name), code="unreadable") from exc
    if facts.width < 1 or facts.height < 1:
        raise SlideRejected(f"'{name}' has no pixels.", code="unreadable")
    return facts


def unreadable_message(name: str) -> str:
    if Path(name).suffix.lower() == ".dcm":
        # OpenSlide reads a DICOM-WSI file on its own only if it holds the image pyramid (a VOLUME
        # instance); label, overview and extra-level files of a multi-file series cannot stand alone.
        return (
            f"'{name}' could not be read as a slide; a DICOM file must hold the whole-slide image pyramid "
            "(a VOLUME instance), not a label, overview or extra level of a multi-file series."
        )
    return f"'{name}' could not be read as a slide; it may be corrupt, truncated or not an image."


def _refuse_truncated_tiff(path: Path, name: str) -> None:
    """TIFF readers open a truncated file happily (the header is at the start) and fail on its tiles."""
    import tifffile

    size = path.stat().st_size
    try:
        with tifffile.TiffFile(path) as tif:
            pages = list(tif.pages)
            for series in tif.series:
                for level in series.levels:
                    pages.extend(level.pages)
            end = 0
            for page in pages:
                if page is None:
                    continue
                for offset, count in zip(page.dataoffsets, page.databytecounts, strict=False):
                    end = max(end, offset + count)
    except Exception:  # not a TIFF at all, or unparseable: the slide readers give the verdict
        return
    if end > size:
        raise SlideRejected(
            f"'{name}' is truncated: its image data runs past the end of the file "
            f"({human_bytes(size)}); upload the complete file.",
            code="truncated",
        )


def existing_copy(project: Project, checksum: str) -> Slide | None:
    copies = Slide.objects.filter(project=project, checksum=checksum).exclude(status=Slide.Status.FAILED)
    return copies.order_by("id").first()


def _duplicate(name: str, existing: Slide) -> SlideRejected:
    return SlideRejected(
        f"'{name}' is already in this project as slide '{existing.name}' (id {existing.pk}); it was not added again.",
        code="duplicate",
        status=409,
    )


def add_slide(
    project: Project,
    incoming: IncomingFile,
    *,
    user: Any = None,
    group: str = "",
    launch: bool = True,
) -> Slide:
    """Keep an incoming file as a new ``processing`` slide and queue its ingest; SlideRejected if bad.

    Takes ownership of ``incoming``: it is either moved into the slide store or deleted.
    """
    relative = ""
    with incoming:
        incoming.close()
        if incoming.size == 0:
            raise SlideRejected(f"'{incoming.name}' is empty.", code="empty")
        existing = existing_copy(project, incoming.checksum)
        if existing is not None:
            raise _duplicate(incoming.name, existing)
        facts = inspect_file(incoming.path, incoming.name)
        try:
            with transaction.atomic():
                slide = Slide.objects.create(
                    project=project,
                    name=incoming.name,
                    format=Path(incoming.name).suffix.lower().lstrip("."),
                    status=Slide.Status.PROCESSING,
                    checksum=incoming.checksum,
                    size_bytes=incoming.size,
                    width=facts.width,
                    height=facts.height,
                    levels=facts.levels,
                    mpp=facts.mpp,
                    magnification=facts.magnification,
                    metadata=facts.metadata(),
                    group=group[:200],
                    created_by=user if getattr(user, "is_authenticated", False) else None,
                )
                relative = media.slide_file_name(project.pk, slide.pk, incoming.name)
                incoming.keep_as(Path(settings.MEDIA_ROOT) / relative)
                slide.file.name = relative
                slide.save(update_fields=["file"])
                if launch:
                    transaction.on_commit(partial(queue_ingest, slide.pk), robust=True)
        except IntegrityError as exc:
            media.discard_new_file(relative)
            existing = existing_copy(project, incoming.checksum)
            if existing is None:
                raise
            raise _duplicate(incoming.name, existing) from exc
        except BaseException:
            media.discard_new_file(relative)
            raise
    return slide


def add_slide_from_path(project: Project, path: Path, **kwargs: Any) -> Slide:
    return add_slide(project, IncomingFile.from_path(path), **kwargs)


def queue_ingest(slide_id: int) -> None:
    from .tasks import ingest_slide  # here, not at the top: the task module imports this one

    try:
        ingest_slide.delay(slide_id)
    except Exception:
        logger.exception("Could not queue ingest of slide %s", slide_id)
        slide = Slide.objects.filter(pk=slide_id).first()
        if slide is not None:
            fail_slide(
                slide, "The slide could not be queued for processing (the task queue is unavailable); add it again."
            )


@dataclass
class IngestResult:
    facts: SlideFacts
    checksum: str
    thumbnail: bytes
    extent: int
    grid: list[tissue.GridPatch]
    notes: list[str] = field(default_factory=list)


def ingest(slide_id: int) -> Slide | None:
    """Process one slide: metadata, thumbnail, tissue, patch grid. Safe to run again."""
    slide = Slide.objects.select_related("project").filter(pk=slide_id).first()
    if slide is None:
        logger.info("Slide %s no longer exists; nothing to ingest.", slide_id)
        return None
    if slide.status == Slide.Status.FAILED:
        return slide
    try:
        result = _analyse(slide)
    except SoftTimeLimitExceeded:
        return fail_slide(slide, "Processing took longer than the time limit; the slide may be too large.")
    except (tiles.SlideReadError, SlideRejected) as exc:
        return fail_slide(slide, str(exc))
    except Exception as exc:
        logger.exception("Ingest of slide %s failed", slide_id)
        return fail_slide(
            slide, f"'{slide.name}' could not be processed ({type(exc).__name__}); it may be corrupt or truncated."
        )
    return _save(slide, result)


def _analyse(slide: Slide) -> IngestResult:
    path = Path(tiles.slide_path(slide))
    if not path.exists():
        raise tiles.SlideReadError(f"The file of slide '{slide.name}' is missing from storage; add it again.")
    checksum = slide.checksum or file_sha256(path)
    if Path(slide.name).suffix.lower() in TIFF_EXTENSIONS:
        _refuse_truncated_tiff(path, slide.name)
    facts = read_facts(tiles.open_source(path))
    thumbnail = tiles.thumbnail_jpeg(path, tiles.THUMBNAIL_SIZE)

    project = slide.project
    notes = []
    if not facts.magnification:
        notes.append(
            "The slide's metadata gives no magnification, so patches are "
            f"{project.patch_size} px at the slide's own resolution."
        )
    extent = tissue.patch_extent(project.patch_size, facts.magnification, project.magnification)
    rgb = tiles.low_res_rgb(path, tissue.mask_size_for(facts.width, facts.height, extent))
    mask = tissue.tissue_mask(rgb)
    grid = tissue.patch_grid(mask, facts.width, facts.height, extent, min_fraction=MIN_TISSUE_FRACTION)
    if facts.frames > 1 or facts.bands == 1:
        notes.append(
            "This looks like a fluorescence or multi-channel image; tissue detection is tuned for "
            "brightfield (H&E) slides and may miss tissue."
        )
    if not grid:
        notes.append(
            f"No tissue found: no {extent} px patch is at least {MIN_TISSUE_FRACTION:.0%} tissue, "
            "so no patches were made."
        )
    return IngestResult(facts=facts, checksum=checksum, thumbnail=thumbnail, extent=extent, grid=grid, notes=notes)


def _save(slide: Slide, result: IngestResult) -> Slide:
    # A re-run rewrites the row's own tokened thumbnail in place; a row without one (new, in the
    # id-only layout, or a clone pointing at its source's) gets a fresh name, so no other row's file
    # is overwritten.
    thumbnail_name = media.own_thumbnail(slide) or media.thumbnail_file_name(slide.project_id, slide.pk)
    _write_media(thumbnail_name, result.thumbnail)
    project = slide.project
    replaced = ""
    try:
        with transaction.atomic():
            slide = Slide.objects.select_for_update().select_related("project").get(pk=slide.pk)
            if slide.status == Slide.Status.FAILED:
                # Failed meanwhile: fail_slide released what the row had; the file just written is no row's.
                media.release_media(slide.project_id, slide.pk, [thumbnail_name])
                return slide
            if slide.thumbnail.name != thumbnail_name:
                replaced = slide.thumbnail.name
            facts = result.facts
            slide.width, slide.height, slide.levels = facts.width, facts.height, facts.levels
            slide.mpp, slide.magnification = facts.mpp, facts.magnification
            slide.metadata = {**slide.metadata, **facts.metadata()}
            slide.checksum = result.checksum
            slide.thumbnail.name = thumbnail_name
            slide.status = Slide.Status.READY
            slide.error = ""
            slide.message = " ".join(result.notes)
            slide.save()
            _write_grid(slide, project, result)
            _queue_patches(slide, project)
    except IntegrityError:
        existing = existing_copy(project, result.checksum)
        reason = (
            f"'{slide.name}' is already in this project as slide '{existing.name}' (id {existing.pk})."
            if existing is not None and existing.pk != slide.pk
            else f"'{slide.name}' could not be saved."
        )
        failed = fail_slide(slide, reason)
        media.release_media(slide.project_id, slide.pk, [thumbnail_name])
        return failed
    media.release_media(slide.project_id, slide.pk, [replaced])
    transaction.on_commit(partial(_announce_ready, slide.pk))
    return slide


def _announce_ready(slide_id: int) -> None:
    """Tell listeners a slide is ready; one that fails (a broker down) is logged, never fails the ingest."""
    for receiver, outcome in slide_ready.send_robust(sender=Slide, slide_id=slide_id):
        if isinstance(outcome, Exception):
            logger.warning("slide_ready receiver %s failed for slide %s: %s", receiver, slide_id, outcome)


def _queue_patches(slide: Slide, project: Project) -> None:
    """Put the slide's patches in the crowd queue (a seeded spread; rounds re-rank them later)."""
    rows = Patch.objects.filter(slide=slide).values_list("pk", "slide_id")
    queue.enqueue_patches(project, queue.seeded_spread(rows, project.seed + slide.pk))


def _write_grid(slide: Slide, project: Project, result: IngestResult) -> None:
    """Bring the slide's patches to exactly the new grid; rows that stay keep their ids."""
    magnification = float(project.magnification)
    # A first ingest has no rows to compare with: skip reading back the whole grid (tens of
    # thousands of rows on a real-size slide) to look for stale ones.
    rerun = slide.patches.exists()
    rows = [
        Patch(
            project=project,
            slide=slide,
            x=cell.x,
            y=cell.y,
            size=cell.size,
            magnification=magnification,
            tissue_fraction=cell.tissue_fraction,
        )
        for cell in result.grid
    ]
    Patch.objects.bulk_create(
        rows,
        batch_size=2000,
        update_conflicts=True,
        unique_fields=["slide", "x", "y", "size", "magnification"],
        update_fields=["tissue_fraction"],
    )
    if not rerun:
        return
    wanted = {(cell.x, cell.y) for cell in result.grid}
    stale = [
        pk
        for pk, x, y, size, mag in slide.patches.values_list("id", "x", "y", "size", "magnification").iterator(
            chunk_size=5000
        )
        if (x, y) not in wanted or size != result.extent or mag != magnification
    ]
    for start in range(0, len(stale), 5000):
        Patch.objects.filter(pk__in=stale[start : start + 5000]).delete()


def fail_slide(slide: Slide, reason: str) -> Slide:
    """Mark a slide failed with a reason and remove what was made from it: its patches, and the file
    and thumbnail its row refers to (see :func:`annotations.slides.media.release_media`)."""
    with transaction.atomic():
        # The stored paths, read under the row's lock: the instance may be stale (a concurrent re-run).
        names = Slide.objects.select_for_update().filter(pk=slide.pk).values_list("file", "thumbnail").first()
        Slide.objects.filter(pk=slide.pk).update(status=Slide.Status.FAILED, error=reason, file="", thumbnail="")
        Patch.objects.filter(slide_id=slide.pk).delete()
    media.release_media(slide.project_id, slide.pk, names or ())
    slide.refresh_from_db()
    logger.info("Slide %s failed: %s", slide.pk, reason)
    return slide


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(partial(handle.read, CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_media(name: str, content: bytes) -> None:
    """Write a media file at ``name``, replacing the file there atomically (a re-run rewrites its own thumbnail)."""
    path = Path(settings.MEDIA_ROOT) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    partial_path = path.with_suffix(path.suffix + ".part")
    partial_path.write_bytes(content)
    os.replace(partial_path, path)
