"""Image files to model pixels (data/images.py): 16-bit scaled, every Pillow mode converted, bad files named."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from inflora_dist.data.build_shards import ImageFolder
from inflora_dist.data.images import ImageError, read_image

GREY = np.arange(0, 256, 4, dtype=np.uint8).reshape(8, 8)  # 0..252: every level well inside 8 bits


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    """The same picture saved as 8 and as 16 bits (v * 257) reads as the same pixels; before, Pillow's convert
    clipped every 16-bit value above 255."""
    Image.fromarray(GREY).save(tmp_path / "8.png")
    Image.fromarray(GREY.astype(np.uint16) * 257).save(tmp_path / "16.png")
    assert Image.open(tmp_path / "16.png").mode.startswith("I")
    np.testing.assert_array_equal(read_image(tmp_path / "16.png", 1), GREY)
    np.testing.assert_array_equal(read_image(tmp_path / "16.png", 3), np.stack([GREY] * 3, axis=-1))


@pytest.mark.parametrize("mode", ["P", "RGBA", "LA", "CMYK", "1"])
def test_other_modes_convert_to_the_models_channels(tmp_path, mode):
    rgb = Image.fromarray(np.stack([GREY, GREY[::-1], GREY.T], axis=-1))
    path = tmp_path / f"image.{'tiff' if mode == 'CMYK' else 'png'}"
    rgb.convert(mode).save(path)
    for channels, shape in ((1, (8, 8)), (3, (8, 8, 3))):
        pixels = read_image(path, channels)
        assert pixels.dtype == np.uint8 and pixels.shape == shape


def test_unreadable_and_unconvertible_images_name_the_file(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])  # the middle of its pixel data
    with pytest.raises(ImageError, match=f"cannot read image {cut}"):
        read_image(cut, 1)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ImageError, match=f"cannot read image {text}"):
        read_image(text, 3)
    floats = tmp_path / "float.tiff"
    Image.fromarray(GREY.astype(np.float32)).save(floats)
    with pytest.raises(ImageError, match=f"image {floats}: floating-point pixels"):
        read_image(floats, 1)


def test_image_folders_convert_sixteen_bit_images_the_same_way(tmp_path):
    """build_shards' image folders keep an 8-bit file's bytes and convert a 16-bit one through the same
    conversion: both decode to the same pixels."""
    for name, array in (("a", GREY), ("b", GREY.astype(np.uint16) * 257)):
        (tmp_path / name).mkdir()
        Image.fromarray(array).save(tmp_path / name / "x.png")
    folder = ImageFolder(tmp_path)
    assert folder[0].data == (tmp_path / "a" / "x.png").read_bytes()  # kept as encoded
    decoded = [np.asarray(Image.open(io.BytesIO(folder[i].data))) for i in range(2)]
    np.testing.assert_array_equal(decoded[0], decoded[1])
