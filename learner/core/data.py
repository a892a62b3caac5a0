"""Image sources, preprocessing, H&E augmentation and optional stain normalisation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

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
    """Images produced on demand by `load(i)`, e.g. patches read from a slide by the Django side."""

    load: Callable[[int], Image.Image]
    length: int

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
