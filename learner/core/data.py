"""Image sources, preprocessing, H&E augmentation and optional stain normalisation."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from learner.core.backbone import Normalisation
from learner.core.config import AugmentConfig, StainMethod
from learner.core.errors import LearnerError


@runtime_checkable
class ImageSource(Protocol):
    """Anything with a length that returns a PIL image by index: a list of images, `LazyImages`, ..."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> Image.Image: ...


@dataclass(frozen=True)
class LazyImages:
    """Images produced on demand by `load(i)`, e.g. patches read from a slide by the Django side.

    `locality(i)` (optional) is a sort key that puts images stored near each other next to each other,
    e.g. (slide, y, x): a pass reads in that order, so neighbouring patches come from tiles just decoded.
    `worker_init()` (optional) runs first in each reader worker process (e.g. to drop file handles that
    the fork copied from the parent, whose shared offsets would mix up reads).
    """

    load: Callable[[int], Image.Image]
    length: int
    locality: Callable[[int], Any] | None = None
    worker_init: Callable[[], None] | None = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Image.Image:
        if not 0 <= index < self.length:
            raise IndexError(index)
        return self.load(index)


def image_files(paths: Sequence[str | Path]) -> LazyImages:
    """Image files opened lazily, one at a time, as RGB."""
    items = [Path(p) for p in paths]

    def load(i: int) -> Image.Image:
        with Image.open(items[i]) as img:
            return img.convert("RGB")

    return LazyImages(load, len(items))


def as_source(images: ImageSource | Sequence[Image.Image]) -> ImageSource:
    if not isinstance(images, ImageSource):
        raise LearnerError("Images must be a sequence of PIL images or a LazyImages(load, length).")
    return images


# --- stain normalisation -------------------------------------------------------------------------------------------

StainNormaliser = Callable[[Image.Image], Image.Image]


def stain_normaliser(method: StainMethod, target: Image.Image) -> StainNormaliser:
    """A PIL -> PIL stain normaliser fitted to `target` (torchstain Macenko or Reinhard).

    Macenko fails on patches with little tissue (too few stained pixels for its eigen-decomposition);
    those are passed through unchanged rather than failing a whole training round.
    """
    import torchstain

    if method == "macenko":
        normaliser = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    elif method == "reinhard":
        normaliser = torchstain.normalizers.ReinhardNormalizer(backend="torch")
    else:
        raise LearnerError(f"Unknown stain normalisation '{method}'. Use 'macenko' or 'reinhard'.")
    normaliser.fit(_to_chw_uint8(target))

    def apply(img: Image.Image) -> Image.Image:
        if np.asarray(img).std() < 1.0:  # blank patch: both methods divide by a zero spread
            return img
        try:
            if method == "macenko":
                arr = normaliser.normalize(_to_chw_uint8(img), stains=False)[0].numpy()  # HWC
            else:
                arr = normaliser.normalize(_to_chw_uint8(img)).numpy()  # HWC
        except Exception:
            return img
        return Image.fromarray(np.ascontiguousarray(np.clip(arr, 0, 255).astype(np.uint8)))

    return apply


