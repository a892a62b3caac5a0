"""Active learning vs random on LC25000 lung, through the platform's own loop (learner.simulation).

    .venv/bin/python tests/bench/bench_active_learning.py [--quick] [--labelling oracle,noisy] [--seeds 3]

Point DATABASE_URL at a scratch database (every run leaves its projects there); without it the embedded
PostgreSQL is used. Writes rounds.csv, learning_curve.png and summary.txt under bench-results/.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
# Importing histoloop (its Celery app) already set DJANGO_SETTINGS_MODULE, so also say DEBUG=1 here.
os.environ.setdefault("DEBUG", "1")
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")  # DEBUG=1, as in the tests

import django  # noqa: E402

django.setup()

from learner import embedding, round_stages  # noqa: E402
from learner import simulation as sim  # noqa: E402
from learner.conf import learner_settings  # noqa: E402
from learner.core.config import TrainConfig  # noqa: E402
from learner.core.embeddings import EmbeddingCache, embedding_model_id  # noqa: E402
from learner.simulation import learning_curves  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "lc25000_lung"
BENCH_CACHE = REPO / "var" / "cache" / "bench"  # bench_learner.py's cache, keyed by path under DATA


def say(message: str) -> None:
    print(message, flush=True)


def reuse_bench_cache(source: sim.SourceSet) -> int:
    """Copy embeddings bench_learner.py already made (keyed by file path) to the platform's keys
    (slide checksum + geometry). Same pixels, same backbone and size, so the same vectors; checked on
    a few images by embedding them through the round's code path first. Returns how many were copied."""
    from annotations.models import Patch

    cfg = learner_settings()
    backbone = embedding.platform_backbone(source.project.backbone, cfg)
    model_id = embedding_model_id(backbone, embedding.image_size(source.project.patch_size, backbone), cfg.TTA)
    bench = EmbeddingCache(BENCH_CACHE)
    platform = embedding.store_for(backbone, source.project.patch_size, cfg)
    patches = Patch.objects.select_related("slide", "project").in_bulk(list(source.patch_ids))
    pairs = []
    for pid in source.patch_ids:
        patch = patches[int(pid)]
        key = embedding.slide_key(patch.slide.checksum, patch.slide_id, patch.size, patch.project.patch_size)
        if platform.lookup(key, np.array([[patch.x, patch.y]]))[0] >= 0:
            continue
        rel = str(Path(patch.slide.metadata["sim_path"]).relative_to(DATA))
        if bench.path(model_id, rel).is_file():
            pairs.append((rel, key, patch))
    if not pairs:
        return 0
    probe = [p for _, _, p in pairs[:3]]
    fresh = embedding.embed_patches(probe, backbone, cfg)  # not cached yet: computed by the round's code path
    stored = np.stack([np.asarray(bench.get(model_id, rel)) for rel, _, _ in pairs[:3]])
    if np.abs(fresh - stored).max() > 1e-3:
        say(f"bench cache differs from the platform's embeddings ({np.abs(fresh - stored).max():.2g}); not reused")
        return 0
    for rel, key, patch in pairs:
        platform.put_slide(key, np.array([[patch.x, patch.y]]), np.asarray(bench.get(model_id, rel))[None, :])
    return len(pairs)


