"""A project's patches as the learner sees them: their pixels, their embedding store, the platform's
backbone and the one embed step that rounds, the simulation and the benchmarks share.

Everything that decides which vector a patch gets (backbone name and weights, multiscale pooling, input
size, TTA, the store's slide key) is decided here, so a simulation's source pass fills exactly the store
entries a round later reads.

Embeddings are stored per slide (``learner.core.embedding_store``): one array file per (embedding model,
slide checksum, patch geometry), never one file per patch. A pool's embeddings are handed to the stages as
``Rows`` read chunk by chunk; a pool small enough (``LEARNER["EMBEDDINGS_IN_MEMORY_MB"]``) is read into
memory once, as rounds always did.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from PIL import Image

from annotations.models import Consensus, Patch, Project, Slide
from annotations.slides import tiles
from learner.core.backbone import Backbone, create_backbone
from learner.core.config import BackboneSpec
from learner.core.data import LazyImages
from learner.core.embedding_store import EmbeddingStore, Rows, SlideRows
from learner.core.embeddings import embed, embedding_model_id
from learner.core.errors import LearnerError, ProgressFn, StopFn, check_stop, report

from . import inference
from .conf import LearnerSettings, project_weights
from .locks import slide_file_lock
from .store_paths import cache_dir, slide_key

__all__ = ["cache_dir", "slide_key"]  # re-exported: their home is store_paths (no torch), callers import them here

# Larger patches are resized to the backbone's usual input rather than embedded at full size.
MAX_NATIVE_SIZE = 256
RESIZED_TO = 224
# Patch rows loaded (and their pixels embedded) at a time when a slide's embeddings are missing.
PIXEL_CHUNK = 1024


class PatchReadError(LearnerError):
    """A patch's pixels could not be read: the message names the slide, so a round can say which one."""


def read_patch_pixels(patch: Patch) -> Image.Image:
    """``tiles.read_patch``, with a failure (a corrupt or truncated tile, a file gone) turned into a sentence
    naming the slide and the position."""
    try:
        return tiles.read_patch(patch)
    except Exception as exc:
        raise PatchReadError(
            f"Slide '{patch.slide.name}' (id {patch.slide_id}) could not be read at ({patch.x}, {patch.y}): "
            f"{exc.__class__.__name__}: {exc}. The file may be corrupt or truncated; replace the slide."
        ) from exc


def patch_images(patches: list[Patch]) -> LazyImages:
    """The patches' pixels, read from their slides when asked for (``select_related("slide", "project")``)."""
    return LazyImages(
        lambda i: read_patch_pixels(patches[i]),
        len(patches),
        locality=inference.locality(patches),
        worker_init=inference.drop_slide_handles,
    )


def load_patches(patch_ids: np.ndarray) -> list[Patch]:
    """Patch rows (with slide and project) for these ids, in the order given: for reading pixels."""
    by_id = Patch.objects.select_related("slide", "project").in_bulk([int(i) for i in patch_ids])
    return [by_id[int(i)] for i in patch_ids]


def image_size(patch_size: int, backbone: Backbone | None = None) -> int:
    """The side a project's patches are fed to the network at: a transformer's own input size (its patch grid
    and position embeddings are built for it), else the patch's side up to MAX_NATIVE_SIZE."""
    if backbone is not None and backbone.input_size is not None:
        return backbone.input_size
    return patch_size if patch_size <= MAX_NATIVE_SIZE else RESIZED_TO


def backbone_spec(name: str, cfg: LearnerSettings, weights: str = "") -> BackboneSpec:
    """``weights`` is the project's own (``Project.backbone_weights``, under PRETRAINED_DIR); "" is the platform's."""
    try:
        resolved = project_weights(weights, cfg)
    except ValueError as exc:
        raise LearnerError(str(exc)) from exc
    return BackboneSpec(name=name, weights=resolved, multiscale=cfg.MULTISCALE)


def platform_backbone(name: str, cfg: LearnerSettings, weights: str = "") -> Backbone:
    """The feature extractor a round of a project with backbone ``name`` (and weights ``weights``) embeds with."""
    return create_backbone(backbone_spec(name, cfg, weights))


def project_backbone(project: Project, cfg: LearnerSettings) -> Backbone:
    return platform_backbone(project.backbone, cfg, project.backbone_weights)


