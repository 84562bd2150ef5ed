"""Fashion-MNIST from its IDX files (the `fashion-mnist` source of build_shards)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """An array from an IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = bytearray(f.read())  # writable, so arrays made from it are too
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.dtype(_IDX_DTYPES[data[2]]), offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {array.size} values")
    return array.reshape(shape)


def load_fashion_mnist(directory: str | Path = FASHION_MNIST_DIR) -> dict[str, np.ndarray]:
    """Fashion-MNIST from its IDX files (Debian package dataset-fashion-mnist installs them)."""
    d = Path(directory)
    names = {
        "train_images": "train-images-idx3-ubyte",
        "train_labels": "train-labels-idx1-ubyte",
        "eval_images": "t10k-images-idx3-ubyte",
        "eval_labels": "t10k-labels-idx1-ubyte",
    }
    out = {}
    for key, stem in names.items():
        path = next((p for p in (d / f"{stem}.gz", d / stem) if p.exists()), None)
        if path is None:
            raise FileNotFoundError(
                f"{d / stem}(.gz) not found: install Fashion-MNIST (apt-get install dataset-fashion-mnist) "
                "or pass --source"
            )
        out[key] = read_idx(path)
    return out
