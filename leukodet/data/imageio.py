"""Image reading with one conversion rule for every stage (train, eval, infer).

Rule: the result is always RGB uint8 HxWx3, in the pixel grid as stored (EXIF orientation is
ignored everywhere, so the decoded size always equals the header size that annotations were
checked against).

- grayscale: replicated to 3 channels;
- RGBA / BGRA: the alpha channel is dropped, not composited (smear photos and scans carry no
  meaningful transparency, and compositing onto a colour would invent background pixels);
- 16-bit: the high byte is kept (``x >> 8``), a fixed mapping, so intensities stay comparable
  between images (a per-image min-max stretch would not);
- other depths (float TIFF/EXR): stretched min-max to 0..255, as they have no fixed range.

Anything that cannot be decoded (missing, empty, truncated, corrupt, not an image) raises
:class:`ImageReadError` naming the file and the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

# libjpeg scales the DCT while decoding: a 1/4 decode costs about a third of a full one.
REDUCED_FLAGS = {factor: flag | cv2.IMREAD_IGNORE_ORIENTATION for factor, flag in
                 ((2, cv2.IMREAD_REDUCED_COLOR_2), (4, cv2.IMREAD_REDUCED_COLOR_4), (8, cv2.IMREAD_REDUCED_COLOR_8))}
JPEG_MAGIC = b"\xff\xd8\xff"


# What folder inference and previews pick up, in any letter case.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"})


class ImageReadError(ValueError, OSError):
    """An image file that is missing, not an image, or corrupt; the message names the file.

    Both a ValueError (bad content) and an OSError (a file that cannot be read), so callers that
    catch either keep working."""


def _file_bytes(path: Path) -> np.ndarray:
    try:
        data = np.fromfile(str(path), np.uint8)  # works with non-ASCII paths, unlike cv2.imread
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except OSError as err:
        raise ImageReadError(f"{path}: cannot read file ({err.strerror or err})") from None
    if data.size == 0:
        raise ImageReadError(f"{path}: file is empty")
    return data


def to_rgb8(image: np.ndarray) -> np.ndarray:
    """Apply the module's conversion rule to an OpenCV-decoded (gray, BGR or BGRA) array."""
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX, dtype=cv2.CV_8U)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_image(path: str | os.PathLike, reduce: int = 1) -> np.ndarray:
    """Read ``path`` as RGB uint8 HxWx3 under the module's conversion rule.

    ``reduce`` in {2, 4, 8} decodes a JPEG (recognised by its bytes, not its suffix) at
    ``ceil(W / reduce) x ceil(H / reduce)`` with libjpeg's DCT scaling, far cheaper than a full
    decode then resize. Other formats have no such decoder: they come back at full size and the
    caller resizes.
    """
    if reduce not in (1, *REDUCED_FLAGS):
        raise ValueError(f"reduce must be 1, 2, 4 or 8, got {reduce}")
    path = Path(path)
    data = _file_bytes(path)
    if reduce != 1 and data[:3].tobytes() == JPEG_MAGIC:
        image = cv2.imdecode(data, REDUCED_FLAGS[reduce])
    else:
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None:  # OpenCV 5 also refuses truncated JPEG/PNG data here
        raise ImageReadError(f"{path}: not a decodable image (corrupt, truncated or not an image file)")
    return to_rgb8(image)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels.

    Raises :class:`ImageReadError` for missing files and files that are not a known image format.
    A file with a good header but damaged pixel data passes here; :func:`read_image` catches it.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:  # else PIL says "format not recognised", which misleads
            raise ImageReadError(f"{path}: file is empty")
        with Image.open(path) as image:
            return image.size
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not an image file (format not recognised)") from None
    except OSError as err:
        raise ImageReadError(f"{path}: not a readable image ({err})") from None
