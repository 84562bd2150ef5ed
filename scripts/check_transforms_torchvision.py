"""Compare inflora_dist/data/transforms.py with torchvision itself, pixel for pixel, on real JPEGs.

Run with a Python that has torch and torchvision (not the project venv, whose CPU torch cannot sit next to
torchvision's CUDA-linked wheels):

    /work/refvenv/bin/python scripts/check_transforms_torchvision.py

Checked, on JPEGs of several sizes and aspect ratios written and read back here:

- the operations on the same parameters: `resize` vs `F.resize` (bilinear and bicubic, int and (h, w) sizes),
  `resized_crop` vs `F.resized_crop` (boxes from `RandomResizedCrop.get_params`), `center_crop` vs
  `F.center_crop` (crops larger than the image, i.e. padded, included), `hflip` vs `F.hflip`, `to_array`
  vs `F.to_tensor` (RGB and L): max abs difference in uint8 levels for images, in [0, 1] for arrays;
- the crop sampler: `random_resized_crop_params` vs `RandomResizedCrop.get_params` fed the same uniform and
  integer draws (torch's RNG cannot produce numpy's, so torchvision's module-level `torch` is replaced, for
  the call, by a stand-in whose `empty(1).uniform_`, `randint` and `rand` draw from the same
  `numpy.random.Generator`; torch keeps its float32 log/exp of the ratio): the count of differing crops;
- the full recipes against the reference's torchvision pipelines (InfLoRA utils/data.py, with its
  `Normalize(0, 1)`): eval ones directly, training ones with torchvision drawing through the stand-in from
  `sample_rng(seed, epoch, key)`, the generator our recipe uses.

The last line printed is one JSON object: per check the cases, the max abs difference and pass; exit status 0
when every check passes. Our module is loaded from its file (the repo root is put on sys.path, but importing the
`inflora_dist` package would pull in its dependencies, which this venv need not have).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
import torchvision
import torchvision.transforms.transforms as tv_transforms
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
_spec = importlib.util.spec_from_file_location("inflora_transforms", REPO / "inflora_dist" / "data" / "transforms.py")
assert _spec is not None and _spec.loader is not None
ours: Any = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = ours  # dataclasses look their module up while the file runs
_spec.loader.exec_module(ours)

# (width, height): landscape, portrait, small, CIFAR-like, a strip that forces the sampler's fallback.
SIZES = [(500, 375), (240, 320), (100, 90), (32, 32), (600, 90)]
MODES = {Image.Resampling.BILINEAR: InterpolationMode.BILINEAR, Image.Resampling.BICUBIC: InterpolationMode.BICUBIC}


def picture(width: int, height: int, seed: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(seed).integers(0, 40, (height, width, 3))
    rgb = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin(x / 7.0 + y / 11.0)], axis=-1)
    return np.clip(rgb * 0.8 + noise, 0, 255).astype(np.uint8)


def jpegs(root: Path) -> list[Image.Image]:
    images = []
    for i, (w, h) in enumerate(SIZES):
        path = root / f"{w}x{h}.jpg"
        Image.fromarray(picture(w, h, i)).save(path, quality=90)
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    return images


class Check:
    """Max abs difference over cases; a shape or size mismatch fails the check."""

    def __init__(self) -> None:
        self.cases, self.max_abs_diff, self.mismatched = 0, 0.0, 0

    def add(self, a: Any, b: Any) -> None:
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b.numpy() if isinstance(b, torch.Tensor) else b, dtype=np.float64)
        self.cases += 1
        if a.shape != b.shape:
            self.mismatched += 1
            return
        self.max_abs_diff = max(self.max_abs_diff, float(np.abs(a - b).max()) if a.size else 0.0)

    def summary(self) -> dict[str, Any]:
        ok = self.cases > 0 and self.mismatched == 0 and self.max_abs_diff == 0.0
        return {"cases": self.cases, "max_abs_diff": self.max_abs_diff, "shape_mismatches": self.mismatched, "pass": ok}


class _Uniform:
    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def uniform_(self, low: Any, high: Any) -> torch.Tensor:
        return torch.tensor([self.rng.uniform(float(low), float(high))], dtype=torch.float32)


class TorchDrawingFrom:
    """`torch` for torchvision.transforms.transforms, its draws taken from a numpy generator (as ours takes
    them: uniform(a, b), integers(low, high), uniform(0, 1) for the flip); everything else is torch's."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    def empty(self, *size: Any, **kwargs: Any) -> _Uniform:
        return _Uniform(self.rng)

    def randint(self, low: int, high: int, size: Any, **kwargs: Any) -> torch.Tensor:
        return torch.tensor([int(self.rng.integers(low, high))])

    def rand(self, *size: Any, **kwargs: Any) -> torch.Tensor:
        return torch.tensor([self.rng.uniform(0.0, 1.0)], dtype=torch.float32)


@contextlib.contextmanager
def torchvision_drawing_from(rng: np.random.Generator) -> Iterator[None]:
    real = tv_transforms.torch
    tv_transforms.torch = TorchDrawingFrom(rng)
    try:
        yield
    finally:
        tv_transforms.torch = real


