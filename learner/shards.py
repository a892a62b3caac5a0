"""A pool's missing embeddings as shards that every worker on the ``gpu`` queue takes, and a round that waits
for them without ever blocking a worker.

A *piece* is one slide's patches of one geometry or, for a slide with more than ``SHARD_PATCHES`` of them, one
run of ``SHARD_PATCHES`` in (y, x) order (neighbours share tiles). A *shard* is one Celery task
(``learner.tasks.embed_shard``) over pieces: a large slide's chunk alone, or small slides packed together up to
``SHARD_PATCHES`` patches (and at most PIECES_PER_SHARD slides). Shards are idempotent:

- a process embeds a piece only while it holds the piece's PostgreSQL advisory lock (``learner.locks``), taken
  without waiting: a shard that finds a piece held skips it, since its holder is doing it;
- under that lock the store is asked again which of the piece's patches are missing, and only those are
  embedded, so a redelivered shard, the round and a background shard never embed a patch twice;
- a slide's file is rewritten under the slide's file lock (``locks.slide_file_lock``), so two chunks of
  one slide finishing together both land.

The round (``embed_pool_sharded``) sends the shards as a Celery ``group``, then works through them itself from
the far end of the list (workers take from the head of the queue), embedding every piece nobody holds, and
polls the held ones until their holders let go. It never waits on a subtask's result, so a single worker
process (the embedded default, solo pool) cannot deadlock: it embeds everything itself and the messages it
sent become no-ops. A worker killed mid-shard loses its database session and with it its locks; the round
takes the piece over at its next poll, and the broker redelivers the message too (``acks_late``,
``reject_on_worker_lost``: at once when a pool child dies; on Redis after the visibility timeout when the
whole worker does). A failed shard (a corrupt tile) fails the round with its message, which names the slide;
so does a shard whose workers keep dying on it (``MAX_SHARD_STARTS``), instead of being redelivered for ever.
A cancelled or failed round revokes the shards not yet started.

After ingest, a ready slide's shards are queued at low priority (``learner.background``), so a round
later finds them embedded, or being embedded: then it waits for the holder, or takes a piece over if the
holder dies.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from celery import current_app, group, signature
from celery.result import AsyncResult

from annotations.models import Patch, Slide
from learner.core.backbone import Backbone
from learner.core.embedding_store import EmbeddingStore, Rows
from learner.core.errors import LearnerError, ProgressFn, StopFn, check_stop, report

from . import locks
from .background import SHARD_TASK
from .conf import LearnerSettings, learner_settings
from .embedding import (
    Group,
    PatchReadError,
    backbone_spec,
    embed_missing,
    group_rows,
    lookup_groups,
    platform_backbone,
    slide_key,
    store_for,
)

logger = logging.getLogger(__name__)

# Each piece a shard works on holds one advisory lock, and PostgreSQL's lock table is shared by the whole
# server (max_locks_per_transaction × max_connections, 6,400 by default): small slides are packed at most
# this many to a shard.
PIECES_PER_SHARD = 256
# How often the round looks again at pieces other processes hold.
POLL_SECONDS = 0.5
# On Redis, priority 0 is served first: a round's shards go ahead of the background ones.
ROUND_PRIORITY = 0
# After its last piece is in, how long a round waits for the results of shards other workers finished,
# only to credit them in its metrics.
RESULT_GRACE_SECONDS = 2.0
# A shard message is redelivered each time its worker process dies holding it (``reject_on_worker_lost``). A
# shard that kills every worker that takes it (a decoder crash on a damaged tile, memory) would go round for
# ever: past this many starts it fails, with a message naming its slides, and its round fails with it.
MAX_SHARD_STARTS = 3
# How long the broker's record of a shard's starts is kept (a shard never lives this long).
STARTS_TTL_SECONDS = 24 * 3600


class ShardFailed(LearnerError):
    """A shard could not be embedded; the message names its slides."""


@dataclass(eq=False)
class Piece:
    """One slide's patches of one geometry (or one chunk of them), as indices into the caller's arrays.
    Compared by identity."""

    slide_id: int
    size: int
    chunk: int
    key: str  # the store's slide key
    idx: np.ndarray  # indices into the caller's patch id array
    xy: np.ndarray  # (n, 2) level-0 positions
    missing: int = 0  # patches the store lacked when the piece was planned

    def ref(self) -> list[int]:
        return [self.slide_id, self.size, self.chunk]

    def lock(self, model_id: str, chunk_size: int) -> int:
        return locks.lock_key("embedding-piece", model_id, self.key, self.chunk, chunk_size)


def chunk_order(ids: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The order a slide's patches are chunked in: by row, then column (then id, for equal positions)."""
    return np.lexsort((ids, x, y))


