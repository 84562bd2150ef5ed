"""Images in one sub-folder per class (the `imagefolder` source of build_shards)."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from inflora_dist.data.images import read_image

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ImageFolder:
    """Images in one sub-folder per class (ImageNet-R, DomainNet, ... on the user's disk).

    Classes are the sorted names of the sub-folders that hold images, ids 0..C-1
    (a folder without any is skipped with a warning naming it, listed in
    `empty`). Items are re-encoded as JPEG at `image_size` x `image_size` (so a
    batch stacks), read lazily.
    """

    def __init__(self, root: str | Path, image_size: int = 224, quality: int = 95) -> None:
        self.root, self.image_size, self.quality = Path(root), image_size, quality
        folders = sorted(d for d in self.root.iterdir() if d.is_dir())
        if not folders:
            raise FileNotFoundError(f"{root} has no class sub-folders")
        found = {d.name: [f for f in sorted(d.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES] for d in folders}
        self.empty = [self.root / name for name, files in found.items() if not files]
        for folder in self.empty:
            logger.warning("class folder %s holds no image file (%s): skipped", folder, " ".join(IMAGE_SUFFIXES))
        self.classes = [name for name, files in found.items() if files]
        if not self.classes:
            raise FileNotFoundError(f"{root}: none of its {len(folders)} class sub-folders holds an image file")
        self.files = [(f, c) for c, name in enumerate(self.classes) for f in found[name]]
        self.labels = np.array([c for _, c in self.files], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> bytes:
        from PIL import Image

        pixels = read_image(self.files[index][0], channels=3)  # 16-bit scaled, other modes converted
        im = Image.fromarray(pixels).resize((self.image_size, self.image_size), Image.BICUBIC)
        out = io.BytesIO()
        im.save(out, format="JPEG", quality=self.quality)
        return out.getvalue()


def split_by_class(labels: np.ndarray, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded (train, eval) split of range(len(labels)), drawn per class: of a class's n samples,
    round(n * eval_fraction) go to eval, but at least 1 and at most n - 1 (a class of one sample trains only),
    so every class with two samples or more is in both splits."""
    rng = np.random.default_rng(seed)
    train, held = [np.empty(0, dtype=np.int64)], [np.empty(0, dtype=np.int64)]
    for c in np.unique(labels):
        order = rng.permutation(np.flatnonzero(labels == c))
        n_eval = min(max(1, round(len(order) * eval_fraction)), len(order) - 1)
        train.append(order[n_eval:])
        held.append(order[:n_eval])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


class Subset:
    """Items `indices` of an indexable dataset."""

    def __init__(self, items: Any, indices: np.ndarray) -> None:
        self.items, self.indices = items, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.items[int(self.indices[i])]


def image_folder_data(
    root: str,
    eval_root: str | None,
    *,
    eval_fraction: float,
    image_size: int,
    seed: int,
    num_tasks: int,
    classes_per_task: int,
) -> dict[str, Any]:
    """Train and eval (images, labels) of `root`, and the class names: the eval split is `eval_root` (the same
    class folders) if given, else a seeded `eval_fraction` of each class (split_by_class). When empty class
    folders leave fewer classes than `num_tasks` x `classes_per_task`, the error names those folders."""
    train = ImageFolder(root, image_size)
    needed = num_tasks * classes_per_task
    if train.empty and len(train.classes) < needed:
        raise ValueError(
            f"{num_tasks} tasks x {classes_per_task} classes need {needed} classes, {root} has "
            f"{len(train.classes)}: its class folder(s) {', '.join(map(str, train.empty))} hold no image file"
        )
    if eval_root:
        evaluation = ImageFolder(eval_root, image_size)
        if evaluation.classes != train.classes:
            differ = sorted(set(train.classes) ^ set(evaluation.classes))
            raise ValueError(f"{eval_root} and {root} have different class folders with images: {', '.join(differ)}")
        return {"train_images": train, "train_labels": train.labels, "eval_images": evaluation,
                "eval_labels": evaluation.labels, "class_names": train.classes}  # fmt: skip
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval fraction must be in (0, 1), got {eval_fraction}")
    tr, ev = split_by_class(train.labels, eval_fraction, seed)
    return {"train_images": Subset(train, tr), "train_labels": train.labels[tr],
            "eval_images": Subset(train, ev), "eval_labels": train.labels[ev],
            "class_names": train.classes}  # fmt: skip
