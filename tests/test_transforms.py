"""Augmentation without torchvision (data/transforms.py): each operation equals the Pillow calls torchvision's PIL
path makes, the crop sampler keeps its contract, and a sample's draws depend on (seed, epoch, key) only.

scripts/check_transforms_torchvision.py compares the same operations with torchvision itself."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from inflora_dist.data.transforms import (
    TRANSFORMS,
    build_transform,
    center_crop,
    crop,
    hflip,
    random_resized_crop_params,
    resize,
    resized_crop,
    resized_output_size,
    sample_rng,
    to_array,
)

SIZES = [(500, 375), (240, 320), (100, 90)]  # (width, height): landscape, portrait, small and almost square


def _picture(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth gradients plus noise: something JPEG compresses like a photo, with a distinct left and right."""
    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(seed).integers(0, 40, (height, width, 3))
    rgb = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin(x / 7.0 + y / 11.0)], axis=-1)
    return np.clip(rgb * 0.8 + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> dict[tuple[int, int], Image.Image]:
    """Real JPEG files of each size in SIZES, read back as RGB."""
    root = tmp_path_factory.mktemp("jpegs")
    images = {}
    for i, (w, h) in enumerate(SIZES):
        path = root / f"{w}x{h}.jpg"
        Image.fromarray(_picture(w, h, i)).save(path, quality=90)
        with Image.open(path) as im:
            images[(w, h)] = im.convert("RGB")
    return images


def _same(a: Image.Image, b: Image.Image) -> None:
    assert a.size == b.size and a.mode == b.mode
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- operations against the Pillow calls torchvision makes --------------------------------------------------------


def test_resized_output_size_follows_torchvision_rule():
    """int: the shorter side becomes size, the longer int(size * long / short), truncated (298.67 -> 298)."""
    assert resized_output_size(375, 500, 224) == (224, 298)
    assert resized_output_size(320, 240, 256) == (341, 256)
    assert resized_output_size(90, 100, [256]) == (256, 284)
    assert resized_output_size(50, 50, 224) == (224, 224)
    assert resized_output_size(375, 500, (100, 120)) == (100, 120)


@pytest.mark.parametrize("size", [224, 256, 64, (100, 120)])
@pytest.mark.parametrize("interpolation", [Image.Resampling.BILINEAR, Image.Resampling.BICUBIC])
def test_resize_is_pil_resize_at_the_computed_size(jpegs, size, interpolation):
    for img in jpegs.values():
        h, w = resized_output_size(img.height, img.width, size)
        _same(resize(img, size, interpolation), img.resize((w, h), interpolation))


def test_resize_default_is_bilinear_and_same_size_is_returned_as_is(jpegs):
    img = jpegs[(500, 375)]
    _same(resize(img, 256), img.resize((341, 256), Image.Resampling.BILINEAR))
    assert resize(img, 375) is img


@pytest.mark.parametrize("box", [(0, 0, 50, 60), (100, 37, 200, 150), (7, 3, 83, 97)])
def test_crop_and_resized_crop_are_pil_crop_then_resize(jpegs, box):
    top, left, h, w = box
    for img in jpegs.values():
        expected = img.crop((left, top, left + w, top + h))
        _same(crop(img, top, left, h, w), expected)
        _same(resized_crop(img, top, left, h, w, (224, 224)), expected.resize((224, 224), Image.Resampling.BILINEAR))


def test_center_crop_offsets_round_half_to_even(jpegs):
    """Offsets are int(round((H - h) / 2.0)): Python's round, so 75.5 -> 76, 2.5 -> 2, 7.5 -> 8."""
    img = jpegs[(500, 375)]
    _same(center_crop(img, 224), img.crop((138, 76, 138 + 224, 76 + 224)))
    small = jpegs[(100, 90)]
    _same(center_crop(small, 85), small.crop((8, 2, 8 + 85, 2 + 85)))
    _same(center_crop(small, (40, 30)), small.crop((35, 25, 35 + 30, 25 + 40)))


def test_center_crop_pads_a_smaller_image_with_zeros(jpegs):
    """Padding splits (crop - size) // 2 before and (crop - size + 1) // 2 after, per side that is too small."""
    small = jpegs[(100, 90)]
    pixels = np.asarray(small)

    def padded(h: int, w: int, top: int, left: int) -> np.ndarray:
        out = np.zeros((h, w, 3), np.uint8)
        out[top : top + 90, left : left + 100] = pixels
        return out

    np.testing.assert_array_equal(np.asarray(center_crop(small, 224)), padded(224, 224, 67, 62))
    np.testing.assert_array_equal(np.asarray(center_crop(small, (95, 105))), padded(95, 105, 2, 2))
    # Only the height is too small: pad it (15 and 15), then crop the width centrally (left 25).
    np.testing.assert_array_equal(np.asarray(center_crop(small, (120, 50))), padded(120, 100, 15, 0)[:, 25:75])
    grey = center_crop(small.convert("L"), 101)
    assert grey.mode == "L" and grey.size == (101, 101)


def test_hflip_mirrors_left_to_right(jpegs):
    for img in jpegs.values():
        np.testing.assert_array_equal(np.asarray(hflip(img)), np.asarray(img)[:, ::-1])


def test_to_array_is_float32_chw_over_255(jpegs):
    img = jpegs[(240, 320)]
    out = to_array(img)
    assert out.shape == (3, 320, 240) and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, np.asarray(img).transpose(2, 0, 1).astype(np.float32) / np.float32(255))
    assert to_array(img.convert("L")).shape == (1, 320, 240)
    assert to_array(Image.new("1", (4, 2), 1)).tolist() == [[[1.0] * 4] * 2]
    assert 0.0 <= out.min() and out.max() <= 1.0
    with pytest.raises(ValueError, match="8-bit"):
        to_array(Image.new("I;16", (4, 4)))