def split(key: str, slide_id: int, size: int, ids: np.ndarray, xy: np.ndarray, chunk_size: int) -> list[Piece]:
    """A slide's patches of one geometry as pieces of at most ``chunk_size``; ``ids`` and ``xy`` are theirs,
    and each piece's ``idx`` indexes into them."""
    order = chunk_order(ids, xy[:, 0], xy[:, 1])
    return [
        Piece(slide_id, size, k, key, order[start : start + chunk_size], xy[order[start : start + chunk_size]])
        for k, start in enumerate(range(0, len(order), chunk_size))
    ]


def pack(pieces: list[Piece], chunk_size: int) -> list[list[Piece]]:
    """Pieces into shards: a full chunk alone, smaller pieces together up to ``chunk_size`` patches."""
    shards: list[list[Piece]] = []
    current: list[Piece] = []
    count = 0
    for piece in pieces:
        n = len(piece.idx)
        if n >= chunk_size:
            shards.append([piece])
            continue
        if current and (count + n > chunk_size or len(current) >= PIECES_PER_SHARD):
            shards.append(current)
            current, count = [], 0
        current.append(piece)
        count += n
    if current:
        shards.append(current)
    return shards


def describe(pieces: list[Piece]) -> str:
    names = dict(Slide.objects.filter(pk__in=[p.slide_id for p in pieces]).values_list("pk", "name"))
    shown = ", ".join(f"'{names.get(p.slide_id, p.slide_id)}'" for p in pieces[:3])
    return shown + (f" and {len(pieces) - 3} more" if len(pieces) > 3 else "")


