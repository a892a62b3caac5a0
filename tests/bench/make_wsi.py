"""Write a real-size pyramidal whole-slide image from real tissue, for ingest and tile benchmarks.

    .venv/bin/python tests/bench/make_wsi.py [--out var/bench/wsi-80000x60000.tiff] [--width 80000 --height 60000]

The image is a generic pyramidal TIFF: JPEG-compressed (YCbCr 4:2:0, quality 90, one shared
JPEGTables tag per level, as scanners write it) 256 x 256 tiles, every level down to one tile
(each level ``width // 2**k`` x ``height // 2**k``, the geometry large-image assumes), resolution
tags in pixels per centimetre (0.5 µm/px at level 0, so 20x), SubfileType 1 on the reduced levels.

The tissue is real: crops of the CMU-1 region and mosaics of LC25000 lung patches from
``../shared/data``, mirror-tiled (flipped at every block edge, so there are no seams) inside a
dozen tissue-shaped islands on a white background; each island takes one source.

Bounded memory and time: level 0 is made one tile row at a time by worker processes (each row's
tiles JPEG-encoded there, plus the row shrunk by 2 for the parent); the parent streams level 0 into
the file and builds the reduced levels from those strips, keeping only their encoded tiles (about
a third of level 0's bytes). White tiles are encoded once.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
TILE = 256
QUALITY = 90
MPP = 0.5
MASK_SCALE = 32  # the island mask is made at 1/32 of level 0
BLOCK = 1024  # level-0 px of one mirrored copy of a source
WHITE = 255


def split_jpeg(data: bytes) -> tuple[bytes, bytes]:
    """(tables, frame): the DQT/DHT segments as an abbreviated table stream, and the rest.

    TIFF JPEG (TechNote 2) keeps the tables once per level in JPEGTables and each tile without them.
    """
    assert data[:2] == b"\xff\xd8", "not a JPEG"
    tables, frame = [b"\xff\xd8"], [b"\xff\xd8"]
    i = 2
    while True:
        marker = data[i + 1]
        if marker == 0xDA:  # start of scan: the rest is entropy-coded data and EOI
            frame.append(data[i:])
            break
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        segment = data[i : i + 2 + length]
        if marker in (0xDB, 0xC4):
            tables.append(segment)
        elif marker != 0xE0:  # JFIF APP0 does not belong in a TIFF tile
            frame.append(segment)
        i += 2 + length
    tables.append(b"\xff\xd9")
    return b"".join(tables), b"".join(frame)


def encode(tile: np.ndarray) -> tuple[bytes, bytes]:
    return split_jpeg(imagecodecs.jpeg8_encode(tile, level=QUALITY, subsampling=(2, 2), optimize=False))


def load_sources(seed: int) -> list[np.ndarray]:
    """BLOCK x BLOCK RGB pieces of real tissue: CMU-1 crops and LC25000 mosaics."""
    rng = np.random.default_rng(seed)
    sources = []
    cmu = np.asarray(Image.open(DATA / "slides" / "cmu-1-small-region.svs").convert("RGB"))
    for top, left in [(0, 0), (900, 400), (1900, 1100), (400, 1150), (1500, 200), (1200, 900)]:
        sources.append(np.ascontiguousarray(cmu[top : top + BLOCK, left : left + BLOCK]))
    lung = DATA / "lc25000_lung" / "lung_image_sets"
    per_side = -(-BLOCK // 224)
    for label in ("lung_aca", "lung_n", "lung_scc"):
        files = sorted((lung / label).glob("*.jpeg"))
        for _ in range(2):
            picks = rng.choice(len(files), per_side * per_side, replace=False)
            mosaic = np.concatenate(
                [
                    np.concatenate(
                        [
                            np.asarray(Image.open(files[picks[r * per_side + c]]).convert("RGB"))
                            for c in range(per_side)
                        ],
                        axis=1,
                    )
                    for r in range(per_side)
                ],
                axis=0,
            )
            sources.append(np.ascontiguousarray(mosaic[:BLOCK, :BLOCK]))
    return sources


def island_mask(width: int, height: int, seed: int, islands: int) -> np.ndarray:
    """Island index + 1 per mask pixel (0 = background) at 1/MASK_SCALE: lobed, noisy ellipses."""
    rng = np.random.default_rng(seed)
    mw, mh = -(-width // MASK_SCALE), -(-height // MASK_SCALE)
    yy, xx = np.mgrid[0:mh, 0:mw].astype(np.float32)
    labels = np.zeros((mh, mw), np.uint8)
    columns = 4
    rows = -(-islands // columns)
    for index in range(islands):
        cx = (index % columns + 0.5 + rng.uniform(-0.2, 0.2)) * mw / columns
        cy = (index // columns + 0.5 + rng.uniform(-0.2, 0.2)) * mh / rows
        a = rng.uniform(0.25, 0.42) * mw / columns
        b = rng.uniform(0.25, 0.42) * mh / rows
        theta = rng.uniform(0, np.pi)
        dx, dy = xx - cx, yy - cy
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / a
        v = (-dx * np.sin(theta) + dy * np.cos(theta)) / b
        angle = np.arctan2(v, u)
        lobes = sum(rng.uniform(0.05, 0.15) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
        wobble = 0.04 * np.sin(xx / rng.uniform(9, 20)) * np.cos(yy / rng.uniform(9, 20))
        inside = (u * u + v * v) < (1 + lobes + wobble) ** 2
        labels[inside & (labels == 0)] = index + 1
    return labels


class Painter:
    """Level-0 pixels of any tile row (the state each worker process holds)."""

    def __init__(self, width: int, height: int, seed: int, islands: int) -> None:
        self.width, self.height = width, height
        self.sources = load_sources(seed)
        self.labels = island_mask(width, height, seed, islands)
        # Each source mirror-tiled over a 2 x 2 block period: flipping at each block edge is seamless.
        self.mirrored = []
        for source in self.sources:
            top = np.concatenate([source, source[:, ::-1]], axis=1)
            self.mirrored.append(np.concatenate([top, top[::-1]], axis=0))
        self.island_source = np.random.default_rng(seed + 1).integers(0, len(self.sources), islands + 1)
        self.white = encode(np.full((TILE, TILE, 3), WHITE, np.uint8))

    def strip(self, row: int) -> np.ndarray:
        top = row * TILE
        rows = min(TILE, self.height - top)
        out = np.full((rows, self.width, 3), WHITE, np.uint8)
        mask_rows = self.labels[top // MASK_SCALE : -(-(top + rows) // MASK_SCALE)]
        labels = np.repeat(np.repeat(mask_rows, MASK_SCALE, axis=0), MASK_SCALE, axis=1)
        offset = top % MASK_SCALE
        labels = labels[offset : offset + rows, : self.width]
        period = 2 * BLOCK
        ys = (np.arange(top, top + rows) % period)[:, None]
        for island in np.unique(labels):
            if island == 0:
                continue
            texture = self.mirrored[self.island_source[island]]
            columns = np.flatnonzero((labels == island).any(axis=0))
            xs = columns % period
            piece = texture[ys, xs[None, :]]
            keep = labels[:, columns] == island
            out[:, columns] = np.where(keep[..., None], piece, out[:, columns])
        return out


_painter: Painter | None = None


def _init(width: int, height: int, seed: int, islands: int) -> None:
    global _painter
    _painter = Painter(width, height, seed, islands)


def tile_row(strip: np.ndarray, white: tuple[bytes, bytes]) -> tuple[list[bytes], bytes]:
    """The encoded tiles of one strip (edge tiles padded white) and the level's JPEGTables."""
    frames, tables = [], white[0]
    width = strip.shape[1]
    for left in range(0, width, TILE):
        tile = strip[:, left : left + TILE]
        if tile.min() == WHITE:
            frames.append(white[1])
            continue
        if tile.shape[:2] != (TILE, TILE):
            padded = np.full((TILE, TILE, 3), WHITE, np.uint8)
            padded[: tile.shape[0], : tile.shape[1]] = tile
            tile = padded
        tile_tables, frame = encode(np.ascontiguousarray(tile))
        assert tile_tables == tables, "every tile of a level must share the JPEG tables"
        frames.append(frame)
    return frames, tables


