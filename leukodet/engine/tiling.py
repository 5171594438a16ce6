"""Whole-field prediction at the trained cell scale: overlapping square tiles, each seen by the
detector exactly as it saw its training fields, merged so that a cell cut by a tile edge is kept
once, whole, from the tile that holds it.

Why tiles: a detector squeezes any input to its ``min_size``, so a picture of 8 fields showed the
network cells 8x too small and returned none. Here every tile is a square of side
``min_size * d / D`` input pixels (``d``: the input's cell diameter, ``D``: the cell diameter the
network saw in training), so the detector's own resize brings it to ``min_size`` and the cells
to ``D`` pixels, whatever the size of the picture; this holds for every backend that keeps
torchvision's resize rule (the trained model, its inference copy, the ONNX export). A model that
sees its inputs unresized (leukodet's detectron2 adapter) gets each tile resized here instead, to
the size its training images had (``TrainedScale.network_resizes``).

Merge (the StarDist ``predict_instances_big`` idea, with SAHI's duplicate check at the seams):
the tiles' cores partition the image, each core running to the middle of the overlap with its
neighbours; a detection is kept from the tile whose core holds its cell's centre, the box centre of
the best-scoring view of that cell from any tile (``owning_centres``), so that two tiles' views
agree on the owner whatever their boxes' jitter. With an overlap of at least one cell diameter a
cell whose centre lies in a core is whole in that tile, and a piece of a cut cell has its centre
in another tile's core, so each cell is kept once and never split. A cell that tile does not find
(seen on the mosaics: the same cell found alone, missed beside other fields) is still kept from a
neighbour that sees it whole, its box clear of that tile's inner edges: a piece always touches the
edge that cuts it. Such a whole view beside the owner's view is caught after: of two boxes from
different tiles with IoU above ``SEAM_IOU``, the lower score goes.

Masks are written by region: each kept mask is encoded as a COCO RLE of the whole image from its
own crop (``region_rle``), never as one full-size array per cell.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torchvision.ops import box_iou
from torchvision.transforms.v2.functional import resize

from leukodet.data.scale import cell_diameter, check_um_per_px
from leukodet.preprocess.mapper import CellScale, border_median
from leukodet.structures import (Detections, ImagePredictions, OperatingPoint, describe_tiling, refilter,
                                 region_rle, rle_areas)

logger = logging.getLogger(__name__)

SEAM_IOU = 0.5  # two boxes from different tiles overlapping this much are one cell
MIN_STRIDE_FRACTION = 0.25  # tiles advance by at least this share of their side


@dataclass(frozen=True)
class TileGrid:
    """Square tiles of side ``tile`` overlapping by at least ``overlap`` (input pixels)."""

    tile: int
    overlap: int

    def __post_init__(self):
        if self.tile < 1 or not 0 <= self.overlap < self.tile:
            raise ValueError(f"tiles of {self.tile} px need 0 <= overlap < tile, got overlap {self.overlap}")

    def starts(self, length: int) -> list[int]:
        """Tile starts along one axis: the first at 0, the last flush with the far edge, evenly
        spaced between (so the overlap is at least ``overlap``); one tile when it fits."""
        if length <= self.tile:
            return [0]
        count = math.ceil((length - self.overlap) / (self.tile - self.overlap))
        return [int(round(s)) for s in np.linspace(0, length - self.tile, count)]

    def cores(self, length: int) -> list[tuple[int, int, float, float]]:
        """Per tile along one axis: (start, end, core start, core end); the cores run to the
        middle of each overlap and partition [0, length)."""
        starts = self.starts(length)
        ends = [min(s + self.tile, length) for s in starts]
        out = []
        for i, (start, end) in enumerate(zip(starts, ends)):
            low = 0.0 if i == 0 else (start + ends[i - 1]) / 2
            high = float(length) if i == len(starts) - 1 else (starts[i + 1] + end) / 2
            out.append((start, end, low, high))
        return out

    def tiles(self, width: int, height: int) -> list[tuple[tuple[int, int, int, int], tuple[float, float, float, float]]]:
        """((x0, y0, x1, y1) of the tile, (x0, y0, x1, y1) of its core) for every tile, row by row."""
        return [((x0, y0, x1, y1), (cx0, cy0, cx1, cy1))
                for y0, y1, cy0, cy1 in self.cores(height) for x0, x1, cx0, cx1 in self.cores(width)]


@dataclass(frozen=True)
class TileScale:
    """How an input reaches the network at the trained scale: its cell diameter in the detector's
    input pixels (after the preprocessing chain), the cell diameter the network was trained at,
    the detector's square input side (``min_size``) and the overlap in cell diameters;
    ``network_resizes``: whether the detector resizes a tile to ``network_px`` itself (else
    ``predict_tiled`` does)."""

    input_cell_px: float
    trained_cell_px: float
    network_px: int
    overlap_cells: float = 1.25
    network_resizes: bool = True

    def grid(self) -> TileGrid:
        tile = max(1, round(self.network_px * self.input_cell_px / self.trained_cell_px))
        overlap = math.ceil(self.overlap_cells * self.input_cell_px)
        widest = int(tile * (1 - MIN_STRIDE_FRACTION))
        if overlap > widest:
            logger.warning("cells of %.0f px in tiles of %d px: the overlap is capped at %d px, so cells wider than "
                           "that may be cut; train at a smaller cell size (fewer network pixels per cell)",
                           self.input_cell_px, tile, widest)
            overlap = widest
        return TileGrid(tile, overlap)


def pad_tile(crop: torch.Tensor, side: int) -> torch.Tensor:
    """A (3, h, w) tile padded to ``side`` x ``side`` (bottom and right) with the median colour of
    its one-pixel border, when the image is smaller than a tile: the detector's resize factor then
    stays the trained one, and the padding is the smear's background, not an edge."""
    if crop.shape[-2:] == (side, side):
        return crop
    background = torch.from_numpy(border_median(crop.permute(1, 2, 0).numpy()))
    padded = background.view(3, 1, 1).expand(3, side, side).clone()
    padded[:, :crop.shape[1], :crop.shape[2]] = crop
    return padded