def embed_pieces(
    store: EmbeddingStore,
    pieces: list[Piece],
    patch_ids: np.ndarray,
    patch_size: int,
    backbone: Backbone,
    cfg: LearnerSettings,
    chunk_size: int,
    *,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> tuple[int, list[Piece]]:
    """Embed the missing patches of every piece no other process holds; returns (patches embedded, the
    pieces held elsewhere). Each piece is locked while it is checked, embedded and written."""
    taken: list[tuple[Piece, int]] = []
    busy: list[Piece] = []
    try:
        for piece in pieces:
            key = piece.lock(store.model_id, chunk_size)
            if locks.try_acquire(key):
                taken.append((piece, key))
            else:
                busy.append(piece)
        groups: list[Group] = []
        for piece, _ in taken:
            rows = store.lookup(piece.key, piece.xy)  # again, under the lock: what is missing now
            if (rows < 0).any():
                groups.append((piece.key, piece.idx, piece.xy, rows))
        todo = sum(int((rows < 0).sum()) for _, _, _, rows in groups)
        if todo:
            embed_missing(store, groups, patch_ids, patch_size, backbone, cfg, progress, should_stop, 0, todo)
    finally:
        for _, key in taken:
            locks.release(key)
    return todo, busy


# --- a worker's shard ------------------------------------------------------------------------------------------

_backbones: dict[Any, Backbone] = {}


def worker_backbone(name: str, cfg: LearnerSettings, weights: str = "") -> Backbone:
    """The backbone, built once per worker process (weights load in seconds; a shard may take less)."""
    spec = (backbone_spec(name, cfg, weights), cfg.DEVICE)
    if spec not in _backbones:
        _backbones.clear()
        _backbones[spec] = platform_backbone(name, cfg, weights)
    return _backbones[spec]


def load_pieces(refs: list[list[int]], patch_size: int, chunk_size: int) -> tuple[np.ndarray, list[Piece]]:
    """The pieces a message names, read from the database (patch ids of all of them, and the pieces indexing
    into them). Pieces of slides deleted or not ready any more are left out."""
    wanted = {int(r[0]) for r in refs}
    slides = dict(Slide.objects.filter(pk__in=wanted, status=Slide.Status.READY).values_list("pk", "checksum"))
    ids_parts: list[np.ndarray] = []
    pieces: list[Piece] = []
    offset = 0
    cache: dict[tuple[int, int], list[Piece]] = {}
    for slide_id, size, chunk in refs:
        if slide_id not in slides:
            continue
        if (slide_id, size) not in cache:
            rows = np.array(
                Patch.objects.filter(slide_id=slide_id, size=size).values_list("id", "x", "y"), dtype=np.int64
            ).reshape(-1, 3)
            key = slide_key(slides[slide_id], slide_id, size, patch_size)
            split_ = split(key, slide_id, size, rows[:, 0], rows[:, 1:3], chunk_size)
            for piece in split_:
                piece.idx = rows[piece.idx, 0]  # patch ids for now
            cache[(slide_id, size)] = split_
        parts = cache[(slide_id, size)]
        if chunk >= len(parts):
            continue  # the slide's grid shrank since the shard was planned: nothing there any more
        piece = parts[chunk]
        ids = piece.idx
        ids_parts.append(ids)
        pieces.append(Piece(slide_id, size, chunk, piece.key, np.arange(offset, offset + len(ids)), piece.xy))
        offset += len(ids)
    patch_ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, dtype=np.int64)
    return patch_ids, pieces


def count_start(task_id: str) -> int:
    """This shard message's starts so far, this one included (1 when the shared cache cannot be reached: a
    shard is never refused for want of a count)."""
    if not task_id:
        return 1
    from django.core.cache import cache

    key = f"embed-shard-starts:{task_id}"
    try:
        cache.add(key, 0, timeout=STARTS_TTL_SECONDS)
        return int(cache.incr(key))
    except Exception:
        logger.warning("Could not count the starts of shard %s", task_id, exc_info=True)
        return 1


def run_shard(payload: dict[str, Any], worker: str = "", task_id: str = "") -> dict[str, Any]:
    """The body of ``learner.tasks.embed_shard``: embed the pieces' missing patches into the store."""
    started = time.monotonic()
    cfg = learner_settings()
    patch_size, chunk_size = int(payload["patch_size"]), int(payload["chunk_size"])
    patch_ids, pieces = load_pieces(payload["pieces"], patch_size, chunk_size)
    if not pieces:
        return {"embedded": 0, "busy": 0, "worker": worker}
    starts = count_start(task_id)
    if starts > MAX_SHARD_STARTS:
        raise ShardFailed(
            f"Embedding slide {describe(pieces)} was started {starts - 1} times and the worker process died each "
            "time (out of memory, or a decoder crash on a damaged region?); the shard is not tried again. "
            "Check the worker's log and the slide's file."
        )
    backbone = worker_backbone(payload["backbone"], cfg, payload.get("weights", ""))
    store = store_for(backbone, patch_size, cfg)
    expected = payload.get("model_id")
    if expected and expected != store.model_id:
        raise ShardFailed(
            f"This worker ({worker}) embeds with '{store.model_id}' but the shard was planned for '{expected}': "
            "give every worker on the queue the same LEARNER_* settings (PRETRAINED, MULTISCALE, TTA)."
        )
    try:
        embedded, busy = embed_pieces(store, pieces, patch_ids, patch_size, backbone, cfg, chunk_size)
    except Exception as exc:
        gone = _slides_gone(pieces)
        if gone:  # deleted (or re-ingested) while the shard ran: nothing left to embed, not a failure
            logger.info("Shard %s: slides %s went away while it ran (%s)", task_id, gone, exc.__class__.__name__)
            return {"embedded": 0, "busy": 0, "worker": worker, "gone": gone}
        if isinstance(exc, PatchReadError | ShardFailed):
            raise
        raise ShardFailed(f"Embedding slide {describe(pieces)} failed ({exc.__class__.__name__}: {exc}).") from exc
    logger.info(
        "Shard %s of %s: embedded %d patches (%d pieces held elsewhere) on %s in %.1f s",
        task_id, describe(pieces), embedded, len(busy), worker, time.monotonic() - started,
    )  # fmt: skip
    return {"embedded": embedded, "busy": len(busy), "worker": worker}


