"""More like this: the nearest-neighbour index (learner.core.similarity) at 100k and 1M synthetic embeddings.

For each size: build time and peak memory of the chosen index (faiss IVF-Flat on 128-d PCA) and of faiss
HNSW (M=32) on the same reduced vectors, index file size, query time for 100 neighbours (median and p95 over
``--queries`` patches, index loaded memory-mapped as the web server loads it), and recall@100 against the
exact neighbours (cosine on the full 1,904-d vectors) of a sample. The baseline is the exact search itself,
timed in the same run: a brute-force scan of the full vectors per query.

Synthetic vectors (1,904-d float32, written once to a scratch memmap so both indexes and the exact search
read the same rows): one of 200 cluster centres plus a per-patch offset with a power-law spectrum
(variance of feature j ~ j^-1.2, as CNN features decay), made non-negative like pooled ReLU features.
Every method here is rotation-invariant, so axis-aligned spectra stand for rotated ones. Recall on real
embeddings depends on their spectrum; see the README.

    .venv/bin/python tests/bench/bench_similar.py --sizes 100000 1000000

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import faiss

from learner.core import similarity

DIM = 1904
K = 100
CLUSTERS = 200
GEN_CHUNK = 16_384


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def synthetic(path: Path, n: int, seed: int) -> np.memmap:
    rng = np.random.default_rng(seed)
    scale = np.arange(1, DIM + 1, dtype=np.float32) ** -0.6  # std, so variance ~ j^-1.2
    centres = rng.normal(0.0, 1.0, (CLUSTERS, DIM)).astype(np.float32) * scale * 2.0
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, DIM))
    for start in range(0, n, GEN_CHUNK):
        m = min(GEN_CHUNK, n - start)
        block_rng = np.random.default_rng([seed, start])
        block = block_rng.standard_normal((m, DIM), dtype=np.float32) * scale
        block += centres[block_rng.integers(0, CLUSTERS, m)]
        np.maximum(block, 0.0, out=block)
        out[start : start + m] = block
    out.flush()
    return out


class MemmapRows:
    """A memory-mapped array read a chunk at a time, like the store's SlideRows (ArrayRows would hand the
    whole array over as one block)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    @property
    def dim(self) -> int:
        return int(self.array.shape[1])

    def __len__(self) -> int:
        return len(self.array)

    def take(self, idx: np.ndarray) -> np.ndarray:
        return np.asarray(self.array[np.sort(np.asarray(idx, dtype=np.int64))], dtype=np.float32)[
            np.argsort(np.argsort(np.asarray(idx)))
        ]

    def chunks(self, idx: np.ndarray | None = None, size: int = GEN_CHUNK):  # type: ignore[no-untyped-def]
        assert idx is None
        for start in range(0, len(self.array), size):
            yield np.arange(start, min(start + size, len(self.array))), np.asarray(self.array[start : start + size])

    def subset(self, idx: np.ndarray):  # type: ignore[no-untyped-def]
        raise NotImplementedError


def recall(found: list[np.ndarray], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth, strict=True)]))


def timed_queries(search, rows: np.ndarray) -> tuple[list[np.ndarray], list[float]]:  # type: ignore[no-untyped-def]
    found, times = [], []
    for r in rows.tolist():
        t = time.perf_counter()
        got = search(r)
        times.append((time.perf_counter() - t) * 1000)
        found.append(got)
    return found, times


def stats(times: list[float]) -> dict[str, float]:
    return {"median_ms": round(float(np.median(times)), 3), "p95_ms": round(float(np.percentile(times, 95)), 3)}