# --- the crop sampler ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width,height", [*SIZES, (400, 400)])
@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.05, 1.0)])
def test_crop_params_stay_inside_with_area_and_ratio_in_range(width, height, scale):
    rng = np.random.default_rng(0)
    area = width * height
    fractions, log_ratios, tops = [], [], []
    for _ in range(2000):
        top, left, h, w = random_resized_crop_params(width, height, scale, rng=rng)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
        # w and h are rounded separately: allow half a row and half a column on each side of the target.
        assert scale[0] * area - (w + h) / 2 - 1 <= h * w <= scale[1] * area + (w + h) / 2 + 1
        assert abs(np.log(w / h)) <= np.log(4 / 3) + 0.5 / w + 0.5 / h
        fractions.append(h * w / area)
        log_ratios.append(np.log(w / h))
        tops.append(top)
    # The scale and ratio ranges are covered (large crops that do not fit are redrawn: a bias by design).
    assert min(fractions) < scale[0] + 0.05 and max(fractions) > 0.8
    assert max(log_ratios) > 0.25 and min(log_ratios) < -0.25 and len(set(tops)) > 20
    if width == height:  # log-uniform ratio, and rejections symmetric: centred on 1
        assert abs(np.mean(log_ratios)) < 0.02


def test_crop_params_fall_back_to_a_central_crop_clipped_to_the_ratio():
    """No try fits (the crop is taller or wider than the image): the centre, at the ratio's bound."""
    rng = np.random.default_rng(0)
    assert random_resized_crop_params(100, 10, (0.9, 1.0), rng=rng) == (0, 43, 10, 13)  # round(10 * 4/3)
    assert random_resized_crop_params(10, 100, (0.9, 1.0), rng=rng) == (43, 0, 13, 10)  # round(10 / (3/4))
    # Within the ratio but more than the whole area: the whole image.
    assert random_resized_crop_params(50, 60, (2.0, 3.0), rng=rng) == (0, 0, 60, 50)


class _Counting:
    """A generator that records its calls (numpy's names)."""

    def __init__(self) -> None:
        self.inner, self.calls = np.random.default_rng(1), []

    def uniform(self, low: float, high: float) -> float:
        self.calls.append("uniform")
        return self.inner.uniform(low, high)

    def integers(self, low: int, high: int) -> int:
        self.calls.append("integers")
        return self.inner.integers(low, high)


def test_crop_params_draw_two_uniforms_per_try_for_ten_tries_then_two_integers():
    rng = _Counting()
    random_resized_crop_params(50, 60, (2.0, 3.0), rng=rng)
    assert rng.calls == ["uniform"] * 20
    rng = _Counting()
    random_resized_crop_params(500, 375, rng=rng)
    assert rng.calls[-2:] == ["integers"] * 2 and rng.calls.count("uniform") >= 2


def test_crop_params_take_a_stdlib_random_too():
    draws = [random_resized_crop_params(500, 375, rng=random.Random(3)) for _ in range(2)]
    assert draws[0] == draws[1]
    top, left, h, w = draws[0]
    assert top + h <= 375 and left + w <= 500


# --- recipes and seeding ------------------------------------------------------------------------------------------


def test_train_recipe_is_crop_then_flip_from_the_sample_generator(jpegs):
    """imagenet_r_train = RandomResizedCrop(224) + RandomHorizontalFlip() + ToTensor, drawing in that order."""
    img = jpegs[(500, 375)]
    transform = build_transform("imagenet_r_train", 224)
    flips = 0
    for key in [f"sample-{i}" for i in range(12)]:
        rng = sample_rng(7, 3, key)
        top, left, h, w = random_resized_crop_params(500, 375, (0.08, 1.0), rng=rng)
        expected = img.crop((left, top, left + w, top + h)).resize((224, 224), Image.Resampling.BILINEAR)
        if rng.uniform(0.0, 1.0) < 0.5:
            expected, flips = expected.transpose(Image.Transpose.FLIP_LEFT_RIGHT), flips + 1
        np.testing.assert_array_equal(transform(img, 7, 3, key), to_array(expected))
    assert 0 < flips < 12