def _slides_gone(pieces: list[Piece]) -> list[int]:
    """The pieces' slides that are no longer there and ready."""
    wanted = {p.slide_id for p in pieces}
    ready = set(Slide.objects.filter(pk__in=wanted, status=Slide.Status.READY).values_list("pk", flat=True))
    return sorted(wanted - ready)


def shard_payload(
    pieces: list[Piece], backbone_name: str, model_id: str, patch_size: int, chunk_size: int, weights: str = ""
) -> dict:
    return {
        "backbone": backbone_name,
        "weights": weights,  # the project's own (relative to each worker's LEARNER_PRETRAINED_DIR), "" for theirs
        "model_id": model_id,
        "patch_size": patch_size,
        "chunk_size": chunk_size,
        "pieces": [p.ref() for p in pieces],
    }


# --- the round's embed stage -------------------------------------------------------------------------------------


@dataclass
class ShardedEmbedding:
    """One round's pass: the shards it sent, what it embedded itself, and what it waits for."""

    store: EmbeddingStore
    backbone: Backbone
    backbone_name: str
    patch_ids: np.ndarray
    patch_size: int
    cfg: LearnerSettings
    progress: ProgressFn | None
    should_stop: StopFn | None
    total: int  # patches of the pool
    backbone_weights: str = ""  # the project's Project.backbone_weights, sent with each shard
    stats: dict[str, Any] = field(default_factory=dict)
    results: list[AsyncResult] = field(default_factory=list)

    def run(self, shards: list[list[Piece]]) -> None:
        chunk_size = self.cfg.SHARD_PATCHES
        remaining = sum(p.missing for s in shards for p in s)
        self.stats.update(shards=len(shards), by_round=0, by_workers={})
        if len(shards) > 1:
            self._send(shards, chunk_size)
        pending = dict(enumerate(shards))
        helped: set[int] = set()
        try:
            while pending:
                check_stop(self.should_stop, "embed")
                took = False
                for s in sorted(pending, reverse=True):  # workers take from the queue's head; start at its tail
                    self._raise_if_failed(s)
                    done_before = self.total - remaining
                    share = sum(p.missing for p in pending[s])

                    def local(stage: str, fraction: float, done: int = done_before, n: int = share) -> None:
                        report(self.progress, stage, (done + fraction * n) / max(1, self.total))

                    embedded, busy = embed_pieces(
                        self.store, pending[s], self.patch_ids, self.patch_size, self.backbone, self.cfg, chunk_size,
                        progress=local, should_stop=self.should_stop,
                    )  # fmt: skip
                    self.stats["by_round"] += embedded
                    held = {id(p) for p in busy}
                    finished = [p for p in pending[s] if id(p) not in held]
                    remaining -= sum(p.missing for p in finished)
                    took = took or bool(finished)
                    if busy:
                        helped.add(s)
                        pending[s] = busy
                    else:
                        del pending[s]
                    report(self.progress, "embed", (self.total - remaining) / max(1, self.total))
                    check_stop(self.should_stop, "embed")
                if not took:
                    time.sleep(POLL_SECONDS)
        except BaseException:
            self._revoke_unstarted()
            raise
        self._credit_workers(helped)

    def _send(self, shards: list[list[Piece]], chunk_size: int) -> None:
        name = self.backbone_name
        sigs = [
            signature(
                SHARD_TASK,
                args=(shard_payload(s, name, self.store.model_id, self.patch_size, chunk_size, self.backbone_weights),),
                queue=self.cfg.SHARD_QUEUE,
                priority=ROUND_PRIORITY,
            )
            for s in shards
        ]
        try:
            self.results = list(group(sigs).apply_async().results or [])
        except Exception as exc:  # broker down: embed everything here rather than fail the round
            logger.warning("Could not send embedding shards (%s); embedding them in the round", exc)
            self.results = []

    def _raise_if_failed(self, s: int) -> None:
        if not self.results:
            return
        result = self.results[s]
        if result.state == "FAILURE":
            raise ShardFailed(str(result.result) or f"An embedding shard failed ({result.id}).")

    def _credit_workers(self, helped: set[int]) -> None:
        if not self.results:
            return
        deadline = time.monotonic() + RESULT_GRACE_SECONDS
        while time.monotonic() < deadline and not all(self.results[s].ready() for s in helped):
            time.sleep(0.1)
        by_workers: dict[str, int] = {}
        for result in self.results:
            if result.successful() and isinstance(result.result, dict) and result.result.get("embedded"):
                worker = str(result.result.get("worker") or "?")
                by_workers[worker] = by_workers.get(worker, 0) + int(result.result["embedded"])
        self.stats["by_workers"] = by_workers

    def _revoke_unstarted(self) -> None:
        """The round stopped (cancelled, failed): drop its shards not started yet. (After a round that
        succeeded, its leftover messages are no-ops and are left to run, so a redelivery still lands.)"""
        waiting = [r.id for r in self.results if not r.ready()]
        if waiting:
            try:
                current_app.control.revoke(waiting)
            except Exception:
                logger.warning("Could not revoke %d embedding shards", len(waiting), exc_info=True)


