"""Round latency on CPU, head-only mode: 1,000 labels and a pool of ~14,000 LC25000 images.

    .venv/bin/python tests/bench/bench_round.py [--labels 1000] [--pool 14000] [--strategy margin]

Runs ``learner.pipeline.run_round`` (the Celery task's body) in this process on a project cloned from
the simulation's source project (every LC25000 image ingested once as a one-patch slide; created on
first use, which takes a while), with ``--labels`` expert votes. Prints the time per stage and the
total from labels to a new queue, with the per-slide scores written as the web platform does. The first
embedding pass is reported separately in images/s, on ``--embed-sample`` images with no cache.
Needs ../shared/data/lc25000_lung; uses DATABASE_URL/REDIS_URL like manage.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "lc25000_lung"

from histoloop import embedded  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=int, default=1000)
    parser.add_argument("--pool", type=int, default=14000)
    parser.add_argument("--strategy", default="margin")
    parser.add_argument("--embed-sample", type=int, default=128)
    args = parser.parse_args()
    # Importing histoloop (its Celery app) already set DJANGO_SETTINGS_MODULE, so also say DEBUG=1 here.
    os.environ.setdefault("DEBUG", "1")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")  # DEBUG=1, as in the tests
    embedded.ensure_environment()
    import django

    django.setup()
    from django.core.management import call_command

    from annotations import consensus
    from annotations.models import LabelClass, Vote
    from learner import embedding
    from learner import simulation as sim
    from learner.conf import learner_settings
    from learner.models import TrainingRound
    from learner.pipeline import run_round

    call_command("migrate", verbosity=0)
    items = sim.read_items(DATA / "manifest.csv")
    source = sim.source_project(items, "simulation source: lc25000_lung", progress=print)
    sim.source_embeddings(source, progress=print)  # fills the embedding cache the rounds read

    rng = np.random.default_rng(0)
    rows = rng.choice(len(source), size=min(args.pool + args.labels, len(source)), replace=False)
    project, row_of = sim.clone_pool(
        source,
        rows,
        set(),
        f"bench-round-{os.getpid()}",
        query_strategy=args.strategy,
        batch_size=100,
        random_fraction=0.1,
    )
    try:
        from django.contrib.auth import get_user_model

        expert = get_user_model().objects.create(username=f"bench-round-expert-{os.getpid()}")
        labels = {lc.name: lc for lc in LabelClass.objects.filter(project=project)}
        labelled = list(row_of.items())[: args.labels]
        Vote.objects.bulk_create(
            [
                Vote(
                    project=project,
                    patch_id=pid,
                    annotator=expert,
                    role="expert",
                    label=labels[source.class_names[source.labels[row]]],
                )
                for pid, row in labelled
            ]
        )
        consensus.recompute_project_consensus(project)
        print(f"project {project.pk}: {len(row_of) - len(labelled)} pool patches, {len(labelled)} expert labels")

        round_ = TrainingRound.objects.create(project=project, number=1)
        started = time.perf_counter()
        result = run_round(round_.pk)
        total = time.perf_counter() - started
        print(f"round {result.state} {result.error}".strip())
        for stage, seconds in result.timings.items():
            print(f"  {stage:<10} {seconds:7.2f} s")
        print(f"  total      {total:7.2f} s  (labels -> new queue; goal < 60 s with cached embeddings)")
        metrics = result.metrics
        print(f"  held-out balanced accuracy {metrics.get('balanced_accuracy')}, split {metrics.get('split')}")

        patches = list(project.patches.select_related("slide", "project")[: args.embed_sample])
        with tempfile.TemporaryDirectory() as empty_cache:
            cfg = replace(learner_settings(), CACHE_DIR=Path(empty_cache))
            backbone = embedding.platform_backbone(project.backbone, cfg)
            t0 = time.perf_counter()
            embedding.embed_patches(patches, backbone, cfg)
            rate = len(patches) / (time.perf_counter() - t0)
        print(
            f"first embedding pass (no cache, read from slides): {rate:.1f} images/s on {os.cpu_count()} cores "
            f"-> ~{len(row_of) / rate / 60:.0f} min for this pool"
        )
    finally:
        Vote.objects.filter(project=project).delete()
        project.delete()
    return 0


if __name__ == "__main__":
    sys.exit(main())