def test_eval_recipes_are_the_references(jpegs):
    img = jpegs[(240, 320)]
    bilinear, bicubic = Image.Resampling.BILINEAR, Image.Resampling.BICUBIC
    resized = img.resize((256, 341), bilinear).crop((16, 58, 16 + 224, 58 + 224))  # round(58.5) = 58
    for name in ("imagenet_r_eval", "domainnet_eval"):
        np.testing.assert_array_equal(build_transform(name, 224)(img, 0, 0, "k"), to_array(resized))
    resized = img.resize((256, 341), bicubic).crop((16, 58, 16 + 224, 58 + 224))
    np.testing.assert_array_equal(build_transform("cub_eval", 224)(img, 0, 0, "k"), to_array(resized))
    np.testing.assert_array_equal(
        build_transform("cifar100_eval", 224)(img, 0, 0, "k"), to_array(img.resize((224, 298), bilinear))
    )
    np.testing.assert_array_equal(
        build_transform("resize", 224)(img, 0, 0, "k"), to_array(img.resize((224, 224), bilinear))
    )
    # Another image size scales the eval resize as the reference's build_transform does: int(256 / 224 * size).
    assert build_transform("imagenet_r_eval", 384)(img, 0, 0, "k").shape == (3, 384, 384)
    assert build_transform("imagenet_r_eval", 384).steps[0].size == 438


def test_every_recipe_gives_float32_chw_in_unit_range(jpegs):
    for name in TRANSFORMS:
        transform = build_transform(name, 64)
        for (w, h), img in jpegs.items():
            out = transform(img, 0, 0, "key")
            expected = (3, 64, 64) if name != "cifar100_eval" else (3, *resized_output_size(h, w, 64))
            assert out.shape == expected and out.dtype == np.float32
            assert 0.0 <= out.min() and out.max() <= 1.0


def test_same_seed_epoch_and_key_give_the_same_pixels_in_any_order(jpegs):
    img = jpegs[(500, 375)]
    keys = [f"shard-0/{i:06d}" for i in range(8)]
    first = {k: build_transform("domainnet_train", 96)(img, 5, 2, k) for k in keys}
    again = {k: build_transform("domainnet_train", 96)(img, 5, 2, k) for k in reversed(keys)}  # a fresh object
    for k in keys:
        np.testing.assert_array_equal(first[k], again[k])
    assert len({first[k].tobytes() for k in keys}) == len(keys)


def test_other_epoch_seed_or_key_give_other_crops(jpegs):
    img = jpegs[(500, 375)]
    transform = build_transform("cifar100_train", 96)
    base = transform(img, 5, 2, "a")
    for args in [(5, 3, "a"), (6, 2, "a"), (5, 2, "b")]:
        assert not np.array_equal(transform(img, *args), base), args
    params = {random_resized_crop_params(500, 375, rng=sample_rng(5, e, "a")) for e in range(10)}
    assert len(params) == 10


def test_eval_recipes_draw_nothing(jpegs):
    img = jpegs[(100, 90)]
    for name in ("imagenet_r_eval", "cifar100_eval", "domainnet_eval", "cub_eval", "resize"):
        transform = build_transform(name, 64)
        assert not transform.random
        np.testing.assert_array_equal(transform(img, 0, 0, "a"), transform(img, 9, 4, "b"))
    assert build_transform("cub_train", 64).random


def test_sample_rng_is_a_stable_hash_of_its_inputs():
    """Pinned draws: a resumed run, another process or another Python (no salted hash()) draws the same crops."""
    assert sample_rng(1, 2, "x").integers(0, 2**62) == sample_rng(1, 2, "x").integers(0, 2**62)
    assert random_resized_crop_params(500, 375, rng=sample_rng(0, 0, "a")) == (4, 72, 364, 278)
    assert random_resized_crop_params(500, 375, rng=sample_rng(1, 2, "shard-0/000001")) == (186, 88, 150, 176)
    with pytest.raises(ValueError, match="seed and epoch"):
        sample_rng(-1, 0, "x")


def test_unknown_recipe_is_named_with_the_valid_ones():
    with pytest.raises(ValueError, match="'imagenet_x'") as err:
        build_transform("imagenet_x", 224)
    assert all(name in str(err.value) for name in TRANSFORMS)
    with pytest.raises(ValueError, match="image_size"):
        build_transform("resize", 0)