def store_for(backbone: Backbone, patch_size: int, cfg: LearnerSettings) -> EmbeddingStore:
    model_id = embedding_model_id(backbone, image_size(patch_size, backbone), cfg.TTA)
    return EmbeddingStore(
        cache_dir(cfg) / "slides",
        model_id,
        backbone.num_features,
        write_lock=lambda key: slide_file_lock(model_id, key),
    )


def _slide_groups(slide_ids: np.ndarray, size: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
    """(slide id, patch size, pool indices) for each slide and geometry of the pool."""
    order = np.lexsort((size, slide_ids))
    s, z = slide_ids[order], size[order]
    bounds = np.flatnonzero((np.diff(s) != 0) | (np.diff(z) != 0)) + 1
    for part in np.split(order, bounds):
        if len(part):
            yield int(slide_ids[part[0]]), int(size[part[0]]), np.sort(part)


Group = tuple[str, np.ndarray, np.ndarray, np.ndarray]  # slide key, pool indices, their (x, y), their rows


def lookup_groups(
    store: EmbeddingStore,
    patch_size: int,
    slide_ids: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    size: np.ndarray,
    should_stop: StopFn | None = None,
) -> tuple[list[Group], int]:
    """The pool split by slide and geometry, with each patch's row in the store (-1 where missing), and
    how many are missing."""
    checksums = dict(Slide.objects.filter(pk__in=np.unique(slide_ids).tolist()).values_list("pk", "checksum"))
    groups: list[Group] = []
    todo = 0
    for i, (sid, psize, idx) in enumerate(_slide_groups(slide_ids, size)):
        key = slide_key(checksums.get(sid, ""), sid, psize, patch_size)
        xy = np.stack([x[idx], y[idx]], axis=1)
        rows = store.lookup(key, xy)
        todo += int((rows < 0).sum())
        groups.append((key, idx, xy, rows))
        if i % 100 == 99:
            check_stop(should_stop, "embed")
    return groups, todo


def group_rows(store: EmbeddingStore, groups: list[Group], n: int, cfg: LearnerSettings) -> Rows:
    """The pool's embeddings once every group's rows are known: read from the slide files (in memory when
    small enough)."""
    files = [store.vectors_file(key) for key, _, _, _ in groups]
    seg = np.empty(n, dtype=np.int32)
    row = np.empty(n, dtype=np.int64)
    for g, (_, idx, _, rows) in enumerate(groups):
        seg[idx], row[idx] = g, rows
    embeddings = SlideRows(files, seg, row, store.dim)
    if n * store.dim * 4 <= cfg.EMBEDDINGS_IN_MEMORY_MB * 2**20:
        return embeddings.in_memory()
    return embeddings


def pool_embeddings(
    patch_size: int,
    patch_ids: np.ndarray,
    slide_ids: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    size: np.ndarray,
    backbone: Backbone,
    cfg: LearnerSettings,
    *,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> Rows:
    """The pool's embeddings (row i for patch ``patch_ids[i]``), computing from the pixels only what the store
    lacks, in this process: each slide's file is written once its missing patches are all embedded, so a
    pass cancelled half-way keeps the slides it finished. A round spreads the same work over the workers
    (``learner.shards``)."""
    store = store_for(backbone, patch_size, cfg)
    groups, todo = lookup_groups(store, patch_size, slide_ids, x, y, size, should_stop)
    n = len(patch_ids)
    report(progress, "embed", (n - todo) / max(1, n))
    if todo:
        embed_missing(store, groups, patch_ids, patch_size, backbone, cfg, progress, should_stop, n - todo, n)
    return group_rows(store, groups, n, cfg)


def embed_missing(
    store: EmbeddingStore,
    groups: list[Group],
    patch_ids: np.ndarray,
    patch_size: int,
    backbone: Backbone,
    cfg: LearnerSettings,
    progress: ProgressFn | None,
    should_stop: StopFn | None,
    done_before: int,
    n: int,
) -> int:
    """Embed from the pixels the patches the store lacks, PIXEL_CHUNK at a time across slides (a pool of
    one-patch slides is batched like any other), writing each slide's file as soon as its last missing
    patch is embedded; fills in the groups' rows. Returns the rows this call added to the store."""
    missing = [np.flatnonzero(rows < 0) for _, _, _, rows in groups]
    flat_group = np.concatenate([np.full(len(m), g, dtype=np.int64) for g, m in enumerate(missing)])
    flat_k = np.concatenate([np.arange(len(m), dtype=np.int64) for m in missing])
    group_end = np.cumsum([len(m) for m in missing])  # flat offset just past each group's last missing patch
    buffers: dict[int, np.ndarray] = {}
    written = 0  # groups before this one are complete
    added = 0
    for start in range(0, len(flat_group), PIXEL_CHUNK):
        check_stop(should_stop, "embed")
        gs, ks = flat_group[start : start + PIXEL_CHUNK], flat_k[start : start + PIXEL_CHUNK]
        pool_idx = np.array([groups[g][1][missing[g][k]] for g, k in zip(gs.tolist(), ks.tolist(), strict=True)])
        vectors = embed(
            backbone,
            patch_images(load_patches(patch_ids[pool_idx])),
            image_size=image_size(patch_size, backbone),
            batch_size=cfg.EMBED_BATCH_SIZE,
            tta=cfg.TTA,
            device=cfg.DEVICE,
            should_stop=should_stop,
            **inference.embed_options(cfg),
        )
        for g in np.unique(gs).tolist():
            buffer = buffers.setdefault(g, np.empty((len(missing[g]), store.dim), dtype=np.float32))
            buffer[ks[gs == g]] = vectors[gs == g]
        end = start + len(gs)
        while written < len(groups) and group_end[written] <= end:
            if len(missing[written]):
                key, _, xy, rows = groups[written]
                added += store.put_slide(key, xy[missing[written]], buffers.pop(written))
                rows[:] = store.lookup(key, xy)
                if (rows < 0).any():
                    raise LearnerError(f"The embedding store under {store.root} could not be written; check its disk.")
            written += 1
        report(progress, "embed", (done_before + end) / max(1, n))
    return added


def _geometry(patches: list[Patch]) -> tuple[np.ndarray, ...]:
    return tuple(
        np.array([getattr(p, f) for p in patches], dtype=np.int64) for f in ("pk", "slide_id", "x", "y", "size")
    )


def embed_patches(
    patches: list[Patch],
    backbone: Backbone,
    cfg: LearnerSettings,
    *,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> np.ndarray:
    """Embeddings (N, features) in memory of ``patches`` (all of one project), computing only what the
    store lacks. For a pool of any size, rounds use ``pool_embeddings``."""
    if not patches:
        return np.zeros((0, backbone.num_features), dtype=np.float32)
    rows = pool_embeddings(
        patches[0].project.patch_size, *_geometry(patches), backbone, cfg, progress=progress, should_stop=should_stop
    )
    return rows.take(np.arange(len(patches)))


def write_synthetic_embeddings(
    project: Project, backbone: Backbone, cfg: LearnerSettings, *, seed: int = 0, spread: float = 0.05
) -> int:
    """Fill the store for every patch of the project's ready slides with synthetic vectors, for benchmarks
    that time a round without pixels: one Gaussian cluster per class (the patch's final consensus label
    where it has one, else a class drawn from the patch id and ``seed``), unit noise around centres
    ``spread`` apart per feature, so a head trained on them learns something. Returns the patches written.
    """
    n_classes = project.label_classes.count()
    if n_classes < 1:
        raise LearnerError("The project needs label classes before synthetic embeddings can be clustered by label.")
    store = store_for(backbone, project.patch_size, cfg)
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, spread, size=(n_classes, store.dim)).astype(np.float32)
    order = {name: i for i, name in enumerate(project.label_classes.order_by("order").values_list("name", flat=True))}
    final = (Consensus.Status.AGREED, Consensus.Status.EXPERT)
    labelled = dict(
        Consensus.objects.filter(project=project, status__in=final, label__isnull=False).values_list(
            "patch_id", "label__name"
        )
    )
    written = 0
    slides = Slide.objects.filter(project=project, status=Slide.Status.READY).values_list("pk", "checksum")
    for sid, checksum in slides.iterator():
        rows = np.array(
            Patch.objects.filter(slide_id=sid).order_by("id").values_list("id", "x", "y", "size"), dtype=np.int64
        ).reshape(-1, 4)
        for psize in np.unique(rows[:, 3]):
            part = rows[rows[:, 3] == psize]
            ids = part[:, 0]
            cls = (ids * 2654435761 + seed) % n_classes  # a fixed class per patch for the unlabelled
            for i, pid in enumerate(ids.tolist()):
                if pid in labelled:
                    cls[i] = order[labelled[pid]]
            vectors = np.random.default_rng([seed, sid, int(psize)]).standard_normal((len(ids), store.dim), np.float32)
            vectors += centres[cls]
            store.put_slide(slide_key(checksum, sid, int(psize), project.patch_size), part[:, 1:3], vectors)
            written += len(ids)
    return written