def tile_source(sample: dict):
    """(read(x0, y0, x1, y1) -> (3, h, w) uint8 tile, width, height) for a mapper sample: slices of
    its preprocessed image, or tiles read and preprocessed by region (``DatasetMapper.map_regions``)."""
    regions = sample.get("regions")
    if regions is not None:
        return regions.tile, regions.width, regions.height
    image = sample["image"]
    return (lambda x0, y0, x1, y1: image[:, y0:y1, x0:x1]), image.shape[-1], image.shape[-2]


def tile_predictions(det: Detections, offset: tuple[float, float], scale: tuple[float, float],
                     orig_size: tuple[int, int]) -> ImagePredictions:
    """One tile's detections (tile pixels) in file pixels, each mask encoded from its own box crop."""
    sx, sy = scale
    dx, dy = offset
    boxes = det.boxes.cpu().float().numpy() + np.array([dx, dy, dx, dy], np.float32)
    rles = None
    if det.masks is not None:
        width, height = orig_size
        rles = []
        for mask, box in zip(det.masks.cpu().numpy(), det.boxes.cpu().numpy()):
            bx0, by0 = (max(int(math.floor(v)) - 1, 0) for v in box[:2])
            bx1, by1 = min(int(math.ceil(box[2])) + 1, mask.shape[1]), min(int(math.ceil(box[3])) + 1, mask.shape[0])
            crop = mask[by0:by1, bx0:bx1]
            x0, y0 = bx0 + dx, by0 + dy
            if (sx, sy) != (1.0, 1.0) and crop.size:  # back to file pixels: nearest, as to_original does
                fx0, fy0 = int(round(x0 / sx)), int(round(y0 / sy))
                fw = max(1, int(round((x0 + crop.shape[1]) / sx)) - fx0)
                fh = max(1, int(round((y0 + crop.shape[0]) / sy)) - fy0)
                rows = np.minimum((np.arange(fh) * crop.shape[0] / fh).astype(int), crop.shape[0] - 1)
                cols = np.minimum((np.arange(fw) * crop.shape[1] / fw).astype(int), crop.shape[1] - 1)
                crop, x0, y0 = crop[rows][:, cols], fx0, fy0
            rles.append(region_rle(crop, x0, y0, height, width))
    boxes /= np.array([sx, sy, sx, sy], np.float32)
    return ImagePredictions(boxes, det.scores.cpu().numpy().astype(np.float32),
                            det.labels.cpu().numpy().astype(np.int64), rles)


