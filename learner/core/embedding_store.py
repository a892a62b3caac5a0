"""Embeddings on disk, one array file per slide, and a pool's embeddings read from them chunk by chunk.

A slide's vectors live in one float32 ``.npy`` (rows × features, memory-mappable) beside a companion
``.xy.npy`` (rows × 2, int64) naming each row's patch by its position on the slide. The slide key is the
caller's: content (the slide's checksum) plus patch geometry, so identical pixels share a file whatever
project or database they belong to. Both files are replaced atomically and only once a slide's missing
rows are all computed, so a cancelled pass keeps every finished slide and redoes only the one it was in.

``Rows`` is what the learner's stages read embeddings through: ``take`` (some rows, in the order asked)
and ``chunks`` (all of them, a bounded block at a time). ``ArrayRows`` wraps an array already in memory
(small pools, hand-made tests); ``SlideRows`` reads the slide files, opening each memory map only for
the rows of one chunk and closing it afterwards, so the pages it touched leave the process again and its
resident memory stays bounded whatever the pool size.
"""

from __future__ import annotations

import functools
import io
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

# Rows per block for chunked reading: 16,384 × 1,904 float32 is 125 MB.
CHUNK_ROWS = 16_384


class Rows(Protocol):
    """A pool's embeddings, however they are held."""

    @property
    def dim(self) -> int: ...

    def __len__(self) -> int: ...

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (pool indices) as a float32 array, in the order given."""
        ...

    def chunks(self, idx: np.ndarray | None = None, size: int = CHUNK_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions into ``idx``, or pool indices when ``idx`` is None; their rows), at most ``size``
        rows at a time, every position exactly once, in an order that reads the files sequentially."""
        ...

    def subset(self, idx: np.ndarray) -> Rows:
        """The rows ``idx`` as a pool of their own."""
        ...


