"""Image files to the 8-bit pixels the models read: one conversion for prediction and for building shards.

Pillow opens many modes; `convert("L")` or `convert("RGB")` alone clips 16-bit
grey values (`I;16`, or `I` from a 16-bit PNG) to 255 instead of scaling them.
Here 16-bit (and 32-bit integer images whose values fit 16 bits) are scaled,
value / 65535 to [0, 1], then to 0..255; palette, alpha, CMYK, YCbCr and
1-bit images go through Pillow's own conversion (alpha is dropped). What
cannot be converted (float images, integers beyond 16 bits, a truncated or
unreadable file) is refused with `ImageError` naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from inflora_dist.errors import UserError

#: Pillow modes holding integers of up to 16 bits per pixel (one channel).
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageError(UserError, ValueError):
    """An image that cannot be read or converted to 8-bit pixels: names the file."""


def to_mode(image: Any, mode: str, source: str | Path) -> Any:
    """`image` (a PIL image) as mode `mode` ("L" or "RGB"), 16-bit values scaled, not clipped."""
    from PIL import Image

    if image.mode in _WIDE_GREY:
        values = np.asarray(image, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageError(f"image {source}: {image.mode} values in [{values.min()}, {values.max()}] exceed 16 bits")
        grey = Image.fromarray(np.round(values * (255.0 / 65535.0)).astype(np.uint8), mode="L")
        return grey.convert(mode)
    if image.mode == "F":
        raise ImageError(
            f"image {source}: floating-point pixels (mode F) have no defined range; save it as 8 or 16 bit"
        )
    return image.convert(mode)


def read_image(path: str | Path, channels: int) -> np.ndarray:
    """The file's pixels as uint8 (H, W) for a one-channel model, else (H, W, 3). Raises ImageError naming the
    file when it cannot be read (truncated, not an image) or converted."""
    return np.asarray(_opened(path, channels, path, f"cannot read image {path}"))


def _opened(source: Any, channels: int, name: str | Path, failure: str) -> Any:
    """The image Pillow opens from `source` (a path or a file object), loaded and as mode "L" for a one-channel
    model, else "RGB" (`to_mode`, named `name`); ImageError `failure: <cause>` when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as image:
            image.load()
            return to_mode(image, "L" if channels == 1 else "RGB", name)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise ImageError(f"{failure}: {err}") from None


def decode_image(data: bytes | np.ndarray, channels: int, source: str) -> Any:
    """A shard sample's image, encoded bytes (`.jpg`, `.png`, ...) or an array (`.npy`), as a PIL image of mode
    "L" for a one-channel model, else "RGB" (as `read_image` converts files). Raises ImageError naming `source`
    (the sample) when it cannot be decoded."""
    import io

    from PIL import Image

    if isinstance(data, np.ndarray):
        return to_mode(Image.fromarray(data), "L" if channels == 1 else "RGB", source)
    return _opened(io.BytesIO(data), channels, source, f"cannot decode the image of sample {source}")
