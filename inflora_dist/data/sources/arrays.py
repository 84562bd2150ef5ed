""".npy image and label arrays (the `arrays` source of build_shards)."""

from __future__ import annotations

import numpy as np


def load_array(path: str) -> np.ndarray:
    """An .npy array (never unpickled); NaN or inf values are refused naming the file and the first sample."""
    array = np.load(path, allow_pickle=False)
    if np.issubdtype(array.dtype, np.floating) and array.size:
        finite = np.isfinite(array.reshape(len(array), -1)).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise ValueError(f"{path}: sample {bad[0]} holds NaN or inf ({len(bad)} such samples of {len(array)})")
    return array
