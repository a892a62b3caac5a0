"""Tiles, tile source, thumbnail, region and patch images: pixels and caching headers (who may see
them: test_slides_access.py)."""

from __future__ import annotations

import pytest
from PIL import Image

from annotations.models import Patch
from annotations.slides import tiles

from . import test_slides_support as support
from .test_slides_support import CMU, ingest_file, jpeg, shared_slide

pytestmark = pytest.mark.django_db

# Fixtures shared with the other slide test modules.
_fresh_access_cache = support._fresh_access_cache
media = support.media
world, project, tcga, viewer = support.world, support.project, support.tcga, support.viewer


def test_the_tile_source_describes_the_pyramid_for_openseadragon(tcga, viewer):  # type: ignore[no-untyped-def]
    info = viewer.get(f"/api/v1/slides/{tcga.pk}/tilesource").json()
    assert info["width"] == 4443 and info["height"] == 3567
    assert info["tileWidth"] == info["tileHeight"] == info["tileSize"] == 256
    assert info["minLevel"] == 0
    assert info["maxLevel"] == info["levels"] - 1 == 5  # 4443 px / 256 px -> 18 tiles -> 2^5 > 18
    assert info["tileUrlTemplate"] == f"/api/v1/slides/{tcga.pk}/tiles/{{z}}/{{x}}/{{y}}.jpeg"
    assert info["magnification"] is None


def test_it_serves_tiles_at_several_levels_with_edges_cropped(tcga, viewer):  # type: ignore[no-untyped-def]
    base = f"/api/v1/slides/{tcga.pk}/tiles"
    assert jpeg(viewer.get(f"{base}/0/0/0.jpeg")).size == (138, 111)  # whole slide / 32, rounded down
    assert jpeg(viewer.get(f"{base}/3/1/1.jpeg")).size == (256, 256)
    assert jpeg(viewer.get(f"{base}/5/0/0.jpeg")).size == (256, 256)
    assert jpeg(viewer.get(f"{base}/5/17/13.jpeg")).size == (4443 - 17 * 256, 3567 - 13 * 256)


def test_tiles_carry_a_strong_etag_and_immutable_caching_and_answer_304(tcga, viewer):  # type: ignore[no-untyped-def]
    url = f"/api/v1/slides/{tcga.pk}/tiles/4/2/3.jpeg"
    first = viewer.get(url)
    tag = first["ETag"]
    assert tag.startswith('"') and not tag.startswith("W/")
    assert tcga.checksum[:32] in tag and "4-2-3" in tag
    assert first["Cache-Control"] == "private, max-age=31536000, immutable"

    again = viewer.get(url, HTTP_IF_NONE_MATCH=tag)
    assert again.status_code == 304
    assert again.content == b""
    assert again["ETag"] == tag
    assert viewer.get(url, HTTP_IF_NONE_MATCH=f'"other", W/{tag}').status_code == 304
    assert viewer.get(url, HTTP_IF_NONE_MATCH='"something-else"').status_code == 200
    assert viewer.get(f"/api/v1/slides/{tcga.pk}/tiles/4/3/2.jpeg")["ETag"] != tag


@pytest.mark.parametrize("tile", ["6/0/0", "5/18/0", "5/0/14", "0/1/0", "99999999999/0/0", "2/99999999999/0"])
def test_tiles_outside_the_pyramid_are_404(tcga, viewer, tile):  # type: ignore[no-untyped-def]
    response = viewer.get(f"/api/v1/slides/{tcga.pk}/tiles/{tile}.jpeg")
    assert response.status_code == 404
    assert "There is no tile" in response.json()["detail"]


def test_tiles_are_read_only(tcga, viewer):  # type: ignore[no-untyped-def]
    assert viewer.post(f"/api/v1/slides/{tcga.pk}/tiles/0/0/0.jpeg").status_code == 405


