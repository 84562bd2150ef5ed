"""Images on the user's disk (the `imagefolder` source of build_shards), split as the reference splits them.

Three layouts, the reference's (liangyanshuo/InfLoRA, `utils/data.py`):

* one sub-folder per class under `--root` (torchvision's ImageFolder: classes are the sorted folder names,
  ids 0..C-1), split into train and eval by a seeded fraction of each class (`split_by_class`);
* `--root` holding `train/` and `test/`, each one sub-folder per class (ImageNet-R and CUB as the reference
  reads them), or a separate `--eval-root`: the eval split is that folder, with the same classes;
* split files (`--train-split`, `--eval-split`): YAML or JSON `{data: [image paths], targets: [class ids]}`
  as the reference's `dataloaders/splits/*.yaml` (DomainNet); relative paths are under `--root`, and a class
  is named by the folder of its first image.

Every image is stored as encoded: the source file's bytes, under its format's extension (`jpg`, `png`, `bmp`,
`webp`), so that the loader's transforms (data.train_transform) see the original image, as the reference's do.
Only an image whose pixels are not 8-bit RGB or grey (16-bit, palette, CMYK, alpha) is converted (data.images)
and stored as PNG, and with `max_side` an image whose longer side exceeds it is shrunk to it and re-encoded.
Each image is decoded once while building, so an unreadable one stops the build naming its file.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import yaml

from inflora_dist.data.images import ImageError, read_image

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
#: The shard field of an image kept as encoded, by file suffix.
_FIELDS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".bmp": "bmp", ".webp": "webp"}


class EncodedImage(NamedTuple):
    """An image's encoded bytes and the shard field (its format's extension) they are stored under."""

    field: str
    data: bytes


def encoded_image(path: Path, max_side: int | None = None) -> EncodedImage:
    """The image file as it is stored in a shard (see the module docstring). Raises ImageError naming it when it
    cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            mode, size, grey = image.mode, image.size, len(image.getbands()) == 1
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise ImageError(f"cannot read image {path}: {err}") from None
    too_large = max_side is not None and max(size) > max_side
    if mode in ("RGB", "L") and not too_large:
        return EncodedImage(_FIELDS[path.suffix.lower()], path.read_bytes())
    pixels = Image.fromarray(read_image(path, channels=1 if grey else 3))  # grey stays grey, as the file is
    if too_large:
        scale = max_side / max(size)
        pixels = pixels.resize((max(1, round(size[0] * scale)), max(1, round(size[1] * scale))), Image.BICUBIC)
    out = io.BytesIO()
    as_jpeg = path.suffix.lower() in (".jpg", ".jpeg")
    pixels.save(out, format="JPEG" if as_jpeg else "PNG", **({"quality": 95} if as_jpeg else {}))
    return EncodedImage("jpg" if as_jpeg else "png", out.getvalue())