def concatenate(parts: Sequence[ImagePredictions]) -> ImagePredictions:
    with_masks = parts[0].rles is not None
    return ImagePredictions(np.concatenate([p.boxes for p in parts]).reshape(-1, 4).astype(np.float32),
                            np.concatenate([p.scores for p in parts]).astype(np.float32),
                            np.concatenate([p.labels for p in parts]).astype(np.int64),
                            [r for p in parts for r in p.rles] if with_masks else None)


def clear_of_inner_edges(boxes: np.ndarray, window: tuple[float, float, float, float],
                         image_size: tuple[float, float], margin: float = 1.0) -> np.ndarray:
    """Which boxes keep ``margin`` pixels from every edge of their tile ``window`` that lies inside
    the image (an image edge cuts no cell): whole cells, not pieces of cells the tile cuts."""
    x0, y0, x1, y1 = window
    width, height = image_size
    clear = np.ones(len(boxes), bool)
    for side, edge, inner in ((0, x0, x0 > 0), (1, y0, y0 > 0)):
        if inner:
            clear &= boxes[:, side] > edge + margin
    for side, edge, inner in ((2, x1, x1 < width), (3, y1, y1 < height)):
        if inner:
            clear &= boxes[:, side] < edge - margin
    return clear


def merge_tiles(parts: Sequence[ImagePredictions], cores: Sequence[tuple[float, float, float, float]],
                windows: Sequence[tuple[float, float, float, float]], image_size: tuple[float, float]) -> ImagePredictions:
    """Each tile's detections (file pixels) kept where their cell's centre (``owning_centres``) lies
    in that tile's core, or where they are whole in that tile (``clear_of_inner_edges`` of its
    window), then the seam check across tiles (see the module doc). ``cores``, ``windows``,
    ``image_size``: file pixels."""
    merged = concatenate(parts)
    tiles = np.concatenate([np.full(len(part), index) for index, part in enumerate(parts)]).astype(np.int64)
    if not len(merged):
        return merged
    whole = np.concatenate([clear_of_inner_edges(part.boxes, window, image_size)
                            for part, window in zip(parts, windows)])
    centre, core = owning_centres(merged.boxes, merged.scores), np.asarray(cores, np.float64)[tiles]
    inside = ((centre[:, 0] >= core[:, 0]) & (centre[:, 0] < core[:, 2]) & (centre[:, 1] >= core[:, 1])
              & (centre[:, 1] < core[:, 3]))
    keep = np.nonzero(inside | whole)[0]
    merged, tiles = merged.select(keep), tiles[keep]
    if len(merged) < 2 or len(set(tiles.tolist())) < 2:
        return merged
    return merged.select(np.sort(seam_survivors(merged.boxes, merged.scores, tiles)))


def grid_squares(boxes: np.ndarray) -> np.ndarray:
    """(N, 2): each box's square of a grid whose side is the largest box side. Boxes that overlap
    above ``SEAM_IOU`` have centres closer than that side, so each box need be compared only with
    the boxes in the 3x3 squares around its own (``near``): the cost grows with the cells, not
    their square (a 36 MP field holds thousands)."""
    side = max(float(np.max(boxes[:, 2:] - boxes[:, :2])), 1.0)
    return np.floor((boxes[:, :2] + boxes[:, 2:]) / 2 / side).astype(np.int64)


def near(members: dict[tuple[int, int], list[int]], square: np.ndarray) -> list[int]:
    """The boxes listed in ``members`` (by square) in the 3x3 squares around ``square``."""
    gx, gy = (int(v) for v in square)
    return [j for dx in (-1, 0, 1) for dy in (-1, 0, 1) for j in members.get((gx + dx, gy + dy), ())]


