"""The embedding map at size: the layout of 100k and 1M synthetic embeddings, and the map endpoint's payload.

    .venv/bin/python tests/bench/bench_map.py [--sizes 100000,1000000] [--dim 1904] [--umap] [--repeats 3]
        [--no-endpoint] [--keep]

Layout (``learner.layout.compute_xy``, the map stage's and the task's body) over a ``Rows`` of synthetic
embeddings (eight Gaussian clusters, generated block by block as the store would read them, never all in
memory). Baseline, same run: one plain pass over the same rows (``Rows.chunks``, what reading them costs),
so the ratio says what the layout adds to reading the embeddings once. ``--umap`` also times the UMAP
method at the smallest size (needs ``umap-learn``). Reported: seconds, the process's peak RSS, and how well
the eight clusters separate on the map (share of points nearer their own cluster's centroid).

Endpoint (unless ``--no-endpoint``): a project of each size in a scratch database of its own (rows written
by ``bench_scale.build_project``: slides, patches, 1% crowd-voted), a stored layout, a model version with
per-slide scores; then ``GET /api/v1/projects/<id>/map/`` as an expert through Django's full stack
in-process (median and p95 of ``--repeats``), the payload's bytes, and the baseline: the same points as a
JSON list of objects (bytes and ``json.dumps`` time).

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from histoloop import embedded  # noqa: E402

BLOCK = 16_384
N_CLUSTERS = 8


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


@dataclass(frozen=True)
class SyntheticRows:
    """``Rows`` of ``n`` synthetic embeddings: block b is generated from seed (0, b), so any row has one
    value however it is read; the cluster of row i is i % N_CLUSTERS."""

    n: int
    dim: int
    spread: float = 0.15

    @property
    def centres(self) -> np.ndarray:
        return np.random.default_rng(12345).normal(0, self.spread, (N_CLUSTERS, self.dim)).astype(np.float32)

    def __len__(self) -> int:
        return self.n

    def _block(self, b: int, centres: np.ndarray) -> np.ndarray:
        rows = min(BLOCK, self.n - b * BLOCK)
        block = np.random.default_rng([0, b]).standard_normal((rows, self.dim), dtype=np.float32)
        block += centres[(np.arange(b * BLOCK, b * BLOCK + rows) % N_CLUSTERS)]
        return block

    def take(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((len(idx), self.dim), dtype=np.float32)
        centres = self.centres
        blocks = idx // BLOCK
        for b in np.unique(blocks).tolist():
            at = np.flatnonzero(blocks == b)
            out[at] = self._block(b, centres)[idx[at] - b * BLOCK]
        return out

    def chunks(self, idx: np.ndarray | None = None, size: int = BLOCK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        assert idx is None, "the layout reads the whole pool"
        centres = self.centres
        for b in range((self.n + BLOCK - 1) // BLOCK):
            yield np.arange(b * BLOCK, min(self.n, (b + 1) * BLOCK), dtype=np.int64), self._block(b, centres)

    def subset(self, idx: np.ndarray) -> Any:
        raise NotImplementedError


def separation(xy: np.ndarray, n: int, limit: int = 200_000) -> float:
    """Share of points nearer their own cluster's centroid than any other's (on at most ``limit`` points)."""
    step = max(1, n // limit)
    pts = xy[::step].astype(np.float64)
    cls = np.arange(0, n, step) % N_CLUSTERS
    centres = np.stack([pts[cls == c].mean(axis=0) for c in range(N_CLUSTERS)])
    nearest = np.argmin(((pts[:, None, :] - centres[None]) ** 2).sum(axis=2), axis=1)
    return float((nearest == cls).mean())


def time_layout(n: int, dim: int, method: str) -> tuple[np.ndarray, dict[str, Any]]:
    from learner import layout

    rows = SyntheticRows(n, dim)
    started = time.perf_counter()
    for _ in rows.chunks():
        pass
    read = time.perf_counter() - started
    started = time.perf_counter()
    xy = layout.compute_xy(rows, method=method)
    seconds = time.perf_counter() - started
    figures = {
        "n": n,
        "dim": dim,
        "method": method,
        "seconds": round(seconds, 2),
        "read_pass_seconds": round(read, 2),
        "ratio_to_one_read_pass": round(seconds / read, 2),
        "peak_rss_mb": round(peak_rss_mb()),
        "separation": round(separation(xy, n), 3),
        "load": load(),
    }
    print(
        f"  layout {method:<5} {n:>9,} x {dim}: {seconds:7.1f} s (one read pass {read:.1f} s, "
        f"{seconds / read:.2f}x), peak RSS {figures['peak_rss_mb']} MB, separation {figures['separation']:.3f}, "
        f"load {figures['load']}",
        flush=True,
    )
    return xy, figures


def endpoint_figures(n: int, xy: np.ndarray, repeats: int) -> dict[str, Any]:
    from django.test import Client

    from annotations.models import Membership, Patch, Role
    from learner import layout, maps, scores
    from learner.models import ModelVersion, TrainingRound
    from tests.bench.bench_scale import build_project
    from tests.factories import UserFactory

    started = time.perf_counter()
    project = build_project(n, min(100, max(1, n // 10_000)), f"map{n}")
    rows = np.array(Patch.objects.filter(project=project).order_by("id").values_list("id", "slide_id"), dtype=np.int64)
    ids, slides = rows[:, 0], rows[:, 1]
    maps.save(project, layout.Layout(ids, slides, xy[:n], "pca", layout.pool_digest(ids)), 0.0)
    round_ = TrainingRound.objects.create(project=project, number=1, state="succeeded")
    version = ModelVersion.objects.create(
        project=project, round=round_, backbone=project.backbone, train_mode="head", weights_path="-",
        class_names=["adenocarcinoma", "benign", "squamous"],
    )  # fmt: skip
    proba = np.random.default_rng(0).dirichlet([1, 1, 1], n).astype(np.float32)
    scores.write(version, ids, slides, proba)
    expert = UserFactory(username=f"map-bench-expert-{n}")
    Membership.objects.create(user=expert, project=project, role=Role.EXPERT)
    print(f"  built a project of {n:,} patches in {time.perf_counter() - started:.1f} s", flush=True)
    client = Client()
    client.force_login(expert)
    times, size = [], 0
    for _ in range(repeats):
        t = time.perf_counter()
        response = client.get(f"/api/v1/projects/{project.pk}/map/")
        body = response.content
        times.append(time.perf_counter() - t)
        assert response.status_code == 200, body[:300]
        size = len(body)
    # Baseline: the same points as JSON objects, what a naive endpoint would send.
    stored = maps.latest(project)
    assert stored is not None
    t = time.perf_counter()
    pids, sids, coords = layout.unpack(stored.patch_ids, stored.slide_ids, stored.xy)
    consensus, _ = maps.consensus_channel(project, pids)
    prediction, uncertainty = maps.model_channels(version, pids, sids)
    objects = [
        {"id": int(i), "x": round(float(p[0]), 5), "y": round(float(p[1]), 5), "consensus": int(c),
         "prediction": int(q), "uncertainty": int(u), "slide": int(s)}
        for i, p, c, q, u, s in zip(pids, coords, consensus, prediction, uncertainty, sids, strict=True)
    ]  # fmt: skip
    as_json = json.dumps(objects).encode()
    json_seconds = time.perf_counter() - t
    ordered = sorted(times)
    figures = {
        "n": n,
        "payload_bytes": size,
        "bytes_per_point": round(size / n, 2),
        "get_median_ms": round(statistics.median(times) * 1000, 1),
        "get_p95_ms": round(ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))] * 1000, 1),
        "json_baseline_bytes": len(as_json),
        "json_baseline_seconds": round(json_seconds, 2),
        "size_ratio_to_json": round(size / len(as_json), 3),
        "load": load(),
    }
    print(
        f"  endpoint {n:>9,}: {size / 2**20:.1f} MiB ({figures['bytes_per_point']} B/point), GET median "
        f"{figures['get_median_ms']} ms p95 {figures['get_p95_ms']} ms; JSON objects {len(as_json) / 2**20:.1f} MiB "
        f"(binary is {figures['size_ratio_to_json']:.3f}x its size) built in {json_seconds:.1f} s; "
        f"load {figures['load']}",
        flush=True,
    )
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--dim", type=int, default=1904, help="embedding features (the platform's: 1,904)")
    parser.add_argument("--umap", action="store_true", help="also time the umap method at the smallest size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-endpoint", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = parser.parse_args()
    embedded.ensure_environment()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "histoloop.settings")
    os.environ.setdefault("DEBUG", "0")
    os.environ.setdefault("SECRET_KEY", "bench-map-" + "x" * 40)
    os.environ.setdefault("HTTPS", "0")
    os.environ.setdefault("ALLOWED_HOSTS", "testserver")
    scratch = Path(tempfile.mkdtemp(prefix="bench_map_"))
    os.environ.setdefault("LEARNER_CACHE_DIR", str(scratch / "cache"))
    from tests.bench.bench_scale import scratch_database

    sizes = sorted(int(s) for s in args.sizes.split(",") if s)
    out: dict[str, Any] = {"cores": os.cpu_count(), "layout": [], "endpoint": []}
    try:
        with scratch_database(args.keep) as url:
            os.environ["DATABASE_URL"] = url
            os.environ["DATABASE_POOL"] = "0"
            import django

            django.setup()
            from django.core.management import call_command

            call_command("migrate", verbosity=0)
            print(f"{os.cpu_count()} cores, load {load()}", flush=True)
            for n in sizes:
                xy, figures = time_layout(n, args.dim, "pca")
                out["layout"].append(figures)
                if args.umap and n == sizes[0]:
                    out["layout"].append(time_layout(n, args.dim, "umap")[1])
                if not args.no_endpoint:
                    out["endpoint"].append(endpoint_figures(n, xy, args.repeats))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