def _to_chw_uint8(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


# --- tensors -------------------------------------------------------------------------------------------------------


def to_tensor(img: Image.Image, image_size: int) -> torch.Tensor:
    """PIL image -> float tensor CHW in [0, 1], resized to `image_size` square."""
    img = img.convert("RGB")
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def normalise(batch: torch.Tensor, norm: Normalisation) -> torch.Tensor:
    mean = torch.tensor(norm.mean, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(norm.std, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
    return (batch - mean) / std


def load_batch(
    images: ImageSource,
    indices: Sequence[int],
    image_size: int,
    stain: StainNormaliser | None = None,
) -> torch.Tensor:
    """Unnormalised [0, 1] batch NCHW."""
    tensors = []
    for i in indices:
        img = images[int(i)]
        if stain is not None:
            img = stain(img)
        tensors.append(to_tensor(img, image_size))
    return torch.stack(tensors)


def read_order(images: ImageSource, indices: Sequence[int]) -> list[int]:
    """`indices` in the order they are best read: by the source's locality key when it has one (stable)."""
    key = getattr(images, "locality", None)
    if key is None:
        return [int(i) for i in indices]
    return sorted((int(i) for i in indices), key=key)


# --- parallel reading ----------------------------------------------------------------------------------------------

ReaderKind = Literal["serial", "threads", "processes"]
READERS: tuple[str, ...] = ("serial", "threads", "processes")


@dataclass(frozen=True)
class Reader:
    """How a pass decodes its images: in the calling thread, in a pool of threads (the slide decoders,
    libjpeg/OpenJPEG via large-image and tifffile, release the GIL) or in DataLoader worker processes.
    `prefetch` batches are decoded ahead of the one being embedded, so decoding overlaps the forward pass;
    `pin` puts each batch in page-locked memory (for an asynchronous copy to a GPU)."""

    kind: ReaderKind = "serial"
    workers: int = 2
    prefetch: int = 2
    pin: bool = False

    def __post_init__(self) -> None:
        if self.kind not in READERS:
            raise LearnerError(f"Unknown patch reader '{self.kind}'. Use one of {', '.join(READERS)}.")
        if self.workers < 1 or self.prefetch < 1:
            raise LearnerError("A patch reader needs at least one worker and one batch of prefetch.")


def read_batches(
    images: ImageSource,
    chunks: Sequence[Sequence[int]],
    image_size: int,
    stain: StainNormaliser | None = None,
    reader: Reader | None = None,
) -> Iterator[torch.Tensor]:
    """The unnormalised [0, 1] NCHW batch of each chunk of indices, in the order of `chunks`."""
    reader = reader or Reader()
    if reader.kind == "serial":
        batches: Iterator[torch.Tensor] = (load_batch(images, chunk, image_size, stain) for chunk in chunks)
    elif reader.kind == "threads":
        batches = _thread_batches(images, chunks, image_size, stain, reader)
    else:
        batches = _process_batches(images, chunks, image_size, stain, reader)
    if reader.pin and torch.cuda.is_available() and reader.kind != "processes":  # the DataLoader pins its own
        batches = (batch.pin_memory() for batch in batches)
    return batches


def _thread_batches(
    images: ImageSource, chunks: Sequence[Sequence[int]], image_size: int, stain: StainNormaliser | None, reader: Reader
) -> Iterator[torch.Tensor]:
    """One task per image on a thread pool, `prefetch` chunks submitted ahead; stacked in order."""

    def one(i: int) -> torch.Tensor:
        img = images[i]
        return to_tensor(stain(img) if stain is not None else img, image_size)

    with ThreadPoolExecutor(reader.workers, thread_name_prefix="patch-reader") as pool:
        pending: list[list[Future[torch.Tensor]]] = []
        try:
            for chunk in chunks:
                pending.append([pool.submit(one, int(i)) for i in chunk])
                if len(pending) > reader.prefetch:
                    yield torch.stack([f.result() for f in pending.pop(0)])
            while pending:
                yield torch.stack([f.result() for f in pending.pop(0)])
        finally:
            for futures in pending:  # a pass stopped early: do not decode what nobody will read
                for future in futures:
                    future.cancel()


class _Chunks(torch.utils.data.Dataset[torch.Tensor]):
    def __init__(
        self, images: ImageSource, chunks: Sequence[Sequence[int]], image_size: int, stain: StainNormaliser | None
    ) -> None:
        self.images, self.chunks, self.image_size, self.stain = images, chunks, image_size, stain

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, j: int) -> torch.Tensor:
        return load_batch(self.images, self.chunks[j], self.image_size, self.stain)


def _process_batches(
    images: ImageSource, chunks: Sequence[Sequence[int]], image_size: int, stain: StainNormaliser | None, reader: Reader
) -> Iterator[torch.Tensor]:
    """A DataLoader whose worker processes (forked: the source need not pickle) each decode whole chunks."""
    init = getattr(images, "worker_init", None)

    def worker_init(_worker: int) -> None:
        torch.set_num_threads(1)
        if init is not None:
            init()

    loader = torch.utils.data.DataLoader(
        _Chunks(images, chunks, image_size, stain),
        batch_size=None,
        shuffle=False,
        num_workers=min(reader.workers, max(1, len(chunks))),
        prefetch_factor=reader.prefetch,
        pin_memory=reader.pin and torch.cuda.is_available(),
        worker_init_fn=worker_init,
        multiprocessing_context="fork",
        persistent_workers=False,
    )
    yield from loader


def dihedral(batch: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th (0..7) element of the dihedral group D4 on the last two dims: k%4 quarter turns, flip if k>=4."""
    out = torch.rot90(batch, k % 4, dims=(-2, -1))
    return torch.flip(out, dims=(-1,)) if k >= 4 else out


# --- HED stain jitter ----------------------------------------------------------------------------------------------
# Same colour deconvolution as skimage.color.rgb2hed / hed2rgb (Ruifrok & Johnston), on torch tensors in batch.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)
_LOG_ADJUST = float(np.log(1e-6))


def rgb_to_hed(rgb: torch.Tensor, clip: bool = True) -> torch.Tensor:
    """NCHW (or CHW) RGB in [0, 1] -> stain concentrations; with `clip` exactly skimage.color.rgb2hed.

    skimage clips negative concentrations to 0, which makes the round trip lossy; augmentation keeps
    them (`clip=False`) so that zero jitter returns the input image.
    """
    m = torch.as_tensor(_HED_FROM_RGB, dtype=rgb.dtype, device=rgb.device)
    od = torch.log(rgb.clamp_min(1e-6)) / _LOG_ADJUST
    hed = torch.einsum("...chw,cd->...dhw", od, m)
    return hed.clamp_min(0) if clip else hed


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """Inverse of `rgb_to_hed`, matching skimage.color.hed2rgb."""
    m = torch.as_tensor(_RGB_FROM_HED, dtype=hed.dtype, device=hed.device)
    log_rgb = torch.einsum("...chw,cd->...dhw", hed * _LOG_ADJUST, m)
    return torch.exp(log_rgb).clamp(0, 1)


def hed_jitter(batch: torch.Tensor, scale: float, shift: float, generator: torch.Generator) -> torch.Tensor:
    """Per-image random stain perturbation in HED space (Tellez et al. 2018): hed * alpha + beta."""
    n = batch.shape[0]
    alpha = 1 + (torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1) * scale
    beta = (torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1) * shift
    hed = rgb_to_hed(batch, clip=False)
    return hed_to_rgb(hed * alpha.to(batch) + beta.to(batch))


def colour_jitter(batch: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    n = batch.shape[0]

    def factor(strength: float) -> torch.Tensor:
        return (1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * strength).to(batch)

    out = batch * factor(cfg.brightness)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * factor(cfg.contrast) + mean
    grey = (out * torch.tensor([0.299, 0.587, 0.114], device=batch.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    out = (out - grey) * factor(cfg.saturation) + grey
    return out.clamp(0, 1)


def augment(batch: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Training augmentation on an unnormalised [0, 1] NCHW batch (CPU tensors; cheap next to the model)."""
    if cfg.dihedral:
        ks = torch.randint(0, 8, (batch.shape[0],), generator=generator).tolist()
        batch = torch.stack([dihedral(img, k) for img, k in zip(batch, ks, strict=True)])
    if cfg.hed_scale > 0 or cfg.hed_shift > 0:
        batch = hed_jitter(batch, cfg.hed_scale, cfg.hed_shift, generator)
    if cfg.brightness > 0 or cfg.contrast > 0 or cfg.saturation > 0:
        batch = colour_jitter(batch, cfg, generator)
    return batch
