"""Image augmentation as the reference trains with: torchvision's PIL transforms, without torchvision.

The reference (liangyanshuo/InfLoRA, `utils/data.py` and `utils/data_manager.py`) composes torchvision
transforms on RGB PIL images and normalises with mean 0, std 1, i.e. not at all: a recipe here returns raw
[0, 1] pixels, and normalisation stays the model's business. Each operation below is the PIL path of
torchvision (0.29) rewritten on Pillow, so that outputs match pixel for pixel
(`scripts/check_transforms_torchvision.py` compares them with torchvision itself):

- `random_resized_crop_params`: `RandomResizedCrop.get_params` (`torchvision/transforms/transforms.py`), with
  its 10 tries, log-uniform aspect ratio and the fallback to a central crop. It draws from the generator it
  is given instead of torch's global RNG; torch computes log/exp of the ratio in float32, this in float64.
- `resized_crop`: `functional.resized_crop` = `crop` then `resize` (`torchvision/transforms/functional.py`).
- `crop`, `hflip`, resizing with `Image.resize`, padding with `ImageOps.expand`: `_functional_pil.crop`,
  `.hflip`, `.resize` and `.pad` (`torchvision/transforms/_functional_pil.py`).
- `resize`: `functional.resize` and `functional._compute_resized_output_size` (an int makes the shorter
  side `size` and the longer `int(size * long / short)`; default bilinear, which Pillow antialiases).
- `center_crop`: `functional.center_crop` (zero padding, split `//2` and `(+1)//2`, when the image is smaller
  than the crop; offsets `int(round((h - ch) / 2.0))`).
- `to_array`: `functional.to_tensor` for 8-bit images: float32 CHW, `uint8 / 255`.
- `RandomHorizontalFlip`: `transforms.RandomHorizontalFlip.forward` (flip when a uniform draw is `< p`).

Recipes (`TRANSFORMS`, `build_transform`) are the reference's per data set, with 224 replaced by
`image_size` and its eval resize 256 by `image_size * 256 // 224`; `resize` squashes any image to
`image_size` x `image_size` (bilinear), what the demo has always done. A `Transform` is called as
`transform(img, seed, epoch, sample_key)` and returns a NumPy array (C, H, W) float32 in [0, 1]. Training
recipes draw from `sample_rng(seed, epoch, sample_key)`, a generator seeded by the three (the key through
sha256), so a sample's augmentation depends on nothing else: not on the number of processes, the worker that
loads it or what was loaded before, and a resumed run draws what the uninterrupted one would have. Eval
recipes draw nothing.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image, ImageOps

BILINEAR = Image.Resampling.BILINEAR
BICUBIC = Image.Resampling.BICUBIC

#: A generator the random operations draw from: NumPy's or the standard library's.
Rng = np.random.Generator | random.Random


def _uniform(rng: Rng, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


def _randint(rng: Rng, low: int, high: int) -> int:
    """An integer in [low, high), as `torch.randint(low, high)`."""
    if isinstance(rng, random.Random):
        return rng.randrange(low, high)
    return int(rng.integers(low, high))


def _needs(rng: Rng | None) -> Rng:
    if rng is None:
        raise ValueError("a random step needs a generator (rng=None given)")
    return rng


def sample_rng(seed: int, epoch: int, sample_key: str) -> np.random.Generator:
    """The generator a sample's augmentation draws from: seeded by (seed, epoch, first 8 bytes of
    sha256(sample_key)), so the same three always give the same draws, on any process."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    key = int.from_bytes(hashlib.sha256(sample_key.encode("utf-8")).digest()[:8], "big")
    return np.random.default_rng([seed, epoch, key])


# --- operations -------------------------------------------------------------------------------------------------