def halve(strip: np.ndarray) -> np.ndarray:
    """2 x 2 box filter, floor size (a trailing odd row/column is dropped, as large-image's level sizes)."""
    h, w = strip.shape[0] // 2 * 2, strip.shape[1] // 2 * 2
    s = strip[:h, :w].astype(np.uint16)
    return ((s[0::2, 0::2] + s[1::2, 0::2] + s[0::2, 1::2] + s[1::2, 1::2] + 2) // 4).astype(np.uint8)


def _level0_row(row: int) -> tuple[list[bytes], np.ndarray]:
    assert _painter is not None
    strip = _painter.strip(row)
    frames, _ = tile_row(strip, _painter.white)
    return frames, halve(strip)


class Reduced:
    """A reduced level built from the strips of the level above; keeps only its encoded tiles."""

    def __init__(self, width: int, height: int, white: tuple[bytes, bytes]) -> None:
        self.width, self.height, self.white = width, height, white
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0
        self.emitted_rows = 0
        self.frames: list[bytes] = []

    def add(self, strip: np.ndarray) -> np.ndarray | None:
        """Take rows; return this level's halved rows once a tile row is complete (for the next level)."""
        strip = strip[: self.height - self.emitted_rows - self.pending_rows]
        if not len(strip):
            return None
        self.pending.append(strip[:, : self.width])
        self.pending_rows += len(strip)
        out = []
        while self.pending_rows >= TILE or (self.pending_rows and self.emitted_rows + self.pending_rows == self.height):
            block = np.concatenate(self.pending, axis=0)
            chunk, rest = block[:TILE], block[TILE:]
            self.pending = [rest] if len(rest) else []
            self.pending_rows = len(rest)
            self.emitted_rows += len(chunk)
            frames, _ = tile_row(chunk, self.white)
            self.frames += frames
            out.append(halve(chunk))
        return np.concatenate(out, axis=0) if out else None


def level_sizes(width: int, height: int) -> list[tuple[int, int]]:
    sizes = [(width, height)]
    while max(sizes[-1]) > TILE:
        k = len(sizes)
        sizes.append((max(1, width // 2**k), max(1, height // 2**k)))
    return sizes


def write(out: Path, width: int, height: int, *, seed: int, islands: int, processes: int) -> dict:
    start = time.perf_counter()
    sizes = level_sizes(width, height)
    white = encode(np.full((TILE, TILE, 3), WHITE, np.uint8))
    reduced = [Reduced(w, h, white) for w, h in sizes[1:]]
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(out.suffix + ".part")
    rows = -(-height // TILE)
    context = multiprocessing.get_context("fork")

    def resolution(level: int) -> tuple[float, float]:
        per_cm = 1e4 / (MPP * width / sizes[level][0]), 1e4 / (MPP * height / sizes[level][1])
        return per_cm

    tables = white[0]
    common = {
        "dtype": np.uint8,
        "tile": (TILE, TILE),
        "compression": "jpeg",
        "photometric": "ycbcr",
        "subsampling": (2, 2),
        "resolutionunit": "CENTIMETER",
        "extratags": [(347, "B", len(tables), tables, True)],
        "metadata": None,
    }
    with context.Pool(processes, initializer=_init, initargs=(width, height, seed, islands)) as pool:

        def level0() -> Iterator[bytes]:
            for frames, halved in pool.imap(_level0_row, range(rows), chunksize=1):
                # Before yielding: tifffile stops pulling once it has the last tile.
                carry: np.ndarray | None = halved
                for level in reduced:
                    if carry is None:
                        break
                    carry = level.add(carry)
                yield from frames

        with tifffile.TiffWriter(partial, bigtiff=True) as tif:
            tif.write(
                level0(),
                shape=(height, width, 3),
                resolution=resolution(0),
                description=f"Histoloop benchmark slide {width}x{height}, {MPP} um/px, 20x",
                **common,
            )
            for index, level in enumerate(reduced, start=1):
                w, h = sizes[index]
                assert level.emitted_rows == h, (index, level.emitted_rows, h)
                tif.write(iter(level.frames), shape=(h, w, 3), resolution=resolution(index), subfiletype=1, **common)
    partial.replace(out)
    return {
        "seconds": time.perf_counter() - start,
        "levels": len(sizes),
        "bytes": out.stat().st_size,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "children_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def default_path(width: int, height: int) -> Path:
    return REPO / "var" / "bench" / f"wsi-{width}x{height}.tiff"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=80_000)
    parser.add_argument("--height", type=int, default=60_000)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--islands", type=int, default=11)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    out = args.out or default_path(args.width, args.height)
    facts = write(out, args.width, args.height, seed=args.seed, islands=args.islands, processes=args.processes)
    print(
        f"{out}: {args.width}x{args.height}, {facts['levels']} levels, {facts['bytes'] / 2**20:.0f} MiB in "
        f"{facts['seconds']:.1f} s; peak RSS parent {facts['peak_rss_mb']:.0f} MB, "
        f"largest worker {facts['children_peak_rss_mb']:.0f} MB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