def random_reference(source: sim.SourceSet, cfg: sim.Config, sizes: list[int]) -> dict[int, list[float]]:
    """The platform's head on true labels of uniformly random pool images (no loop needed for random):
    self-trained on the rest of the pool when the platform's head is (LEARNER_SELF_TRAINING)."""
    emb = source.embeddings
    backbone = source.backbone
    assert emb is not None and backbone is not None
    out: dict[int, list[float]] = {}
    for seed in cfg.seeds:
        split = sim.split_rows(source, cfg, seed)
        test = split.test_rows
        # every pool label once (it is the slowest fit), a random draw of each size per seed
        for size in [*sizes, len(split.pool_rows)] if seed == cfg.seeds[0] else sizes:
            pick = np.random.default_rng(seed).choice(
                split.pool_rows, size=min(size, len(split.pool_rows)), replace=False
            )
            rest = np.setdiff1d(split.pool_rows, pick)
            head = round_stages.platform_head(
                emb[pick], source.labels[pick], emb[rest], source.class_names, backbone, TrainConfig(seed=seed),
                learner_settings(),
            )  # fmt: skip
            acc = float((head.predict_proba(emb[test]).argmax(1) == source.labels[test]).mean())
            out.setdefault(size if size in sizes else -1, []).append(acc)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, random vs margin, oracle, up to 200 labels")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--arms", default=",".join(sim.DEFAULT_ARMS))
    parser.add_argument("--labelling", default="oracle,noisy", help="oracle and/or noisy")
    parser.add_argument("--budgets", default="50,100,200,400,750")
    parser.add_argument("--target", type=float, help="accuracy to count labels to (default: random at 3,000)")
    parser.add_argument("--no-reference", action="store_true", help="skip random at 750/3,000/all labels")
    parser.add_argument("--tag", default=time.strftime("%Y%m%d-%H%M%S"))
    parser.add_argument("--stratify", action="store_true", help="keep every class in the pool and the test set")
    parser.add_argument(
        "--redundancy", default="fixed", help="noisy crowd policies: fixed and/or adaptive (compared by cost)"
    )
    parser.add_argument("--expert-cost", type=float, default=10.0)
    parser.add_argument("--crowd-cost", type=float, default=1.0)
    args = parser.parse_args()
    settings: tuple[sim.Setting, ...] = ()
    for name in args.labelling.split(","):
        if name != "noisy":
            settings += (sim.SETTINGS[name],)
            continue
        policies = args.redundancy.split(",")
        settings += (sim.NOISY,) if "fixed" in policies else ()
        settings += (replace(sim.NOISY, name="noisy-adaptive", adaptive=True),) if "adaptive" in policies else ()
    cfg = sim.Config(
        arms=tuple(args.arms.split(",")),
        seeds=tuple(range(args.seeds)),
        settings=settings,
        budgets=tuple(int(b) for b in args.budgets.split(",")),
        run_tag=f"bench-{args.tag}",
        stratify=args.stratify,
        expert_cost=args.expert_cost,
        crowd_cost=args.crowd_cost,
    )
    if args.quick:
        cfg = replace(cfg, arms=("random", "margin"), seeds=(0,), settings=(sim.ORACLE,), budgets=(50, 100, 200))
    out = REPO / "bench-results" / f"active-learning-{args.tag}"
    started = time.monotonic()

    items = sim.read_items(DATA / "manifest.csv")
    source = sim.source_project(items, "simulation source: lc25000_lung", progress=say)
    say(f"source: {len(source)} distinct images of {len(items)} in {len(set(source.groups))} groups "
        f"({time.monotonic() - started:.0f}s)")  # fmt: skip
    if BENCH_CACHE.is_dir():
        say(f"reused {reuse_bench_cache(source)} embeddings from {BENCH_CACHE}")
    t0 = time.monotonic()
    sim.source_embeddings(source, progress=say)
    say(f"embeddings ready ({time.monotonic() - t0:.0f}s)")

    reference = {} if args.no_reference else random_reference(source, cfg, [750, 3000])
    for size, accs in sorted(reference.items()):
        name = "all pool labels" if size < 0 else f"{size} random labels"
        say(f"reference, platform head on {name}: {np.mean(accs):.3f} ± {np.std(accs):.3f}")
    target = args.target or (float(np.mean(reference[3000])) if reference else None)

    rounds = sim.RoundsCsv(out)
    rows = rounds.rows
    t0 = time.monotonic()
    sim.simulate(source, cfg, progress=say, on_row=rounds, jobs=priority_order(cfg))
    loop_seconds = time.monotonic() - t0
    text = "\n".join(
        [
            learning_curves.summary(rows),
            f"\nTarget = {target:.3f} (random's accuracy with 3,000 labels unless --target):" if target else "",
            learning_curves.summary(rows, target) if target else "",
            "\nPlatform head (self-trained on the unlabelled pool) vs a plain head, same labels, final budget:",
            *heads_table(rows),
            f"\nloop: {len(rows)} rounds in {loop_seconds:.0f}s; total {time.monotonic() - started:.0f}s; "
            f"load average {' / '.join(f'{x:.1f}' for x in os.getloadavg())} at the end",
        ]
    )
    sim.write_summary(rows, out, text)
    say(text)
    say(f"wrote {out}")


def priority_order(cfg: sim.Config) -> list[tuple[sim.Setting, int, str]]:
    """Most telling first, so a run stopped early has them: random and margin per seed (oracle, then
    the noisy crowd), then the other arms."""
    first = [a for a in ("random", "margin") if a in cfg.arms]
    jobs = [(s, seed, a) for seed in cfg.seeds for s in cfg.settings for a in first]
    rest = [(s, seed, a) for s in cfg.settings for seed in cfg.seeds for a in cfg.arms if a not in first]
    return jobs + rest


def heads_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    final = max(int(r["budget"]) for r in rows if r.get("budget") not in (None, ""))
    for (setting, arm), group in sorted(_group(rows, final).items()):
        cells = [
            f"{k} {np.mean(v):.3f}" if k != "groups" else f"distinct groups {np.mean(v):.0f}"
            for k, v in group.items()
            if v
        ]
        lines.append(f"  {setting:7s} {arm:18s} " + "  ".join(cells))
    return lines


def _group(rows: list[dict[str, Any]], budget: int) -> dict[tuple[str, str], dict[str, list[float]]]:
    out: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in rows:
        if r.get("budget") != budget:
            continue
        cell = out.setdefault((r["setting"], r["arm"]), {"platform head": [], "no self-training": [], "groups": []})
        cell["platform head"].append(r["test_accuracy"])
        cell["groups"].append(r["label_groups"])
        if r.get("acc_supervised_only") is not None:
            cell["no self-training"].append(r["acc_supervised_only"])
    return out


if __name__ == "__main__":
    main()
