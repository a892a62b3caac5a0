"""The embedding store's read path against one file per patch, for pools of one-patch slides and of large slides.

    .venv/bin/python tests/bench/bench_store.py [--patches 14000] [--large-slides 4] [--dim 1904] [--repeats 5]

A round's embed stage, with every embedding cached, is two passes over the store: ``lookup`` (which row of
which slide file holds each patch: the positions file read, the vectors file's header checked) and ``take``
(the rows read into the pool's array). This times both on a store written to a temporary directory with
synthetic vectors:

- ``one-patch``: ``--patches`` slides of one patch each (the LC25000 pools of ``bench_round.py`` and the
  simulation, where every image is its own slide): the case with the most files per patch;
- ``large``: the same number of patches over ``--large-slides`` slides (a real whole-slide project).

The baseline, in the same run on the same machine: the cache before the per-slide store (aa91ce2's
``EmbeddingCache``), one ``.npy`` per patch under the sha1 of its key, each read with ``np.load``.
Printed per layout: median and p95 over ``--repeats`` passes (the files stay in the page cache after the
first), the ratio to the baseline, and the files opened per patch. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from learner.core.embedding_store import EmbeddingStore, SlideRows  # noqa: E402


def write_store(root: Path, slides: int, per_slide: int, dim: int, rng: np.random.Generator) -> list[str]:
    store = EmbeddingStore(root, "bench", dim)
    keys = [f"{i:040x}-224-224" for i in range(slides)]
    xy = np.stack([np.arange(per_slide) * 224, np.zeros(per_slide, dtype=np.int64)], axis=1)
    for key in keys:
        store.put_slide(key, xy, rng.standard_normal((per_slide, dim), dtype=np.float32))
    return keys


def store_pass(root: Path, keys: list[str], per_slide: int, dim: int) -> tuple[float, np.ndarray]:
    """lookup of every slide's positions, then every row read: what the embed stage does on a cached pool."""
    started = time.perf_counter()
    store = EmbeddingStore(root, "bench", dim)
    xy = np.stack([np.arange(per_slide) * 224, np.zeros(per_slide, dtype=np.int64)], axis=1)
    rows = [store.lookup(key, xy) for key in keys]
    files = [store.vectors_file(key) for key in keys]
    seg = np.repeat(np.arange(len(keys), dtype=np.int32), per_slide)
    pool = SlideRows(files, seg, np.concatenate(rows), dim)
    out = pool.take(np.arange(len(seg)))
    return time.perf_counter() - started, out


def per_patch_path(root: Path, key: str) -> Path:
    """Where the cache before the per-slide store kept a patch's vector (aa91ce2's ``EmbeddingCache.path``)."""
    digest = hashlib.sha1(key.encode()).hexdigest()
    return root / "bench" / digest[:2] / f"{digest}.npy"


def write_per_patch(root: Path, n: int, dim: int, rng: np.random.Generator) -> list[str]:
    keys = [f"patch-{i}" for i in range(n)]
    for key in keys:
        path = per_patch_path(root, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, rng.standard_normal(dim, dtype=np.float32))
    return keys


def per_patch_pass(root: Path, keys: list[str], dim: int) -> tuple[float, np.ndarray]:
    """The baseline: that cache's read of every patch (``EmbeddingCache.get``: path, then ``np.load``)."""
    started = time.perf_counter()
    out = np.empty((len(keys), dim), dtype=np.float32)
    for i, key in enumerate(keys):
        try:
            out[i] = np.load(per_patch_path(root, key))
        except (FileNotFoundError, ValueError, EOFError):
            out[i] = np.nan
    return time.perf_counter() - started, out


def figures(name: str, times: list[float], n: int, baseline: float | None) -> dict[str, float]:
    ordered = sorted(times)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    median = statistics.median(times)
    ratio = f"  {median / baseline:.2f}x the baseline" if baseline else ""
    print(f"  {name:<34} median {median:7.3f} s  p95 {p95:7.3f} s  {n / median:10,.0f} patches/s{ratio}")
    return {"median_s": round(median, 4), "p95_s": round(p95, 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches", type=int, default=14_000)
    parser.add_argument("--large-slides", type=int, default=4)
    parser.add_argument("--dim", type=int, default=1904)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    n, dim = args.patches, args.dim
    rng = np.random.default_rng(0)
    result: dict[str, object] = {"patches": n, "dim": dim, "repeats": args.repeats}
    with tempfile.TemporaryDirectory(prefix="bench_store_") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        patches = write_per_patch(root / "per-patch", n, dim, rng)
        small = write_store(root / "one-patch", n, 1, dim, rng)
        per_large = max(1, n // args.large_slides)
        large = write_store(root / "large", args.large_slides, per_large, dim, rng)
        print(f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; wrote the three layouts in "
              f"{time.perf_counter() - started:.1f} s ({n:,} patches, {dim} float32 features)")  # fmt: skip
        # the first pass of each layout warms the page cache, unrecorded
        per_patch_pass(root / "per-patch", patches, dim)
        store_pass(root / "one-patch", small, 1, dim)
        store_pass(root / "large", large, per_large, dim)
        base, one, big = [], [], []
        for _ in range(args.repeats):  # interleaved, so a change in the machine's load touches all three
            base.append(per_patch_pass(root / "per-patch", patches, dim)[0])
            one.append(store_pass(root / "one-patch", small, 1, dim)[0])
            big.append(store_pass(root / "large", large, per_large, dim)[0])
        b = statistics.median(base)
        print(f"lookup + read of every cached patch, {args.repeats} passes:")
        result["per_patch_files"] = figures("baseline: one .npy per patch", base, n, None)
        result["one_patch_slides"] = figures(f"store, {n:,} one-patch slides", one, n, b)
        result["large_slides"] = figures(f"store, {args.large_slides} slides of {per_large:,}", big, n, b)
        result["one_patch_over_baseline"] = round(statistics.median(one) / b, 3)
        result["large_over_baseline"] = round(statistics.median(big) / b, 3)
        print("files opened per patch: baseline 1; one-patch slides 3 (positions, vectors header, vectors); "
              f"large slides {3 * args.large_slides / n:.4f}")  # fmt: skip
    result["load_average"] = list(os.getloadavg())
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
