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

from leukodet.data.scale import FILE_STATED_UM_PER_PX

# libjpeg scales the DCT while decoding: a 1/4 decode costs about a third of a full one.
REDUCED_FLAGS = {factor: flag | cv2.IMREAD_IGNORE_ORIENTATION for factor, flag in
                 ((2, cv2.IMREAD_REDUCED_COLOR_2), (4, cv2.IMREAD_REDUCED_COLOR_4), (8, cv2.IMREAD_REDUCED_COLOR_8))}
JPEG_MAGIC = b"\xff\xd8\xff"


# What previews pick up, in any letter case: files read whole.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"})
# Whole-slide scanner formats OpenSlide reads (the optional ``slides`` extra); read by region only.
# (not Hamamatsu's .vms/.vmu: their pixels lie in JPEG files beside them, which inference would take
# for images of their own)
SLIDE_SUFFIXES = frozenset({".svs", ".ndpi", ".mrxs", ".scn", ".svslide", ".bif"})
# What folder inference picks up.
INPUT_SUFFIXES = IMAGE_SUFFIXES | SLIDE_SUFFIXES


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


TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
# TIFF ResolutionUnit inch / centimetre, and the millimetre / micrometre that tifffile writes (4, 5,
# outside the TIFF standard), in micrometres
TIFF_UNIT_UM = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}
# ImageJ's unit (its description's unit=, the resolution tags then per that unit), in micrometres;
# ImageJ writes the micro sign escaped; the Greek mu is how some writers spell it
IMAGEJ_UNIT_UM = {unit: 1.0 for unit in ("micron", "microns", "micrometer", "micrometre", "um", "\u00b5m",
                                         "\u03bcm", "\\u00b5m")} | {"mm": 1000.0, "nm": 0.001}


def plausible_um_per_px(value: float | None) -> float | None:
    """A file's stated pixel size when it is one a microscope image of blood cells can have
    (``FILE_STATED_UM_PER_PX``), else None: a TIFF writer's 72 dpi default, or a camera's sensor
    pitch, is not the image's pixel size."""
    low, high = FILE_STATED_UM_PER_PX
    return float(value) if value and low <= float(value) <= high else None


def tiff_um_per_px(tiff) -> float | None:
    """The pixel size an open ``tifffile.TiffFile`` states: its first page's resolution tags in inch
    or centimetre, or in ImageJ's unit (``unit=micron``, ``um``, ``mm``...; the tags' own unit then
    says none); None where it states none plausible (``plausible_um_per_px``)."""
    page = tiff.pages[0]
    unit = TIFF_UNIT_UM.get(int(page.resolutionunit))
    if unit is None:
        unit = IMAGEJ_UNIT_UM.get(str((tiff.imagej_metadata or {}).get("unit", "")).strip().lower())
    return plausible_um_per_px(unit / page.resolution[0] if unit and page.resolution[0] else None)


def stated_um_per_px(path: str | os.PathLike) -> float | None:
    """The pixel size a TIFF states (``tiff_um_per_px``), for one read whole; None for other files
    and for a TIFF whose tags cannot be read (reading its pixels then says what is wrong)."""
    if Path(path).suffix.lower() not in TIFF_SUFFIXES:
        return None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tiff:
            return tiff_um_per_px(tiff)
    except Exception:  # noqa: BLE001 - the pixels' reader reports the file
        return None


class RegionReader:
    """An image read by region, so a whole slide or a 36 MP camera frame never sits in memory
    whole: ``width``, ``height``, ``um_per_px`` (the pixel size the file states, None where it
    states none plausible) and ``read(x0, y0, x1, y1)``, RGB uint8 under the module's conversion
    rule. ``open_regions`` picks the reader for a file."""

    width: int
    height: int
    um_per_px: float | None = None

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def open(cls, path: str | os.PathLike) -> "RegionReader | None":
        raise NotImplementedError

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """RGB uint8 pixels of the region [x0, x1) x [y0, y1), clipped to the image."""
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, self.width), min(y1, self.height)
        try:
            return self._read(x0, y0, x1, y1)
        except Exception as err:  # noqa: BLE001 - a damaged tile, named with its file
            raise ImageReadError(f"{self.path}: cannot read region x {x0}-{x1}, y {y0}-{y1} ({err})") from None

    def _read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        raise NotImplementedError

    def preview(self, max_side: int, band: int = 512) -> tuple[np.ndarray, float]:
        """The image scaled down so its longest side is at most ``max_side`` (and the factor),
        made band by band, so memory holds one band of the file at a time."""
        factor = min(1.0, max_side / max(self.width, self.height))
        out_w = max(1, round(self.width * factor))
        bands = []
        for y0 in range(0, self.height, band):
            y1 = min(y0 + band, self.height)
            rows = max(1, round(y1 * factor) - round(y0 * factor))
            bands.append(cv2.resize(self.read(0, y0, self.width, y1), (out_w, rows), interpolation=cv2.INTER_AREA))
        return np.concatenate(bands), factor

    def close(self) -> None:
        pass

    def __del__(self):  # the file handle goes with the sample, not at the end of a 10,000-image run
        if "path" in self.__dict__:
            self.close()

    def __getstate__(self):  # loader workers pass it to the main process: reopened there
        return {"path": self.path}

    def __setstate__(self, state):
        reopened = type(self).open(state["path"])
        if reopened is None:
            raise ImageReadError(f"{state['path']}: no longer readable by region")
        self.__dict__.update(reopened.__dict__)
        reopened.__dict__.clear()  # the handle now belongs to self