def owning_centres(boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(N, 2): the centre that decides which tile's core owns each box: that of the best-scoring
    box, of any tile, overlapping it above ``SEAM_IOU`` (greedy by score, as NMS groups boxes).
    Two tiles' views of a cell then agree on its owner; by their own centres, box jitter can put
    each view's centre in the other tile's core, and a cell that neither tile holds whole (wider
    than the overlap) was dropped from both (seen once in a 400-field mosaic)."""
    squares, members = grid_squares(boxes), {}
    for index, square in enumerate(squares):
        members.setdefault((int(square[0]), int(square[1])), []).append(index)
    owner = np.full(len(boxes), -1, np.int64)
    for i in np.argsort(-scores, kind="stable"):
        if owner[i] >= 0:
            continue
        owner[i] = i
        free = np.asarray([j for j in near(members, squares[i]) if owner[j] < 0], np.int64)
        if len(free):
            overlapping = box_iou(torch.from_numpy(boxes[i:i + 1]), torch.from_numpy(boxes[free]))[0] > SEAM_IOU
            owner[free[overlapping.numpy()]] = i
    return ((boxes[:, :2] + boxes[:, 2:]) / 2)[owner]


def seam_survivors(boxes: np.ndarray, scores: np.ndarray, tiles: np.ndarray) -> np.ndarray:
    """Greedy by score: a box goes when a kept box of another tile overlaps it above ``SEAM_IOU``
    (compared within ``grid_squares``)."""
    squares, kept_in, keep = grid_squares(boxes), {}, []
    for i in np.argsort(-scores, kind="stable"):
        others = [j for j in near(kept_in, squares[i]) if tiles[j] != tiles[i]]
        if others and (box_iou(torch.from_numpy(boxes[i:i + 1]), torch.from_numpy(boxes[others])) > SEAM_IOU).any():
            continue
        keep.append(i)
        kept_in.setdefault((int(squares[i][0]), int(squares[i][1])), []).append(i)
    return np.asarray(keep, np.int64)


def predict_tiled(detector, sample: dict, scale: TileScale, point: OperatingPoint,
                  batch_size: int = 4) -> ImagePredictions:
    """One mapper sample predicted tile by tile at the trained scale, merged (module doc), in file
    pixels, cut at ``point``; the cap (``max_detections``) counts per tile, since a whole-field
    image holds as many cells as its tiles together."""
    read, width, height = tile_source(sample)
    grid = scale.grid()
    tiles = grid.tiles(width, height)
    cut = point.detector_cut()
    # a detector that sees its input unresized gets the tile at network size from here; tile_predictions
    # then takes its detections back through that factor too
    factor = 1.0 if scale.network_resizes else scale.network_px / grid.tile
    sx, sy = sample["scale"]
    orig_size = (sample["orig_width"], sample["orig_height"])
    parts = []
    for first in range(0, len(tiles), batch_size):
        chunk = tiles[first:first + batch_size]
        batch = [{**sample, "image": at_network_size(pad_tile(read(*box), grid.tile), factor)} for box, _ in chunk]
        for (box, _), det in zip(chunk, detector.predict(batch, cut)):
            parts.append(tile_predictions(det, (box[0] * factor, box[1] * factor), (sx * factor, sy * factor),
                                          orig_size))
    cores = [(cx0 / sx, cy0 / sy, cx1 / sx, cy1 / sy) for _, (cx0, cy0, cx1, cy1) in tiles]
    windows = [(x0 / sx, y0 / sy, x1 / sx, y1 / sy) for (x0, y0, x1, y1), _ in tiles]
    merged = merge_tiles(parts, cores, windows, (width / sx, height / sy))
    return refilter(merged, replace(point, max_detections=point.max_detections * len(tiles)))


def at_network_size(tile: torch.Tensor, factor: float) -> torch.Tensor:
    """A square (3, s, s) uint8 tile resized by ``factor`` (bilinear, antialiased, as torchvision's
    v2 resize does it), or as it is at factor 1."""
    if factor == 1.0:
        return tile
    side = round(tile.shape[-1] * factor)
    return resize(tile, [side, side], antialias=True)


def chain_factor(preprocess_cfg, width: int, height: int) -> tuple[float, float]:
    """(sx, sy) from file pixels to the preprocessing chain's output for a file of this size: the
    last ``scale`` step's (each sizes itself from the file), else (1, 1)."""
    from leukodet.preprocess.steps import target_size

    steps = [s for s in (preprocess_cfg.get("steps") or []) if s.get("name") == "scale"]
    if not steps:
        return 1.0, 1.0
    params = {k: v for k, v in dict(steps[-1]).items() if k != "name" and v is not None}
    tw, th = target_size((width, height), **params)
    return tw / width, th / height


def network_factor(width: float, height: float, min_size: int, max_size: int) -> float:
    """torchvision's GeneralizedRCNNTransform resize factor for an input of this size."""
    return min(min_size / min(width, height), max_size / max(width, height))


@dataclass(frozen=True)
class TrainedScale:
    """The scale a detector was trained at: the training cells' median diameter in file pixels
    (``cell_px``, what an input from the same microscope has; ``source_cell_px`` per source), the
    median diameter the network saw them at (``network_cell_px``) and its square input side
    (``network_px``, its ``min_size``); ``cell_um``, the median diameter in micrometres where every
    training source states its pixel size (``um_per_px``). ``fixed``: trained on windows at one cell size
    (``train.cell_px``, ``leukodet.preprocess.mapper.CellScale``), so it must be shown its
    inputs at that scale, in tiles; else whole images were squeezed to ``min_size`` and the
    network cell size is the median of what that made of them. ``network_resizes`` false: a model
    that saw its training images unresized (leukodet's detectron2 adapter): its network cell size is
    the preprocessed one, ``network_px`` its training images' median short side, and its tiles are
    resized to that before it sees them."""

    cell_px: float
    network_cell_px: float
    network_px: int
    source_cell_px: dict[str, float] | None = None
    fixed: bool = False
    cell_um: float | None = None
    network_resizes: bool = True

    @classmethod
    def measure(cls, records: Sequence[dict], preprocess_cfg, min_size: int, max_size: int,
                cell_px: float | None = None, network_resizes: bool = True) -> "TrainedScale | None":
        file_px, network_px, um, by_source, short_sides = [], [], [], {}, []
        for record in records:
            sx, _ = chain_factor(preprocess_cfg, record["width"], record["height"])
            short_sides.append(min(record["width"], record["height"]) * sx)
            factor = sx * (network_factor(record["width"] * sx, record["height"] * sx, min_size, max_size)
                           if network_resizes else 1.0)
            for annotation in record.get("annotations", []):
                diameter = cell_diameter(annotation)
                if diameter > 0:
                    file_px.append(diameter)
                    network_px.append(diameter * factor)
                    um.append(diameter * (record.get("um_per_px") or math.nan))
                    by_source.setdefault(record.get("source", ""), []).append(diameter)
        if not file_px:
            return None
        sources = {source: round(float(np.median(d)), 2) for source, d in sorted(by_source.items())}
        cell_um = None if np.isnan(um).any() else round(float(np.median(um)), 3)  # every source's pixel size known
        network_cell_px = float(cell_px) if cell_px is not None else float(np.median(network_px))
        # a model that sees its inputs unresized takes tiles as large as its training images were (so an
        # image of their scale and size is one tile, as it was trained), resized to that at other scales
        side = int(min_size) if network_resizes else int(round(float(np.median(short_sides))))
        return cls(float(np.median(file_px)), network_cell_px, side, sources, fixed=cell_px is not None,
                   cell_um=cell_um, network_resizes=network_resizes)

    def as_dict(self) -> dict:
        """Plain data for the checkpoint and ``run.json``; the keys added later only when set, so a
        checkpoint from before them describes itself as it did (an inference folder it made is
        still taken up where it stopped)."""
        return {"cell_px": round(self.cell_px, 2), "network_cell_px": round(self.network_cell_px, 2),
                "network_px": self.network_px,
                **({"source_cell_px": self.source_cell_px} if self.source_cell_px is not None else {}),
                **({"fixed": True} if self.fixed else {}),
                **({"cell_um": self.cell_um} if self.cell_um is not None else {}),
                **({} if self.network_resizes else {"network_resizes": False})}

    def cell_scale(self, random_crop: bool):
        """The mapper's ``CellScale`` that shows images to the network as it was trained (``fixed``)."""
        return CellScale(self.network_cell_px, dict(self.source_cell_px or {}), self.cell_px, self.network_px,
                         random_crop)


@dataclass(frozen=True)
class Tiling:
    """Tiled prediction settings for one run: the trained scale, the input's scale given for the
    run (``infer.cell_diameter_px``, its cells' diameter in file pixels, or ``infer.um_per_px``, its
    pixel size, with a checkpoint that knows its cells in micrometres), the overlap in cell
    diameters. Without a given scale, an image's cells are taken to be as large as its source's
    training cells where the checkpoint knows its source, else as the file's own pixel size makes
    them (a TIFF or slide stating one), else as all training cells."""

    trained: TrainedScale
    input_cell_px: float | None = None
    overlap_cells: float = 1.25
    input_um_per_px: float | None = None

    def __post_init__(self):
        if self.input_cell_px is not None and self.input_um_per_px is not None:
            raise ValueError("infer.cell_diameter_px and infer.um_per_px are both given: they say the same thing "
                             "two ways; keep one")
        if self.input_um_per_px is not None and self.trained.cell_um is None:
            raise ValueError("infer.um_per_px needs a checkpoint that knows its training cells in micrometres (a data "
                             "config whose sources state um_per_px); give infer.cell_diameter_px instead")

    def cell_px_for(self, record: dict) -> float:
        """The input cell diameter (file pixels) of an image from this record."""
        return self._scale_for(record)[0]

    def _scale_for(self, record: dict) -> tuple[float, bool]:
        """(input cell diameter in file pixels, whether the file's stated pixel size set it), by
        precedence: a given diameter, a given pixel size, the record's known source, the file's
        stated pixel size, the training cells' median."""
        if self.input_cell_px is not None:
            return self.input_cell_px, False
        if self.input_um_per_px is not None:
            return self.trained.cell_um / self.input_um_per_px, False
        known = (self.trained.source_cell_px or {}).get(record.get("source", ""))
        if known is not None:
            return known, False
        if record.get("um_per_px") and self.trained.cell_um is not None:
            return self.trained.cell_um / record["um_per_px"], True
        return self.trained.cell_px, False

    def stated_scale(self, record: dict) -> str:
        """``", at the file's 0.25 um/px: cells 32 px"`` when the file's stated pixel size set the
        image's scale (for its progress line), else ``""``."""
        cell_px, from_file = self._scale_for(record)
        return f", at the file's {record['um_per_px']:g} um/px: cells {cell_px:.0f} px" if from_file else ""

    def for_sample(self, sample: dict) -> TileScale:
        return TileScale(self.cell_px_for(sample.get("record") or {}) * sample["scale"][0],
                         self.trained.network_cell_px, self.trained.network_px, self.overlap_cells,
                         self.trained.network_resizes)

    def as_dict(self) -> dict:
        return {**self.trained.as_dict(), "input_cell_px": self.cell_px_for({}), "overlap_cells": self.overlap_cells,
                **({"input_um_per_px": self.input_um_per_px} if self.input_um_per_px is not None else {})}

    def describe(self) -> str:
        return describe_tiling(self.as_dict())


def found_cell_px(prediction: ImagePredictions) -> float | None:
    """The median equivalent diameter of the cells found (mask areas, else boxes), file pixels."""
    if len(prediction) == 0:
        return None
    if prediction.rles is not None:
        areas = rle_areas(prediction.rles).astype(np.float64)
        return float(np.median(2 * np.sqrt(areas / math.pi)))
    w = prediction.boxes[:, 2] - prediction.boxes[:, 0]
    h = prediction.boxes[:, 3] - prediction.boxes[:, 1]
    return float(np.median(np.sqrt(np.clip(w * h, 0, None))))


def scale_warning(prediction: ImagePredictions, expected_px: float, tolerance: float = 1.6) -> str | None:
    """A one-line warning when the cells found are far from the expected size (a likely wrong
    scale: ``infer.cell_diameter_px`` gives the folder's own)."""
    found = found_cell_px(prediction)
    if found is None or 1 / tolerance <= found / expected_px <= tolerance:
        return None
    return (f"cells found are {found:.0f} px across, the model expects {expected_px:.0f} px: a likely wrong scale; "
            f"give this folder's with infer.cell_diameter_px=... or infer.um_per_px=...")


def measure_trained_scale(cfg, records: Sequence[dict]) -> TrainedScale | None:
    """The cell scale a run's model trains at, from its training split (None for a model without
    the min_size / max_size resize rule, which then predicts whole images; a detectron2 model,
    which sees its images unresized, at their preprocessed scale). With ``train.cell_px``
    it trains on ``min_size`` windows at that cell size: refused for a model without the rule,
    or whose ``max_size`` would shrink such a window, or without a cell to measure."""
    cell_px = cfg.train.get("cell_px")
    min_size, max_size = cfg.model.get("min_size"), cfg.model.get("max_size")
    if cell_px is None:
        if min_size is None or max_size is None:
            return None
        return TrainedScale.measure(records, cfg.preprocess, int(min_size), int(max_size),
                                    network_resizes=not sees_inputs_unresized(cfg))
    refusal = cell_px_refusal(cfg, float(cell_px), min_size, max_size)
    if refusal:
        raise ValueError(f"train.cell_px={cell_px}: {refusal}")
    scale = TrainedScale.measure(records, cfg.preprocess, int(min_size), int(max_size), float(cell_px))
    if scale is None:
        raise ValueError(f"train.cell_px={cell_px}: the training split of {cfg.data.name} has no annotated cell to "
                         "measure its scale from")
    return scale


def sees_inputs_unresized(cfg) -> bool:
    """Whether the run's model sees its images at their preprocessed size: leukodet's detectron2
    adapter (detectron2 resizes in its own dataset mapper, which the one loop does not use), so
    ``min_size`` is not what its network sees."""
    return str((cfg.get("model") or {}).get("name", "")).startswith("d2_")


def cell_px_refusal(cfg, cell_px: float, min_size: int | None, max_size: int | None) -> str | None:
    """Why a model cannot train on windows at ``cell_px`` (None: it can)."""
    if min_size is None or max_size is None:
        return f"model {cfg.model.name} has no min_size / max_size input size rule to train windows at; drop it"
    if sees_inputs_unresized(cfg):
        return (f"detectron2 models ({cfg.model.name}) see images unresized, so they cannot be trained on windows "
                "at a cell size yet; use a torchvision model")
    if not 0 < cell_px < int(min_size):
        return f"give a cell diameter in network pixels between 0 and model.min_size ({min_size})"
    if int(max_size) < int(min_size):
        return (f"it needs model.max_size >= model.min_size (got {max_size} < {min_size}), so the detector keeps "
                "its square windows as they are")
    return None


def run_tiling(run_cfg, saved_scale: dict | None, training_records=None, enabled: bool | None = None) -> Tiling | None:
    """The tiling a checkpoint tool predicts with (``enabled``, default ``infer.tiling``; the input
    scale and overlap from ``infer``): the checkpoint's trained scale, else (a checkpoint from
    before it was recorded) one measured from ``training_records`` (a callable giving the run's
    training split, or None); None means whole images, as before."""
    infer_cfg = run_cfg.get("infer") or {}
    trained = TrainedScale(**saved_scale) if saved_scale else None
    if trained is not None and trained.network_resizes and sees_inputs_unresized(run_cfg):
        logger.warning("this detectron2 checkpoint records a trained scale that assumed a resize its model does not "
                       "do (saved before that was told apart): measuring it again from its training split")
        trained = None
    if not (infer_cfg.get("tiling", True) if enabled is None else enabled):
        if trained is None or not trained.fixed:
            return None
        if enabled is None:  # infer.tiling=false asked for whole images; evaluation's default is no request
            logger.warning("this model was trained on windows at %.0f px a cell (train.cell_px): it predicts in "
                           "tiles at that scale whatever infer.tiling says", trained.network_cell_px)
    if trained is None and training_records is not None:
        try:
            trained = measure_trained_scale(run_cfg, training_records())
        except (OSError, KeyError, ValueError) as err:
            logger.warning("no trained scale in the checkpoint and its training split cannot be read (%s)", err)
    if trained is None:
        logger.warning("the checkpoint records no trained cell scale: whole images are squeezed to the model's "
                       "input size (retrain to record it, or infer.tiling=false to silence this)")
        return None
    given = infer_cfg.get("cell_diameter_px")
    pixel_size = check_um_per_px(infer_cfg.get("um_per_px"), "infer")
    return Tiling(trained, float(given) if given else None, float(infer_cfg.get("tile_overlap", 1.25)), pixel_size)