@dataclass(frozen=True)
class ArrayRows:
    """Embeddings already in memory."""

    array: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.array.shape[1])

    def __len__(self) -> int:
        return len(self.array)

    def take(self, idx: np.ndarray) -> np.ndarray:
        return np.asarray(self.array[np.asarray(idx, dtype=np.int64)], dtype=np.float32)

    def chunks(self, idx: np.ndarray | None = None, size: int = CHUNK_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        # In memory already: one block, so results match a single pass over the array to the last bit.
        n = len(self.array) if idx is None else len(idx)
        if n:
            yield np.arange(n, dtype=np.int64), self.array if idx is None else self.take(np.asarray(idx))

    def subset(self, idx: np.ndarray) -> ArrayRows:
        return ArrayRows(self.take(idx))


def as_rows(x: np.ndarray | Rows) -> Rows:
    return ArrayRows(x) if isinstance(x, np.ndarray) else x


@dataclass(frozen=True)
class SlideRows:
    """A pool's embeddings in slide files: pool index i is row ``row[i]`` of ``files[seg[i]]``."""

    files: Sequence[str | Path]
    seg: np.ndarray  # int32 per pool index
    row: np.ndarray  # int64 per pool index
    dim: int

    def __len__(self) -> int:
        return len(self.seg)

    def take(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((len(idx), self.dim), dtype=np.float32)
        if not len(idx):
            return out
        seg, row = self.seg[idx], self.row[idx]
        order = np.lexsort((row, seg))
        bounds = np.flatnonzero(np.diff(seg[order])) + 1
        for part in np.split(order, bounds):
            vectors = _open_vectors(self.files[int(seg[part[0]])])
            rows = row[part]
            if len(rows) == 1:  # a one-patch slide (the LC25000 pools): no run to look for
                out[part[0]] = vectors[rows[0]]
            elif np.all(np.diff(rows) == 1):  # a run of consecutive rows (a whole slide, in a chunked pass): a slice
                out[part] = vectors[rows[0] : rows[-1] + 1]
            else:
                out[part] = vectors[rows]
            del vectors  # unmapped now: the pages read leave this process's resident set
        return out

    def chunks(self, idx: np.ndarray | None = None, size: int = CHUNK_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        pool = np.arange(len(self.seg), dtype=np.int64) if idx is None else np.asarray(idx, dtype=np.int64)
        order = np.lexsort((self.row[pool], self.seg[pool]))
        for start in range(0, len(order), size):
            positions = order[start : start + size]
            yield positions, self.take(pool[positions])

    def subset(self, idx: np.ndarray) -> SlideRows:
        idx = np.asarray(idx, dtype=np.int64)
        return SlideRows(self.files, self.seg[idx], self.row[idx], self.dim)

    def in_memory(self) -> ArrayRows:
        return ArrayRows(self.take(np.arange(len(self.seg))))


# A slide file up to this size is read whole rather than memory-mapped: a project of many small slides (one
# patch each, as the LC25000 simulation's) pays a map and an unmap per slide otherwise, which cost more than
# reading a few kilobytes.
SMALL_FILE_BYTES = 1 << 20


def _read_up_to(path: str | Path, limit: int | None) -> tuple[bytes | None, int]:
    """(the file's bytes, its size), or (None, size) when it is larger than ``limit``. Plain ``os`` calls: a
    pool of one-patch slides opens tens of thousands of tiny files, and a buffered file object costs more to
    make and close than reading a few kilobytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if limit is not None and size > limit:
            return None, size
        parts = []
        while chunk := os.read(fd, max(size, 1 << 16)):
            parts.append(chunk)
        return b"".join(parts), size
    finally:
        os.close(fd)


def _open_vectors(path: str | Path) -> np.ndarray:
    """A slide's vectors: read whole when small, else memory-mapped (rows read on access)."""
    data, _ = _read_up_to(path, SMALL_FILE_BYTES)
    if data is not None:
        return _parse_npy(data, path)
    return np.load(path, mmap_mode="r")


def _load_small(path: str | Path) -> np.ndarray:
    """A ``.npy`` file read whole: for the positions files, a few bytes per row."""
    data, _ = _read_up_to(path, None)
    assert data is not None  # no limit
    return _parse_npy(data, path)


# The header np.save writes for a C-ordered array of a plain dtype, e.g.
# {'descr': '<f4', 'fortran_order': False, 'shape': (1, 1904), } padded with spaces to end in a newline.
_PLAIN_HEADER = re.compile(
    rb"\{'descr': '([<>|][fiub][0-9]{1,2})', 'fortran_order': False, 'shape': \(([0-9, ]*)\), \} *\n"
)

# Bytes read for a header alone: np.save pads its header to a multiple of 64 bytes, 128 for a 2-d shape.
_HEAD_BYTES = 512


def _header(data: bytes) -> tuple[tuple[int, ...], np.dtype, int] | None:
    """Shape, dtype and data offset of a ``.npy`` image with the plain header np.save writes for the store's
    arrays, parsed without ``np.lib.format`` (its literal evaluation of the header is most of the read time
    of a small file); None for any other header, which the caller hands to numpy."""
    if data[:6] != b"\x93NUMPY" or len(data) < 12:
        return None
    if data[6] == 1:
        length, start = int.from_bytes(data[8:10], "little"), 10
    elif data[6] in (2, 3):
        length, start = int.from_bytes(data[8:12], "little"), 12
    else:
        return None
    match = _PLAIN_HEADER.fullmatch(data, start, start + length)
    if match is None:
        return None
    shape = tuple(int(d) for d in match.group(2).replace(b" ", b"").split(b",") if d)
    return shape, _dtype(match.group(1)), start + length


@functools.lru_cache(maxsize=32)
def _dtype(descr: bytes) -> np.dtype:
    return np.dtype(descr.decode("ascii"))


def _parse_npy(data: bytes, path: str | Path) -> np.ndarray:
    """The array in a whole ``.npy`` file's bytes (read-only); a short file raises ValueError, as np.load does."""
    parsed = _header(data)
    if parsed is None:
        return np.load(io.BytesIO(data), allow_pickle=False)
    shape, dtype, offset = parsed
    count = math.prod(shape)
    if len(data) - offset < count * dtype.itemsize:
        raise ValueError(f"{os.path.basename(path)}: truncated .npy file")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


def _array_header(path: str | Path) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype a ``.npy`` file declares, from its header alone (nothing mapped, no data read)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        parsed = _header(os.read(fd, _HEAD_BYTES))
    finally:
        os.close(fd)
    if parsed is not None:
        shape, dtype, offset = parsed
    else:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            offset = fh.tell()
    # A file cut short of its data is damage, as np.load's map would have said.
    if size < offset + math.prod(shape) * dtype.itemsize:
        raise ValueError("truncated .npy file")
    return shape, dtype


def xy_keys(xy: np.ndarray) -> np.ndarray:
    """One int64 per (x, y) position (both below 2**31)."""
    xy = np.asarray(xy, dtype=np.int64).reshape(-1, 2)
    return (xy[:, 0] << 32) | xy[:, 1]


def _save_atomic(target: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _no_lock(slide_key: str) -> AbstractContextManager[object]:
    return nullcontext()


@dataclass(frozen=True)
class EmbeddingStore:
    """Per-slide embedding files of one embedding model under ``root/<model id>/<xx>/<slide key>.npy``.

    ``write_lock(slide_key)`` is held around each ``put_slide``'s read-merge-replace: two processes adding
    different rows to one slide's file (two chunks of a large slide, embedded by two workers) would
    otherwise each merge into the file as it was before the other's write, and one would lose its rows.
    The platform passes a PostgreSQL advisory lock (``learner.locks``); alone in one process, none is needed.
    """

    root: Path
    model_id: str
    dim: int
    write_lock: Callable[[str], AbstractContextManager[object]] = _no_lock

    @functools.cached_property
    def _dir(self) -> str:
        return os.path.join(self.root, self.model_id)

    def vectors_path(self, slide_key: str) -> Path:
        return Path(self.vectors_file(slide_key))

    def vectors_file(self, slide_key: str) -> str:
        """``vectors_path`` as a string: a pool of many small slides names tens of thousands of these, and a
        string costs a fraction of a ``Path``'s three joins."""
        return f"{self._dir}/{slide_key[:2]}/{slide_key}.npy"

    def _xy_path(self, slide_key: str) -> str:
        return f"{self._dir}/{slide_key[:2]}/{slide_key}.xy.npy"

    def _read_xy(self, slide_key: str) -> np.ndarray | None:
        """The slide's recorded positions, or None when it has no complete, consistent file."""
        try:
            xy = _load_small(self._xy_path(slide_key))
            shape, dtype = _array_header(self.vectors_file(slide_key))
        except (FileNotFoundError, ValueError, EOFError, OSError):
            return None
        # The vectors are replaced before the positions and rows only grow, so a vectors file longer than the
        # positions is a writer between its two replaces (or one killed there): its first rows are the
        # positions'. Shorter is damage, and another width another embedding size: a miss, never a wrong hit.
        if len(shape) != 2 or shape[0] < len(xy) or shape[1] != self.dim:
            return None
        if dtype != np.float32:
            return None
        return np.asarray(xy, dtype=np.int64).reshape(-1, 2)

    def lookup(self, slide_key: str, xy: np.ndarray) -> np.ndarray:
        """The file row of each position in ``xy`` (n × 2), -1 where the slide's file lacks it."""
        wanted = xy_keys(xy)
        rows = np.full(len(wanted), -1, dtype=np.int64)
        stored = self._read_xy(slide_key)
        if stored is None or not len(stored) or not len(wanted):
            return rows
        keys = xy_keys(stored)
        if len(keys) == len(wanted) and np.array_equal(keys, wanted):  # the file's positions, in its order
            return np.arange(len(keys), dtype=np.int64)
        sorter = np.argsort(keys, kind="stable")
        at = np.minimum(np.searchsorted(keys[sorter], wanted), len(keys) - 1)
        hit = keys[sorter][at] == wanted
        rows[hit] = sorter[at[hit]]
        return rows

    def put_slide(self, slide_key: str, xy: np.ndarray, vectors: np.ndarray) -> int:
        """Add these positions' vectors to the slide's file (rows already there keep their place and value);
        returns how many rows were added (0 when every position was there already).

        The vectors file is replaced before the xy file, and rows only ever grow and keep their place, so a
        reader (xy first, then vectors) always finds at least as many vectors as positions, the first of them
        the positions' own: a reader in the middle of a write, or after a writer killed between its two
        replaces, sees the file as it was before that write, never a miss and never a wrong pair. A row
        number a reader holds stays valid.
        """
        xy = np.asarray(xy, dtype=np.int64).reshape(-1, 2)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (len(xy), self.dim):
            raise ValueError(
                f"Expected {len(xy)} vectors of {self.dim} features, got an array of shape {vectors.shape}."
            )
        _, first = np.unique(xy_keys(xy), return_index=True)  # a position given twice: the first counts
        first.sort()
        xy, vectors = xy[first], vectors[first]
        with self.write_lock(slide_key):
            added = len(xy)
            stored = self._read_xy(slide_key)
            if stored is not None and len(stored):
                new = ~np.isin(xy_keys(xy), xy_keys(stored))
                added = int(new.sum())
                if not added:
                    return 0
                old = np.load(self.vectors_path(slide_key), mmap_mode="r")
                xy = np.concatenate([stored, xy[new]])
                vectors = np.concatenate([np.asarray(old[: len(stored)]), vectors[new]])
                del old
            target = self.vectors_path(slide_key)
            target.parent.mkdir(parents=True, exist_ok=True)
            _save_atomic(target, np.ascontiguousarray(vectors))
            _save_atomic(Path(self._xy_path(slide_key)), xy)
        return added
