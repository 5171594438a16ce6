"""Image reading with one conversion rule for every stage (train, eval, infer).

Rule: the result is always RGB uint8 HxWx3. Grayscale is replicated to 3 channels; an alpha
channel is dropped (smear scans carry none that matters); 16-bit images are scaled to 8 bits by
dividing by 257 (65535 -> 255), keeping relative intensities. Anything that cannot be decoded
raises :class:`ImageReadError` naming the file and the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

REDUCED_FLAGS = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe")


class ImageReadError(ValueError):
    """An image file that is missing, not an image, or corrupt; the message names the file."""


def _file_bytes(path: Path) -> np.ndarray:
    try:
        data = np.fromfile(str(path), np.uint8)  # works with non-ASCII paths, unlike cv2.imread
    except OSError as err:
        raise ImageReadError(f"{path}: cannot read file ({err.strerror or err})") from None
    if data.size == 0:
        raise ImageReadError(f"{path}: file is empty")
    return data


def to_rgb8(image: np.ndarray) -> np.ndarray:
    """Apply the module's conversion rule to an OpenCV-decoded (BGR/BGRA/gray) array."""
    if image.dtype == np.uint16:
        image = (image.astype(np.uint32) // 257).astype(np.uint8)
    elif image.dtype != np.uint8:
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_image(path: str | os.PathLike, reduce: int = 1) -> np.ndarray:
    """Read ``path`` as RGB uint8. ``reduce`` in {2, 4, 8} decodes a JPEG at 1/reduce size with
    libjpeg's DCT scaling (much cheaper than a full decode then resize); other formats are
    decoded in full and the caller resizes."""
    path = Path(path)
    data = _file_bytes(path)
    if reduce in REDUCED_FLAGS and path.suffix.lower() in JPEG_SUFFIXES:
        image = cv2.imdecode(data, REDUCED_FLAGS[reduce])
    elif reduce != 1 and reduce not in REDUCED_FLAGS:
        raise ValueError(f"reduce must be 1, 2, 4 or 8, got {reduce}")
    else:
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageReadError(f"{path}: not a decodable image (corrupt, truncated or not an image file)")
    return to_rgb8(image)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ImageReadError(f"{path}: not a readable image ({err})") from None
