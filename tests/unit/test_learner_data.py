"""Image sources, preprocessing, dihedral transforms, HED stain jitter and stain normalisation."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.color import hed2rgb, rgb2hed

from learner.core.config import AugmentConfig
from learner.core.data import (
    LazyImages,
    augment,
    dihedral,
    hed_jitter,
    hed_to_rgb,
    image_files,
    rgb_to_hed,
    stain_normaliser,
    to_tensor,
)
from learner.core.embeddings import embed
from learner.core.errors import LearnerError

REPO = Path(__file__).resolve().parents[2]
LUNG = REPO.parent / "shared" / "data" / "lc25000_lung" / "lung_image_sets"
needs_data = pytest.mark.skipif(not LUNG.is_dir(), reason="shared LC25000 data not present")


def he_patch() -> Image.Image:
    path = LUNG / "lung_aca" / "lungaca1.jpeg"
    if path.is_file():
        return Image.open(path).convert("RGB")
    from skimage import data

    return Image.fromarray(data.immunohistochemistry()[:224, :224])


def test_rgb_to_hed_matches_skimage() -> None:
    img = he_patch()
    ours = rgb_to_hed(to_tensor(img, 224)).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, rgb2hed(np.asarray(img) / 255.0), atol=1e-5)
    hed = rgb2hed(np.asarray(img) / 255.0)
    back = hed_to_rgb(torch.from_numpy(hed).permute(2, 0, 1).float()).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(back, hed2rgb(hed), atol=1e-5)


def test_hed_jitter_of_zero_strength_returns_the_image_and_nonzero_changes_it() -> None:
    x = to_tensor(he_patch(), 64).unsqueeze(0)
    gen = torch.Generator().manual_seed(0)
    torch.testing.assert_close(hed_jitter(x, 0.0, 0.0, gen), x, atol=1e-4, rtol=0)
    jittered = hed_jitter(x.repeat(4, 1, 1, 1), 0.2, 0.05, gen)
    assert jittered.shape == (4, 3, 64, 64)
    assert float((jittered - x).abs().mean()) > 0.01
    assert not torch.allclose(jittered[0], jittered[1])  # per-image random draws


def test_dihedral_transforms_are_the_eight_distinct_symmetries() -> None:
    x = torch.arange(9.0).view(1, 1, 3, 3)
    outs = {tuple(dihedral(x, k).flatten().tolist()) for k in range(8)}
    assert len(outs) == 8
    assert torch.equal(dihedral(x, 0), x)
    assert torch.equal(dihedral(dihedral(x, 1), 3), x)


def test_augment_keeps_shape_and_range() -> None:
    x = to_tensor(he_patch(), 32).unsqueeze(0).repeat(6, 1, 1, 1)
    out = augment(x, AugmentConfig(), torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_lazy_images_load_on_demand_and_check_bounds() -> None:
    calls: list[int] = []

    def load(i: int) -> Image.Image:
        calls.append(i)
        return Image.new("RGB", (8, 8), (i, 0, 0))

    src = LazyImages(load, 3)
    assert len(src) == 3 and calls == []
    assert src[2].getpixel((0, 0)) == (2, 0, 0)
    assert calls == [2]
    with pytest.raises(IndexError):
        src[3]


@needs_data
def test_image_files_open_as_rgb() -> None:
    src = image_files([LUNG / "lung_n" / "lungn1.jpeg"])
    assert src[0].mode == "RGB" and src[0].size == (224, 224)


def test_embed_rejects_something_that_is_not_images() -> None:
    with pytest.raises(LearnerError, match="sequence of PIL images"):
        embed(None, 42)  # type: ignore[arg-type]


@needs_data
@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_stain_normalisation_moves_colours_towards_the_target(method: str) -> None:
    target = Image.open(LUNG / "lung_aca" / "lungaca1.jpeg").convert("RGB")
    source = Image.open(LUNG / "lung_n" / "lungn1.jpeg").convert("RGB")
    normalise = stain_normaliser(method, target)  # type: ignore[arg-type]
    out = normalise(source)
    assert out.size == source.size and out.mode == "RGB"
    t, s, o = (np.asarray(im, dtype=float).reshape(-1, 3).mean(0) for im in (target, source, out))
    assert np.abs(o - t).sum() < np.abs(s - t).sum()
    blank = Image.new("RGB", (32, 32), (255, 255, 255))
    assert normalise(blank) is blank  # nothing to normalise: passed through, not blackened


def test_learner_core_imports_no_django_celery_or_channels() -> None:
    forbidden = {"django", "celery", "channels", "rest_framework"}
    for path in (REPO / "learner" / "core").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not {n.split(".")[0] for n in names} & forbidden, f"{path.name} imports {names}"