class Counting:
    """A numpy generator that counts its integer draws (none: the sampler fell back to the central crop)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng, self.integers_drawn = rng, 0

    def uniform(self, low: float, high: float) -> float:
        return self.rng.uniform(low, high)

    def integers(self, low: int, high: int) -> int:
        self.integers_drawn += 1
        return int(self.rng.integers(low, high))


def as_pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img)


def main() -> int:
    torch.set_num_threads(1)
    checks = {
        name: Check()
        for name in ("resize", "resized_crop", "center_crop", "hflip", "to_tensor", "eval_recipes", "train_recipes")
    }
    sampler = {"draws": 0, "mismatches": 0, "fallbacks": 0}
    with tempfile.TemporaryDirectory() as tmp:
        images = jpegs(Path(tmp))
    torch.manual_seed(0)
    for img in images:
        for size in (224, 256, 64, 32, (100, 120)):
            for pil_mode, tv_mode in MODES.items():
                tv_size = list(size) if isinstance(size, tuple) else size
                checks["resize"].add(
                    as_pixels(ours.resize(img, size, pil_mode)), as_pixels(F.resize(img, tv_size, tv_mode))
                )
        for scale in ((0.08, 1.0), (0.05, 1.0)):
            for _ in range(20):
                top, left, h, w = T.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3])
                checks["resized_crop"].add(
                    as_pixels(ours.resized_crop(img, top, left, h, w, (224, 224))),
                    as_pixels(F.resized_crop(img, top, left, h, w, [224, 224])),
                )
        for size in (224, 85, 30, 600, (95, 105), (120, 50), (40, 30)):
            tv_size = list(size) if isinstance(size, tuple) else size
            checks["center_crop"].add(as_pixels(ours.center_crop(img, size)), as_pixels(F.center_crop(img, tv_size)))
        checks["hflip"].add(as_pixels(ours.hflip(img)), as_pixels(F.hflip(img)))
        for mode in ("RGB", "L"):
            checks["to_tensor"].add(ours.to_array(img.convert(mode)), F.to_tensor(img.convert(mode)))

        # The sampler fed the same draws, at the reference's two scales and one that mostly falls back.
        for scale in ((0.08, 1.0), (0.05, 1.0), (0.9, 1.0)):
            for k in range(500):
                counting = Counting(np.random.default_rng(k))
                a = ours.random_resized_crop_params(img.width, img.height, scale, rng=counting)
                with torchvision_drawing_from(np.random.default_rng(k)):
                    b = T.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3])
                sampler["draws"] += 1
                sampler["mismatches"] += a != tuple(b)
                sampler["fallbacks"] += counting.integers_drawn == 0  # no try fitted: the central crop

    # The reference's pipelines (InfLoRA utils/data.py: train_trsf / test_trsf + common_trsf).
    normalize = T.Normalize(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    reference = {
        "imagenet_r_eval": T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), normalize]),
        "domainnet_eval": T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), normalize]),
        "cifar100_eval": T.Compose([T.Resize(224), T.ToTensor(), normalize]),
        "cub_eval": T.Compose(
            [T.Resize(256, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor()]
        ),
        "imagenet_a_eval": T.Compose(
            [T.Resize(256, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor()]
        ),
        "resize": T.Compose([T.Resize((224, 224)), T.ToTensor()]),
        "imagenet_r_train": T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), normalize]),
        "domainnet_train": T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), normalize]),
        "cifar100_train": T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), normalize]),
        "cub_train": T.Compose(
            [
                T.RandomResizedCrop(224, scale=(0.05, 1.0), ratio=(3 / 4, 4 / 3)),
                T.RandomHorizontalFlip(0.5),
                T.ToTensor(),
            ]
        ),
        "imagenet_a_train": T.Compose(
            [
                T.RandomResizedCrop(224, scale=(0.05, 1.0), ratio=(3 / 4, 4 / 3)),
                T.RandomHorizontalFlip(0.5),
                T.ToTensor(),
            ]
        ),
    }
    assert set(reference) == set(ours.TRANSFORMS), sorted(set(reference) ^ set(ours.TRANSFORMS))
    for name, pipeline in reference.items():
        transform = ours.build_transform(name, 224)
        for i, img in enumerate(images):
            for epoch in range(3 if transform.random else 1):
                key = f"sample-{i}"
                if transform.random:
                    with torchvision_drawing_from(ours.sample_rng(11, epoch, key)):
                        expected = pipeline(img)
                    checks["train_recipes"].add(transform(img, 11, epoch, key), expected)
                else:
                    checks["eval_recipes"].add(transform(img, 11, epoch, key), pipeline(img))

    results: dict[str, Any] = {name: check.summary() for name, check in checks.items()}
    results["sampler_same_draws"] = {**sampler, "pass": sampler["mismatches"] == 0}
    for name, result in results.items():
        print(f"{name:20s} {result}")
    summary = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "units": "uint8 levels for resize/resized_crop/center_crop/hflip, [0, 1] floats for the rest",
        "checks": results,
        "pass": all(result["pass"] for result in results.values()),
    }
    print(json.dumps(summary))
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