class TiffRegions(RegionReader):
    """A TIFF read by region: only the tiles or strips a region crosses are decoded (tifffile's
    Zarr view of the file). Regions follow the module's conversion rule, except that float images
    are refused (their min-max stretch needs the whole image): ``open`` returns None for files it
    cannot read so, and the caller reads them whole. The pixel size: ``tiff_um_per_px``."""

    def __init__(self, path: Path, tiff, store, array, um_per_px: float | None = None):
        super().__init__(path)
        self._tiff, self._store, self._array = tiff, store, array
        self.height, self.width = int(array.shape[0]), int(array.shape[1])
        self.um_per_px = um_per_px

    @classmethod
    def open(cls, path: str | os.PathLike) -> "TiffRegions | None":
        path = Path(path)
        if path.suffix.lower() not in TIFF_SUFFIXES:
            return None
        import tifffile
        import zarr

        tiff = None
        try:  # one open file: its tags give the pixel size, its Zarr view the regions
            tiff = tifffile.TiffFile(path)
            um_per_px = tiff_um_per_px(tiff)
            store = tiff.aszarr(level=0)
            array = zarr.open(store, mode="r")
        except Exception:  # noqa: BLE001 - not readable by region: the whole-file reader reports what is wrong
            if tiff is not None:
                tiff.close()
            return None
        reader = cls(path, tiff, store, array, um_per_px)
        plain = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))
        if not plain or array.dtype not in (np.uint8, np.uint16):  # planar, multi-channel or float
            reader.close()
            return None
        return reader

    def _read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        region = np.asarray(self._array[y0:y1, x0:x1])
        if region.dtype == np.uint16:
            region = (region >> 8).astype(np.uint8)
        if region.ndim == 2:
            return np.repeat(region[..., None], 3, axis=2)
        return np.ascontiguousarray(region[..., :3])

    def close(self) -> None:
        for handle in (self.__dict__.pop("_store", None), self.__dict__.pop("_tiff", None)):  # forgotten, so a
            if handle is not None:  # second close does nothing
                handle.close()


class SlideRegions(RegionReader):
    """A whole-slide scanner file (Aperio, Hamamatsu, MIRAX, Leica, Ventana, ...) read by region
    at full resolution with OpenSlide (the optional ``slides`` extra: ``pip install
    'leukodet[slides]'``). Pixels outside the scanned area, transparent in OpenSlide, become the
    slide's background colour (white unless it states one), as a smear's empty glass looks,
    rather than black, which the thresholding steps would take for cells. The pixel size is the
    slide's ``openslide.mpp-x``."""

    def __init__(self, path: Path, slide):
        super().__init__(path)
        self._slide = slide
        self.width, self.height = slide.dimensions
        self.um_per_px = plausible_um_per_px(slide.properties.get("openslide.mpp-x"))
        colour = slide.properties.get("openslide.background-color") or "FFFFFF"
        self._background = np.array([int(colour[i:i + 2], 16) for i in (0, 2, 4)], np.uint8)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "SlideRegions":
        path = Path(path)
        try:
            import openslide
        except ImportError:
            raise ImageReadError(f"{path}: a slide scanner file needs OpenSlide: pip install 'leukodet[slides]' "
                                 "(or convert the slide to a tiled TIFF)") from None
        try:
            return cls(path, openslide.OpenSlide(str(path)))
        except (openslide.OpenSlideError, OSError) as err:
            raise ImageReadError(f"{path}: OpenSlide cannot read it ({err})") from None

    def _read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        rgba = np.asarray(self._slide.read_region((x0, y0), 0, (max(x1 - x0, 0), max(y1 - y0, 0))))
        rgb = np.array(rgba[..., :3])  # a copy: PIL's buffer is read-only
        rgb[rgba[..., 3] == 0] = self._background
        return rgb

    def preview(self, max_side: int, band: int = 512) -> tuple[np.ndarray, float]:
        """OpenSlide's thumbnail, made from the slide's own downsampled levels (and composited on
        its background colour), instead of bands of a 100,000-px wide level 0."""
        factor = min(1.0, max_side / max(self.width, self.height))
        size = (max(1, round(self.width * factor)), max(1, round(self.height * factor)))
        thumbnail = np.array(self._slide.get_thumbnail(size).convert("RGB"))
        return thumbnail, thumbnail.shape[1] / self.width

    def close(self) -> None:
        slide = self.__dict__.pop("_slide", None)  # forgotten: OpenSlide refuses a second close
        if slide is not None:
            slide.close()


def open_regions(path: str | os.PathLike) -> RegionReader | None:
    """The region reader for a file: OpenSlide for a scanner format, tifffile for a TIFF it can
    read so; None for any other file (read it whole)."""
    path = Path(path)
    if path.suffix.lower() in SLIDE_SUFFIXES:
        return SlideRegions.open(path)
    return TiffRegions.open(path)