def test_the_thumbnail_is_served_with_caching_headers(tcga, viewer):  # type: ignore[no-untyped-def]
    response = viewer.get(f"/api/v1/slides/{tcga.pk}/thumbnail.jpeg")
    assert max(jpeg(response).size) == 512
    assert response["Cache-Control"] == "private, max-age=31536000, immutable"
    url = f"/api/v1/slides/{tcga.pk}/thumbnail.jpeg"
    assert viewer.get(url, HTTP_IF_NONE_MATCH=response["ETag"]).status_code == 304


def test_the_region_endpoint_reads_level_0_pixels_scaled_to_max_size(tcga, viewer):  # type: ignore[no-untyped-def]
    base = f"/api/v1/slides/{tcga.pk}/region.jpeg"
    assert jpeg(viewer.get(f"{base}?left=1000&top=1000&width=300&height=200")).size == (300, 200)
    assert jpeg(viewer.get(f"{base}?left=0&top=0&width=4000&height=2000&max_size=500")).size == (500, 250)
    # Clamped to the slide: only the 43 x 67 px inside it come back.
    assert jpeg(viewer.get(f"{base}?left=4400&top=3500&width=1000&height=1000")).size == (43, 67)
    response = viewer.get(f"{base}?left=100&top=100&width=50&height=50")
    assert response["ETag"] and response["Cache-Control"] == "private, max-age=31536000, immutable"


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("top=0&width=10&height=10", "'left' parameter is required"),
        ("left=abc&top=0&width=10&height=10", "'left' parameter must be a whole number"),
        ("left=-5&top=0&width=10&height=10", "'left' parameter must be between 0"),
        ("left=0&top=0&width=0&height=10", "'width' parameter must be between 1"),
        ("left=0&top=0&width=10&height=10&max_size=5000", "'max_size' parameter must be between 1 and 4096"),
        ("left=5000&top=0&width=10&height=10", "The region lies outside the slide, which is 4443 x 3567 pixels."),
    ],
)
def test_the_region_endpoint_answers_400_for_bad_parameters(tcga, viewer, query, words):  # type: ignore[no-untyped-def]
    response = viewer.get(f"/api/v1/slides/{tcga.pk}/region.jpeg?{query}")
    assert response.status_code == 400
    assert words in response.json()["detail"]


def test_the_patch_image_is_the_projects_patch_size_with_optional_context(tcga, viewer):  # type: ignore[no-untyped-def]
    patch = tcga.patches.order_by("-tissue_fraction").first()
    url = f"/api/v1/patches/{patch.pk}/image.jpeg"
    assert jpeg(viewer.get(url)).size == (224, 224)
    assert jpeg(viewer.get(url + "?context=0.5")).size == (448, 448)
    assert jpeg(viewer.get(url + "?context=16")).size == (256, 256)
    plain, wider = viewer.get(url), viewer.get(url + "?context=0.5")
    assert plain["ETag"] != wider["ETag"]
    assert viewer.get(url, HTTP_IF_NONE_MATCH=plain["ETag"]).status_code == 304
    assert viewer.get(url + "?context=banana").status_code == 400
    assert viewer.get(url + "?context=-1").status_code == 400
    assert viewer.get(url + "?context=1000").status_code == 400
    assert viewer.get("/api/v1/patches/987654321/image.jpeg").status_code == 404


NOT_A_NUMBER = "The 'context' parameter must be a number: a fraction of the patch below 1, or pixels."
TOO_WIDE = "The 'context' margin may be at most 448 px."


@pytest.mark.parametrize(
    ("context", "detail"),
    [
        ("inf", TOO_WIDE),
        ("Infinity", TOO_WIDE),
        ("1e400", TOO_WIDE),
        ("9" * 400, TOO_WIDE),
        ("1e300", TOO_WIDE),
        ("449", TOO_WIDE),
        ("nan", NOT_A_NUMBER),
        ("-nan", NOT_A_NUMBER),
        ("-inf", NOT_A_NUMBER),
        ("-1e400", NOT_A_NUMBER),
        ("-1", NOT_A_NUMBER),
        ("banana", NOT_A_NUMBER),
    ],
)
def test_the_patch_image_answers_400_for_a_context_that_is_not_a_usable_margin(tcga, viewer, context, detail):  # type: ignore[no-untyped-def]
    # inf and 1e400 used to reach round() and raise OverflowError (a 500).
    patch = tcga.patches.order_by("-tissue_fraction").first()
    response = viewer.get(f"/api/v1/patches/{patch.pk}/image.jpeg", {"context": context})
    assert response.status_code == 400
    assert response.json() == {"detail": detail}