class ImageFolder:
    """Images in one sub-folder per class (ImageNet-R, DomainNet, ... on the user's disk), or the images a split
    file lists (`from_split_file`).

    Classes are the sorted names of the sub-folders that hold images, ids 0..C-1
    (a folder without any is skipped with a warning naming it, listed in
    `empty`). Items are `EncodedImage`s, read lazily.
    """

    def __init__(self, root: str | Path, max_side: int | None = None) -> None:
        self.root, self.max_side = Path(root), max_side
        folders = sorted(d for d in self.root.iterdir() if d.is_dir()) if self.root.is_dir() else []
        if not folders:
            raise FileNotFoundError(f"{root} has no class sub-folders")
        found = {d.name: [f for f in sorted(d.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES] for d in folders}
        self.empty = [self.root / name for name, files in found.items() if not files]
        for folder in self.empty:
            logger.warning("class folder %s holds no image file (%s): skipped", folder, " ".join(IMAGE_SUFFIXES))
        self.classes = [name for name, files in found.items() if files]
        if not self.classes:
            raise FileNotFoundError(f"{root}: none of its {len(folders)} class sub-folders holds an image file")
        self.files = [f for name in self.classes for f in found[name]]
        self.labels = np.array([c for c, name in enumerate(self.classes) for _ in found[name]], dtype=np.int64)

    @classmethod
    def from_split_file(cls, split: str | Path, root: str | Path, max_side: int | None = None) -> ImageFolder:
        """The images and class ids a split file lists (`{data: [paths], targets: [ids]}`, YAML or JSON), paths
        relative to `root` unless absolute. A missing image, or lists of different lengths, stop the build
        naming the file (and the image)."""
        split = Path(split)
        try:
            content = yaml.safe_load(split.read_text(encoding="utf-8"))  # JSON is YAML
        except (OSError, yaml.YAMLError) as err:
            raise ValueError(f"split file {split}: unreadable ({err})") from None
        if not isinstance(content, dict) or not {"data", "targets"} <= set(content):
            raise ValueError(f"split file {split}: expected a mapping with `data` (image paths) and `targets` (ids)")
        data, targets = content["data"], content["targets"]
        if len(data) != len(targets) or not data:
            raise ValueError(f"split file {split}: {len(data)} paths but {len(targets)} targets")
        folder = cls.__new__(cls)
        folder.root, folder.max_side, folder.empty = Path(root), max_side, []
        folder.files = [p if p.is_absolute() else Path(root) / p for p in map(Path, data)]
        missing = [str(f) for f in folder.files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"split file {split} names {len(missing)} image(s) that do not exist, e.g. {missing[0]}"
                f"{' (relative paths are under --root)' if not Path(data[0]).is_absolute() else ''}"
            )
        folder.labels = np.array([int(t) for t in targets], dtype=np.int64)
        names = {int(t): f.parent.name for f, t in zip(reversed(folder.files), reversed(targets), strict=True)}
        folder.classes = [names.get(c, f"class {c}") for c in range(int(folder.labels.max()) + 1)]
        return folder

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> EncodedImage:
        return encoded_image(self.files[index], self.max_side)


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
    seed: int,
    num_tasks: int,
    classes_per_task: int,
    max_side: int | None = None,
    train_split: str | None = None,
    eval_split: str | None = None,
) -> dict[str, Any]:
    """Train and eval (images, labels) and the class names, in the first layout that applies: split files
    (`train_split` and `eval_split`); `eval_root`; `root/train` + `root/test`; else a seeded `eval_fraction` of
    each class of `root` (split_by_class). When empty class folders leave fewer classes than `num_tasks` x
    `classes_per_task`, the error names those folders; a class folder missing from one split is named."""
    if bool(train_split) != bool(eval_split):
        raise ValueError("split files come in pairs: give --train-split and --eval-split")
    if train_split and eval_split:
        train = ImageFolder.from_split_file(train_split, root, max_side)
        evaluation = ImageFolder.from_split_file(eval_split, root, max_side)
        return _pair(train, evaluation, f"{train_split} and {eval_split}", num_tasks, classes_per_task, root)
    if eval_root is None and (Path(root) / "train").is_dir() and (Path(root) / "test").is_dir():
        logger.info("%s holds train/ and test/: they are the splits", root)
        root, eval_root = str(Path(root) / "train"), str(Path(root) / "test")
    train = ImageFolder(root, max_side)
    if eval_root:
        evaluation = ImageFolder(eval_root, max_side)
        return _pair(train, evaluation, f"{eval_root} and {root}", num_tasks, classes_per_task, root)
    _check_enough(train, num_tasks, classes_per_task, root)
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval fraction must be in (0, 1), got {eval_fraction}")
    tr, ev = split_by_class(train.labels, eval_fraction, seed)
    return {"train_images": Subset(train, tr), "train_labels": train.labels[tr],
            "eval_images": Subset(train, ev), "eval_labels": train.labels[ev],
            "class_names": train.classes}  # fmt: skip


def _pair(train: ImageFolder, evaluation: ImageFolder, what: str, num_tasks: int, classes_per_task: int,
          root: str) -> dict[str, Any]:  # fmt: skip
    """Given train and eval splits: the same classes in both, or an error naming those that differ."""
    _check_enough(train, num_tasks, classes_per_task, root)
    if evaluation.classes != train.classes:
        only_train = sorted(set(train.classes) - set(evaluation.classes))
        only_eval = sorted(set(evaluation.classes) - set(train.classes))
        raise ValueError(
            f"{what} have different classes: only in the training split {only_train or 'none'}, only in the "
            f"eval split {only_eval or 'none'}"
        )
    return {"train_images": train, "train_labels": train.labels, "eval_images": evaluation,
            "eval_labels": evaluation.labels, "class_names": train.classes}  # fmt: skip


def _check_enough(train: ImageFolder, num_tasks: int, classes_per_task: int, root: str) -> None:
    needed = num_tasks * classes_per_task
    if train.empty and len(train.classes) < needed:
        raise ValueError(
            f"{num_tasks} tasks x {classes_per_task} classes need {needed} classes, {root} has "
            f"{len(train.classes)}: its class folder(s) {', '.join(map(str, train.empty))} hold no image file"
        )