def embed_pool_sharded(
    patch_size: int,
    patch_ids: np.ndarray,
    slide_ids: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    size: np.ndarray,
    backbone: Backbone,
    backbone_name: str,
    cfg: LearnerSettings,
    *,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    stats: dict[str, Any] | None = None,
    backbone_weights: str = "",
) -> Rows:
    """``embedding.pool_embeddings`` spread over every worker on ``cfg.SHARD_QUEUE``; ``stats`` gets the
    pass's counts (patches, missing, shards, embedded by the round and by each worker)."""
    stats = {} if stats is None else stats
    store = store_for(backbone, patch_size, cfg)
    groups, todo = lookup_groups(store, patch_size, slide_ids, x, y, size, should_stop)
    n = len(patch_ids)
    stats.update(patches=n, missing=todo)
    report(progress, "embed", (n - todo) / max(1, n))
    if todo:
        pieces: list[Piece] = []
        for key, idx, xy, rows in groups:
            missing = rows < 0
            if not missing.any():
                continue
            sid, psize = int(slide_ids[idx[0]]), int(size[idx[0]])
            for piece in split(key, sid, psize, patch_ids[idx], xy, cfg.SHARD_PATCHES):
                piece.missing = int(missing[piece.idx].sum())
                piece.idx = idx[piece.idx]  # pool indices
                if piece.missing:
                    pieces.append(piece)
        run = ShardedEmbedding(
            store, backbone, backbone_name, patch_ids, patch_size, cfg, progress, should_stop, n, backbone_weights
        )
        run.stats = stats
        run.run(pack(pieces, cfg.SHARD_PATCHES))
        groups, todo = lookup_groups(store, patch_size, slide_ids, x, y, size, should_stop)
        if todo:
            raise LearnerError(
                f"{todo} patches are still missing from the embedding store under {store.root} after every shard "
                "finished; check its disk."
            )
    return group_rows(store, groups, n, cfg)