@pytest.mark.parametrize("context", [float("inf"), float("-inf"), float("nan"), -0.5])
def test_context_margin_refuses_what_is_not_a_finite_non_negative_number(context):  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="finite number, not negative"):
        tiles.context_margin(context, 224)


def test_the_largest_context_margin_is_still_served(tcga, viewer):  # type: ignore[no-untyped-def]
    patch = tcga.patches.order_by("-tissue_fraction").first()
    assert jpeg(viewer.get(f"/api/v1/patches/{patch.pk}/image.jpeg", {"context": "448"})).size == (1120, 1120)


def test_read_patch_returns_the_same_pixels_as_the_region_it_covers(tcga):  # type: ignore[no-untyped-def]
    patch = Patch.objects.select_related("slide", "project").filter(slide=tcga).first()
    image = tiles.read_patch(patch)
    assert image.size == (224, 224) and image.mode == "RGB"
    region = tiles.read_region(tiles.slide_path(tcga), patch.x, patch.y, patch.size, patch.size, out_size=(224, 224))
    assert list(image.getdata()) == list(region.getdata())
    with_context = tiles.read_patch(patch, context=0.25)
    assert with_context.size == (336, 336)
    # The centre of the context image is the patch itself (up to resampling).
    centre = with_context.crop((56, 56, 280, 280))
    difference = sum(
        abs(a - b) for p, q in zip(image.getdata(), centre.getdata(), strict=True) for a, b in zip(p, q, strict=True)
    )
    assert difference / (224 * 224 * 3) < 12


def test_read_patch_pads_the_outside_of_a_small_image_with_white(media, project, tmp_path):  # type: ignore[no-untyped-def]
    from skimage import data

    path = tmp_path / "small.png"
    Image.fromarray(data.immunohistochemistry()[:150, :150]).save(path)
    slide = ingest_file(project, path)
    patch = Patch.objects.select_related("slide", "project").get(slide=slide)
    image = tiles.read_patch(patch)
    assert image.size == (224, 224)
    assert image.getpixel((200, 200)) == (255, 255, 255)
    assert image.getpixel((10, 10)) != (255, 255, 255)


@pytest.mark.parametrize(
    ("name", "tile"),
    [
        ("kidney-48-5.tif", (1493, 256)),  # strip-organised TIFF: wide, non-square tiles
        ("small_vectra.qptiff", (1024, 1024)),
        ("boxes_0.dcm", (16, 16)),
        ("small_HE_levels.tiff", (64, 64)),
        (CMU, (240, 240)),
    ],
)
def test_every_format_serves_tiles_at_every_level(media, project, viewer, name, tile):  # type: ignore[no-untyped-def]
    slide = ingest_file(project, shared_slide(name))
    info = viewer.get(f"/api/v1/slides/{slide.pk}/tilesource").json()
    assert (info["tileWidth"], info["tileHeight"]) == tile
    for z in range(info["levels"]):
        image = jpeg(viewer.get(f"/api/v1/slides/{slide.pk}/tiles/{z}/0/0.jpeg"))
        assert image.size[0] <= tile[0] and image.size[1] <= tile[1]
    jpeg(viewer.get(f"/api/v1/slides/{slide.pk}/thumbnail.jpeg"))


def test_sources_come_from_large_images_cache_not_reopened_per_request(tcga):  # type: ignore[no-untyped-def]
    path = tiles.slide_path(tcga)
    assert tiles.open_source(path) is tiles.open_source(path)