def random_resized_crop_params(
    width: int,
    height: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    *,
    rng: Rng,
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering a `scale` fraction of the image's area with aspect ratio
    (w / h) log-uniform in `ratio`: up to 10 tries, then a central crop of the whole image clipped to `ratio`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(rng, scale[0], scale[1])
        aspect_ratio = math.exp(_uniform(rng, log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect_ratio))
        h = round(math.sqrt(target_area / aspect_ratio))
        if 0 < w <= width and 0 < h <= height:
            top = _randint(rng, 0, height - h + 1)
            left = _randint(rng, 0, width - w + 1)
            return top, left, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = round(w / min(ratio))
    elif in_ratio > max(ratio):
        h = height
        w = round(h * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop(img: Image.Image, top: int, left: int, height: int, width: int) -> Image.Image:
    """The `height` x `width` box at (top, left); parts outside the image are zero (Pillow's crop)."""
    return img.crop((left, top, left + width, top + height))


def resized_output_size(height: int, width: int, size: int | Sequence[int]) -> tuple[int, int]:
    """(h, w) `resize` produces: for an int (or a 1-sequence) the shorter side becomes `size` and the longer
    `int(size * long / short)`; a pair (h, w) is used as is."""
    if isinstance(size, int) or len(size) == 1:
        short_new = size if isinstance(size, int) else int(size[0])
        short, long = (width, height) if width <= height else (height, width)
        long_new = int(short_new * long / short)
        return (long_new, short_new) if width <= height else (short_new, long_new)
    if len(size) != 2:
        raise ValueError(f"size must be an int or a 1 or 2 element sequence, got {size!r}")
    return int(size[0]), int(size[1])


def resize(img: Image.Image, size: int | Sequence[int], interpolation: int = BILINEAR) -> Image.Image:
    """`img` resized to `resized_output_size(...)`; unchanged when it already has that size."""
    h, w = resized_output_size(img.height, img.width, size)
    if (h, w) == (img.height, img.width):
        return img
    return img.resize((w, h), interpolation)


def resized_crop(
    img: Image.Image,
    top: int,
    left: int,
    height: int,
    width: int,
    size: int | Sequence[int],
    interpolation: int = BILINEAR,
) -> Image.Image:
    """`crop` then `resize` to `size`."""
    return resize(crop(img, top, left, height, width), size, interpolation)


def center_crop(img: Image.Image, size: int | Sequence[int]) -> Image.Image:
    """The central `size` (int: square, else (h, w)) box; a smaller image is first zero-padded to it."""
    if isinstance(size, int) or len(size) == 1:
        ch = cw = size if isinstance(size, int) else int(size[0])
    else:
        ch, cw = int(size[0]), int(size[1])
    if cw > img.width or ch > img.height:
        dw, dh = max(cw - img.width, 0), max(ch - img.height, 0)
        fill = 0 if len(img.getbands()) == 1 else (0,) * len(img.getbands())
        img = ImageOps.expand(img, border=(dw // 2, dh // 2, (dw + 1) // 2, (dh + 1) // 2), fill=fill)
        if (cw, ch) == (img.width, img.height):
            return img
    top = round((img.height - ch) / 2.0)
    left = round((img.width - cw) / 2.0)
    return crop(img, top, left, ch, cw)


def hflip(img: Image.Image) -> Image.Image:
    """`img` mirrored left to right."""
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def to_array(img: Image.Image) -> np.ndarray:
    """An 8-bit image (L, RGB, ...; mode 1 as 0/255) as float32 (C, H, W) in [0, 1]: value / 255."""
    pixels = np.asarray(img)
    if img.mode == "1":
        pixels = pixels.astype(np.uint8) * np.uint8(255)
    if pixels.dtype != np.uint8:
        raise ValueError(f"to_array takes 8-bit images, got mode {img.mode} ({pixels.dtype})")
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return pixels.transpose(2, 0, 1).astype(np.float32, order="C") / np.float32(255)


def to_tensor(img: Image.Image) -> Any:
    """`to_array` as a torch tensor (torchvision's `to_tensor` for 8-bit images)."""
    import torch

    return torch.from_numpy(to_array(img))


# --- steps and recipes ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RandomResizedCrop:
    """A random crop (`random_resized_crop_params`) resized to `size` x `size`."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: int = BILINEAR
    random: ClassVar[bool] = True

    def __call__(self, img: Image.Image, rng: Rng | None) -> Image.Image:
        top, left, h, w = random_resized_crop_params(img.width, img.height, self.scale, self.ratio, rng=_needs(rng))
        return resized_crop(img, top, left, h, w, (self.size, self.size), self.interpolation)


@dataclass(frozen=True)
class RandomHorizontalFlip:
    """`hflip` when a uniform draw in [0, 1) is below `p`."""

    p: float = 0.5
    random: ClassVar[bool] = True

    def __call__(self, img: Image.Image, rng: Rng | None) -> Image.Image:
        return hflip(img) if _uniform(_needs(rng), 0.0, 1.0) < self.p else img


@dataclass(frozen=True)
class Resize:
    """`resize` to `size` (int: shorter side; (h, w): exactly)."""

    size: int | tuple[int, int]
    interpolation: int = BILINEAR
    random: ClassVar[bool] = False

    def __call__(self, img: Image.Image, rng: Rng | None) -> Image.Image:
        return resize(img, self.size, self.interpolation)


@dataclass(frozen=True)
class CenterCrop:
    """`center_crop` to `size` x `size`."""

    size: int
    random: ClassVar[bool] = False

    def __call__(self, img: Image.Image, rng: Rng | None) -> Image.Image:
        return center_crop(img, self.size)


Step = RandomResizedCrop | RandomHorizontalFlip | Resize | CenterCrop


@dataclass(frozen=True)
class Transform:
    """A named recipe: `transform(img, seed, epoch, sample_key)` -> float32 (C, H, W) in [0, 1]."""

    name: str
    steps: tuple[Step, ...]

    @property
    def random(self) -> bool:
        """Whether it draws (training recipes); eval recipes are deterministic."""
        return any(step.random for step in self.steps)

    def image(self, img: Image.Image, seed: int, epoch: int, sample_key: str) -> Image.Image:
        """The recipe's steps applied to `img`, drawing from `sample_rng(seed, epoch, sample_key)`."""
        rng = sample_rng(seed, epoch, sample_key) if self.random else None
        for step in self.steps:
            img = step(img, rng)
        return img

    def pixels(self, img: Image.Image, seed: int, epoch: int, sample_key: str) -> np.ndarray:
        """The transformed image's 8-bit pixels, (H, W, C) or (H, W): what the data loader ships to the model,
        whose `uint8 / 255` then equals `to_array` (ToTensor) exactly, at a quarter of the bytes."""
        return np.asarray(self.image(img, seed, epoch, sample_key))

    def __call__(self, img: Image.Image, seed: int, epoch: int, sample_key: str) -> np.ndarray:
        return to_array(self.image(img, seed, epoch, sample_key))


def _train(scale: tuple[float, float]) -> Callable[[int], tuple[Step, ...]]:
    return lambda size: (RandomResizedCrop(size, scale), RandomHorizontalFlip(0.5))


def _eval_crop(interpolation: int) -> Callable[[int], tuple[Step, ...]]:
    return lambda size: (Resize(size * 256 // 224, interpolation), CenterCrop(size))


#: Recipe name -> steps for an image size. The reference's (utils/data.py): ImageNet-R, DomainNet: train
#: RandomResizedCrop(224) + RandomHorizontalFlip(), eval Resize(256) + CenterCrop(224); CIFAR-100: the same train,
#: eval Resize(224); CUB, ImageNet-A: train RandomResizedCrop(224, scale=(0.05, 1)) + flip, eval
#: Resize(256, bicubic) + CenterCrop(224).
TRANSFORMS: dict[str, Callable[[int], tuple[Step, ...]]] = {
    "resize": lambda size: (Resize((size, size), BILINEAR),),
    "imagenet_r_train": _train((0.08, 1.0)),
    "imagenet_r_eval": _eval_crop(BILINEAR),
    "cifar100_train": _train((0.08, 1.0)),
    "cifar100_eval": lambda size: (Resize(size, BILINEAR),),
    "domainnet_train": _train((0.08, 1.0)),
    "domainnet_eval": _eval_crop(BILINEAR),
    "cub_train": _train((0.05, 1.0)),
    "cub_eval": _eval_crop(BICUBIC),
    "imagenet_a_train": _train((0.05, 1.0)),
    "imagenet_a_eval": _eval_crop(BICUBIC),
}


def build_transform(name: str, image_size: int) -> Transform:
    """The recipe `name` for `image_size` x `image_size` outputs (`cifar100_eval` only for square inputs, as in
    the reference). Raises ValueError naming an unknown recipe and listing the valid ones."""
    if name not in TRANSFORMS:
        raise ValueError(f"unknown transform {name!r}; valid: {', '.join(sorted(TRANSFORMS))}")
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return Transform(name, TRANSFORMS[name](image_size))


def configured_transform(name: str | None, image_size: int) -> Transform | None:
    """The recipe a run config names (`data.train_transform`, `data.eval_transform`), or None when it names
    none (the images as stored, which the model resizes)."""
    return build_transform(name, image_size) if name else None
