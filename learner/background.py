"""A slide's embedding queued in the background once its ingest made it ready: low-priority shards on the shard
queue (``learner.shards`` embeds them), so the next round finds the slide embedded and embeds only what is new.

Kept apart from ``learner.shards`` so that the ingest worker and the web server, which send these messages
or load this app, never import torch.
"""

from __future__ import annotations

import logging

from celery import signature

from annotations.models import Patch, Slide

from .conf import learner_settings

logger = logging.getLogger(__name__)

SHARD_TASK = "learner.tasks.embed_shard"
# On Redis, priority 0 is served first and 9 last: a round's shards go ahead of these.
BACKGROUND_PRIORITY = 9


def queue_slide_embedding(slide_id: int) -> int:
    """Queue low-priority shards for a ready slide's patches (one per chunk of SHARD_PATCHES); returns how
    many were sent. Whoever takes them embeds only what the store lacks."""
    cfg = learner_settings()
    slide = Slide.objects.select_related("project").filter(pk=slide_id, status=Slide.Status.READY).first()
    if slide is None:
        return 0
    project, chunk_size = slide.project, cfg.SHARD_PATCHES
    sent = 0
    sizes = Patch.objects.filter(slide=slide).values_list("size", flat=True).order_by("size").distinct()
    for size in sizes:
        n = Patch.objects.filter(slide=slide, size=size).count()
        for chunk in range((n + chunk_size - 1) // chunk_size):
            payload = {
                "backbone": project.backbone,
                "weights": project.backbone_weights,
                "model_id": None,  # the worker's own settings decide; a round's shards carry the round's
                "patch_size": project.patch_size,
                "chunk_size": chunk_size,
                "pieces": [[slide.pk, int(size), chunk]],
            }
            signature(SHARD_TASK, args=(payload,)).apply_async(queue=cfg.SHARD_QUEUE, priority=BACKGROUND_PRIORITY)
            sent += 1
    return sent


def on_slide_ready(sender: object, slide_id: int, **kwargs: object) -> None:
    """``annotations.slides.ingest.slide_ready`` handler: background embedding, when switched on."""
    if learner_settings().BACKGROUND_EMBEDDING:
        sent = queue_slide_embedding(slide_id)
        logger.info("Queued %d background embedding shards for slide %s", sent, slide_id)