def bench_size(n: int, args: argparse.Namespace, scratch: Path) -> dict[str, object]:
    out: dict[str, object] = {"n": n, "load_before": load()}
    t = time.perf_counter()
    data_path = scratch / f"x{n}-seed{args.seed}.npy"
    if not (args.keep_data and data_path.exists()):
        del_data = synthetic(data_path, n, args.seed)
        del del_data
    out["generate_s"] = round(time.perf_counter() - t, 1)
    rows = MemmapRows(np.load(data_path, mmap_mode="r"))
    rng = np.random.default_rng(args.seed + 1)
    sample = np.sort(rng.choice(n, size=args.queries, replace=False))

    # Exact neighbours of the sample: the yardstick, and the baseline's time per query.
    t = time.perf_counter()
    truth, _ = similarity.exact_neighbours(rows, sample, K)
    exact_s = time.perf_counter() - t
    out["exact_per_query_ms"] = round(exact_s * 1000 / len(sample), 1)

    # The PCA alone (part of the chosen index's build; the HNSW figure below excludes it: same vectors).
    t = time.perf_counter()
    similarity.Pca.fit(similarity._unit(rows.take(np.arange(min(n, similarity.PCA_SAMPLE)))), similarity.PCA_DIM)
    out["pca_fit_s"] = round(time.perf_counter() - t, 1)

    # The chosen index: built, saved, loaded memory-mapped, queried.
    rss0 = current_rss_mb()
    t = time.perf_counter()
    index = similarity.build(rows, seed=args.seed)
    ivf_build = time.perf_counter() - t
    path = scratch / f"ivf{n}.faiss"
    index.save(path)
    built_rss = current_rss_mb() - rss0
    reduced_all = None
    if not args.skip_hnsw:
        reduced_all = np.concatenate([index.reduce(b) for _, b in rows.chunks()])
    del index
    rss1 = current_rss_mb()
    t = time.perf_counter()
    loaded = similarity.SimilarityIndex.load(path)
    load_ms = (time.perf_counter() - t) * 1000

    def isearch(r: int) -> np.ndarray:
        return loaded.search_row(r, K)[0]

    found, times = timed_queries(isearch, sample)
    out["ivf_pca128"] = {
        "build_s": round(ivf_build, 1),
        "build_rss_delta_mb": round(built_rss, 0),
        "file_mb": round((path.stat().st_size + Path(str(path) + ".pca").stat().st_size) / 2**20, 1),
        "load_mmap_ms": round(load_ms, 1),
        "rss_after_queries_delta_mb": round(current_rss_mb() - rss1, 0),
        "nlist": similarity.n_lists(n) if n >= similarity.FLAT_BELOW else 0,
        "nprobe": similarity.NPROBE,
        "recall_at_100": round(recall(found, truth), 4),
        **stats(times),
        "load": load(),
    }

    if reduced_all is not None:
        d = reduced_all.shape[1]
        t = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(d, 32)
        hnsw.hnsw.efConstruction = 40
        hnsw.add(reduced_all)
        hnsw_build = time.perf_counter() - t
        hnsw.hnsw.efSearch = 128
        hpath = scratch / f"hnsw{n}.faiss"
        faiss.write_index(hnsw, str(hpath))

        def hsearch(r: int) -> np.ndarray:
            _, ids = hnsw.search(reduced_all[r : r + 1], K + 1)
            return ids[0][ids[0] != r][:K]

        found, times = timed_queries(hsearch, sample)
        out["hnsw32_pca128"] = {
            "build_s_excluding_pca": round(hnsw_build, 1),
            "file_mb": round(hpath.stat().st_size / 2**20, 1),
            "ef_search": 128,
            "recall_at_100": round(recall(found, truth), 4),
            **stats(times),
            "load": load(),
        }
        del hnsw, reduced_all
    for f in scratch.iterdir():
        if f.is_file() and not (args.keep_data and f == data_path) and f.name != "out.txt":
            f.unlink()
    ivf = out["ivf_pca128"]
    assert isinstance(ivf, dict)
    out["speedup_vs_exact"] = round(float(out["exact_per_query_ms"]) / max(ivf["median_ms"], 1e-6), 1)  # type: ignore[arg-type]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=100, help="sampled patches queried (and checked against exact)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-hnsw", action="store_true", help="only the chosen index")
    parser.add_argument("--scratch", type=Path, default=None, help="folder for the synthetic memmap (7.6 GB at 1M)")
    parser.add_argument("--keep-data", action="store_true", help="keep (and reuse) the synthetic data in --scratch")
    args = parser.parse_args()
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, load {load()}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_similar_", dir=args.scratch) as tmp:
        folder = args.scratch if args.keep_data and args.scratch else Path(tmp)
        for n in args.sizes:
            res = bench_size(n, args, folder)
            print(json.dumps(res), flush=True)
            results.append(res)
    goal = {"k": K, "query_ms": 100, "at": 1_000_000}
    print(json.dumps({"bench": "similar", "goal": goal, "peak_rss_mb": round(rss_mb()), "results": results}))


if __name__ == "__main__":
    main()
