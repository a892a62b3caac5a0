"""Where a slide's files live under MEDIA_ROOT, and when they may be deleted.

A slide's file is ``slides/<project>/<slide>-<token>/<name>`` and its thumbnail
``thumbnails/<project>/<slide>-<token>.jpeg``, each token a fresh uuid4 hex. The ids are there for a
person reading the folder; the token is there because ids are not unique outside one database: two
databases on one MEDIA_ROOT (the tests and the demo, a restored backup beside a new install) both
have a slide 1 of project 1. The row stores the whole path (``Slide.file.name``,
``Slide.thumbnail.name``), and everything that reads or deletes media uses the stored path, never
one rebuilt from ids.

:func:`release_media` deletes only files a row referred to, and each only when no other slide row
refers to it too (simulation pools and the e2e projects clone rows over the same files); a folder
goes only when it is the row's own tokened folder and is then empty. A slide row that is deleted
(on its own or with its project) releases its files after the commit
(:func:`release_deleted_slide`, connected in annotations/apps.py).

Rows stored in the earlier id-only layout (``slides/<project>/<slide>/<name>``,
``thumbnails/<project>/<slide>.jpeg``) keep working: they serve from their stored paths, release
deletes the files they refer to but never their folders, and a re-run of the ingest moves the
thumbnail to a tokened name.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

from django.conf import settings
from django.core.files.storage import default_storage
from django.db import transaction
from django.db.models import Q

from annotations.models import Slide

SLIDES_DIR = "slides"
THUMBNAILS_DIR = "thumbnails"
_UUID_HEX = "[0-9a-f]{32}"
_OWN_FOLDER = re.compile(rf"{SLIDES_DIR}/(\d+)/(\d+)-{_UUID_HEX}")
_OWN_THUMBNAIL = re.compile(rf"{THUMBNAILS_DIR}/(\d+)/(\d+)-{_UUID_HEX}\.jpeg")


def media_token() -> str:
    """What makes a media path unique beyond this database (a slide's ids are not)."""
    return uuid.uuid4().hex


def slide_file_name(project_id: int, slide_id: int, name: str) -> str:
    """A new, unique path (relative to MEDIA_ROOT) for a slide's file, in a folder of its own."""
    return f"{SLIDES_DIR}/{project_id}/{slide_id}-{media_token()}/{name}"


def thumbnail_file_name(project_id: int, slide_id: int) -> str:
    """A new, unique path (relative to MEDIA_ROOT) for a slide's thumbnail."""
    return f"{THUMBNAILS_DIR}/{project_id}/{slide_id}-{media_token()}.jpeg"


def _made_for(pattern: re.Pattern[str], path: str, project_id: int, slide_id: int) -> bool:
    """Whether ``path`` is in the tokened layout and names these ids (a clone's paths name its source's)."""
    match = pattern.fullmatch(path)
    return match is not None and (int(match[1]), int(match[2])) == (project_id, slide_id)


def own_thumbnail(slide: Slide) -> str:
    """The row's thumbnail path if it was made for this very row (so a re-run may rewrite it); else ""."""
    name = slide.thumbnail.name or ""
    return name if _made_for(_OWN_THUMBNAIL, name, slide.project_id, slide.pk) else ""


def release_media(project_id: int, slide_id: int, names: Iterable[str]) -> None:
    """Delete media files slide ``slide_id``'s row no longer refers to (call after clearing or replacing them).

    Only the stored paths given, never a path rebuilt from ids; each only when no other slide row
    refers to it (cloned rows share their source's files); its folder only when that is this slide's
    own tokened folder and is left empty (``rmdir``: whatever else is in it stays).
    """
    for name in names:
        if not name:
            continue
        if Slide.objects.filter(Q(file=name) | Q(thumbnail=name)).exclude(pk=slide_id).exists():
            continue
        default_storage.delete(name)  # safe_join refuses a stored path that leaves MEDIA_ROOT
        folder = str(PurePosixPath(name).parent)
        if _made_for(_OWN_FOLDER, folder, project_id, slide_id):
            remove_empty_dir(Path(settings.MEDIA_ROOT) / folder)


def discard_new_file(relative: str) -> None:
    """Undo the move of a file into its new, unique folder (its row was rolled back)."""
    if not relative:
        return
    path = Path(settings.MEDIA_ROOT) / relative
    path.unlink(missing_ok=True)
    remove_empty_dir(path.parent)


def remove_empty_dir(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:  # missing, or holding files that are not this row's to delete
        pass


def release_deleted_slide(sender: Any, instance: Slide, using: str, **kwargs: Any) -> None:
    """post_delete of a Slide (alone or in a project's cascade): release its files once the delete commits.

    The ids are taken now: Django clears the instance's pk when the delete is done.
    """
    names = [instance.file.name or "", instance.thumbnail.name or ""]
    if any(names):
        release = partial(release_media, instance.project_id, instance.pk, names)
        transaction.on_commit(release, using=using, robust=True)
