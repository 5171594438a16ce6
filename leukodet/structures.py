"""The plain structures every layer shares: detections, per-image predictions and the operating point.

Models return ``Detections`` (torch, model-input pixels). Everything after the model works on
``ImagePredictions`` (numpy, the file's pixels, masks as COCO RLE): RLE keeps hundreds of cell
masks per image small, and pycocotools computes mask IoU on it in C. The operating point (class
score bias, min confidence, NMS, cap) is one value, ``OperatingPoint``, applied by one function,
``refilter``, for validation, evaluation, sweeps, count tables and inference alike.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torchvision.ops import batched_nms, nms

# Raw detections keep every candidate scored above this, with no final NMS, up to this many per
# image: a threshold sweep re-filters them instead of re-running the model.
RAW_SCORE_FLOOR = 0.05
RAW_MAX_DETECTIONS = 1000
SAME_CELL_IOU = 0.5  # detections of two classes on one cell overlap at least this much


def scoring_floor(min_confidence: float, floor: float = RAW_SCORE_FLOOR) -> float:
    """The lowest score an evaluation keeps: AP is scored over every score above it, P/R/F1 and
    counts above ``min_confidence`` (see ``leukodet.evaluation.metrics.Evaluator``)."""
    return min(floor, min_confidence)


@dataclass(frozen=True)
class OperatingPoint:
    """Where a detector's output is cut: each class's scores shifted by its ``class_bias`` (logits;
    empty: none), then score > ``min_confidence``, per-class NMS at IoU ``nms``, then (with
    ``cross_class_nms``) NMS across classes at that IoU, then the ``max_detections`` highest scores;
    ``source`` says where the values came from.

    ``cross_class_nms``: a cell has one class, but per-class NMS keeps a lymphocyte and an "other"
    box on the same cell when the model hesitates between them, and counts it twice; across
    classes the lower score goes. None: off (the detectors' own behaviour).

    The bias moves the boundary between classes without retraining: on another scanner the
    within-class ranking of a model's scores often survives while the lymphocyte/other boundary
    moves (README, Cross-validation), and a bias chosen on a few labelled images of it puts the
    boundary back."""

    min_confidence: float = 0.5
    nms: float = 0.5
    max_detections: int = 300
    source: str = "default"
    class_bias: tuple[float, ...] = ()
    cross_class_nms: float | None = None

    def scored(self) -> "OperatingPoint":
        """The same bias, NMS and cap down to the scoring floor: what an evaluation needs (AP over
        all scores; the evaluator applies min confidence itself, and NMS and cap commute with a
        higher score cut, so the point's own figures are unchanged)."""
        return replace(self, min_confidence=scoring_floor(self.min_confidence))

    def with_bias_suppression(self) -> "OperatingPoint":
        """This point, suppressing across classes at ``SAME_CELL_IOU`` when a class bias moves its
        boundary and it sets no ``cross_class_nms`` of its own: the bias lifts a hesitant cell's box
        of the other class over the min confidence, and the cell would count twice."""
        if not any(self.class_bias) or self.cross_class_nms is not None:
            return self
        return replace(self, cross_class_nms=SAME_CELL_IOU)

    def detector_cut(self) -> "OperatingPoint":
        """The point a detector may cut its own output at so that ``refilter`` at this point gives
        the same as on raw detections: itself without a bias; with one, the lowest unbiased score
        any class could pass with and the raw cap (a per-class bias keeps the order within each
        class, so per-class NMS keeps the same boxes; only the cap's order across classes moves)."""
        if not any(self.class_bias):
            # the detector suppresses within classes only; refilter then suppresses across them
            return self if self.cross_class_nms is None else replace(self, cross_class_nms=None)
        floor = min(unbias(self.min_confidence, bias) for bias in self.class_bias)
        return OperatingPoint(max(floor, 0.0), self.nms, RAW_MAX_DETECTIONS, self.source)

    def describe(self) -> str:
        bias = f", class bias {list(self.class_bias)}" if any(self.class_bias) else ""
        across = "" if self.cross_class_nms is None else f", across classes {self.cross_class_nms:g}"
        return (f"min confidence {self.min_confidence:g}, NMS {self.nms:g}{across}, at most {self.max_detections}"
                f"{bias} ({self.source})")


def logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def unbias(score: float, bias: float) -> float:
    """The unbiased score that ``bias`` raises to ``score``."""
    return float(1 / (1 + np.exp(-(logit(score) - bias))))


RAW = OperatingPoint(RAW_SCORE_FLOOR, 1.0, RAW_MAX_DETECTIONS, "raw")


@dataclass
class Detections:
    """One image's detections as a model gives them, on the CPU. ``labels`` are 0-based class ids;
    ``masks`` is bool (K, H, W) at the model input's size, or None for a box-only model."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.scores)


@dataclass
class ImagePredictions:
    """One image's predictions in the file's pixels."""

    boxes: np.ndarray  # (K, 4) float32 XYXY
    scores: np.ndarray  # (K,) float32
    labels: np.ndarray  # (K,) int64, 0-based
    rles: list[dict] | None  # K COCO RLEs at the file's size, or None (box-only)

    def __len__(self) -> int:
        return len(self.scores)

    def select(self, keep) -> "ImagePredictions":
        keep = np.asarray(keep, dtype=np.int64)
        return ImagePredictions(self.boxes[keep], self.scores[keep], self.labels[keep],
                                None if self.rles is None else [self.rles[i] for i in keep])

    def above(self, min_confidence: float) -> "ImagePredictions":
        return self.select(np.nonzero(self.scores > min_confidence)[0])


def biased(predictions: ImagePredictions, class_bias: tuple[float, ...]) -> ImagePredictions:
    """``predictions`` with each class's scores moved by its bias in logit space (sigmoid(logit(s)
    + bias)): a monotone map within each class, so a class's ranking (its AP) is unchanged."""
    if not any(class_bias) or len(predictions) == 0:
        return predictions
    if int(predictions.labels.max()) >= len(class_bias):
        raise ValueError(f"class bias {list(class_bias)} has {len(class_bias)} values; the detections have "
                         f"class ids up to {int(predictions.labels.max())}")
    shifted = logit(predictions.scores) + np.asarray(class_bias, np.float64)[predictions.labels]
    scores = (1 / (1 + np.exp(-shifted))).astype(np.float32)
    return ImagePredictions(predictions.boxes, scores, predictions.labels, predictions.rles)


def refilter(predictions: ImagePredictions, point: OperatingPoint) -> ImagePredictions:
    """Raw ``predictions`` cut at ``point``: class bias, score > min confidence, per-class NMS, the
    cap, in torchvision RoIHeads' (and detectron2's) own order, with the point's NMS across classes
    before the cap. On raw detections this gives exactly what the detector gives at that point, since
    each Mask R-CNN mask depends on its box alone (tested for every registered torchvision model).
    Apply it once: a second call would add the bias again."""
    kept = biased(predictions, point.class_bias).above(point.min_confidence)
    if len(kept) == 0:
        return kept
    boxes, scores = torch.from_numpy(kept.boxes).float(), torch.from_numpy(kept.scores).float()
    order = batched_nms(boxes, scores, torch.from_numpy(kept.labels), point.nms)  # by descending score
    if point.cross_class_nms is not None:
        order = order[nms(boxes[order], scores[order], point.cross_class_nms)]
    return kept.select(order[:point.max_detections].numpy())


def encode_masks(masks: np.ndarray) -> list[dict]:
    """(K, H, W) bool/uint8 -> K RLEs (counts kept as bytes, as pycocotools makes them)."""
    if len(masks) == 0:
        return []
    return mask_utils.encode(np.asfortranarray(np.ascontiguousarray(masks, dtype=np.uint8).transpose(1, 2, 0)))


def rle_counts(rle: dict) -> np.ndarray:
    """The run lengths of a COCO RLE (zeros first, column-major), from its compressed string.
    pycocotools decodes only to a full-size array; this is its string format (maskApi.c rleFrString)
    in a few lines, so a mask can be read back by region."""
    counts = rle["counts"]
    if not isinstance(counts, (bytes, str)):
        return np.asarray(counts, np.int64)
    data = counts.encode("ascii") if isinstance(counts, str) else counts
    out: list[int] = []
    p = 0
    while p < len(data):
        value, shift, more = 0, 0, True
        while more:
            c = data[p] - 48
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            p += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(out) > 2:
            value += out[-2]
        out.append(value)
    return np.asarray(out, np.int64)


def crop_rle(rle: dict, box: tuple[int, int, int, int]) -> np.ndarray:
    """The bool mask of ``rle`` inside ``box`` = (x0, y0, x1, y1) (pixels, clipped to the image),
    decoded from the runs that cross it: the cost follows the cell, not the image (a 36 MP field
    holds thousands of cells, and a full decode of each is 36 MB)."""
    height, width = rle["size"]
    x0, y0 = max(int(box[0]), 0), max(int(box[1]), 0)
    x1, y1 = min(int(box[2]), width), min(int(box[3]), height)
    if x1 <= x0 or y1 <= y0:
        return np.zeros((max(y1 - y0, 0), max(x1 - x0, 0)), bool)
    ends = np.cumsum(rle_counts(rle))
    starts = np.concatenate([[0], ends[:-1]])
    first, last = x0 * height, x1 * height  # the columns' flat range, column-major
    ones = np.zeros(last - first, bool)
    for start, end in zip(starts[1::2], ends[1::2]):
        if end > first and start < last:
            ones[max(start, first) - first:min(end, last) - first] = True
    return ones.reshape(x1 - x0, height).T[y0:y1]


def region_rle(crop: np.ndarray, x0: int, y0: int, height: int, width: int) -> dict:
    """The COCO RLE, on a ``height`` x ``width`` canvas, of the bool mask ``crop`` placed with its
    top-left pixel at (x0, y0); parts outside the canvas are dropped. Written here because
    pycocotools only encodes whole arrays: runs are counted from the crop's own pixels (column-major,
    as COCO counts them), so the cost follows the cell, not the image."""
    ys, xs = np.nonzero(crop)
    ys, xs = ys + y0, xs + x0
    inside = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
    index = np.sort(xs[inside].astype(np.int64) * height + ys[inside])
    total = height * width
    if len(index) == 0:
        counts = [total]
    else:
        breaks = np.nonzero(np.diff(index) != 1)[0]
        starts = np.concatenate([[index[0]], index[breaks + 1]])
        ends = np.concatenate([index[breaks] + 1, [index[-1] + 1]])
        zeros_before = np.concatenate([[starts[0]], starts[1:] - ends[:-1]])
        counts = np.stack([zeros_before, ends - starts], axis=1).ravel().tolist()
        if total > ends[-1]:  # COCO writes no empty run at the end
            counts.append(int(total - ends[-1]))
    return mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)


def rle_areas(rles: list[dict]) -> np.ndarray:
    """Pixel areas of RLE masks. pycocotools' ``area`` sizes its output with a uint8 count, which
    NumPy 2 refuses above 255 masks (a whole field holds more), so it is called in chunks."""
    return np.concatenate([mask_utils.area(rles[i:i + 255]) for i in range(0, len(rles), 255)] or [np.zeros(0)])


def mask_box(rle: dict, margin: int = 1) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) integer bounds of an RLE mask, grown by ``margin``."""
    x, y, w, h = mask_utils.toBbox(rle)
    return (int(x) - margin, int(y) - margin, int(np.ceil(x + w)) + margin, int(np.ceil(y + h)) + margin)


def to_original(det: Detections, scale: tuple[float, float], orig_size: tuple[int, int]) -> ImagePredictions:
    """Detections in model-input pixels -> ImagePredictions in file pixels (``orig_size`` = (W, H)).

    Masks are resized one at a time, so memory stays at one full-size mask per detection's RLE.
    """
    sx, sy = scale
    boxes = det.boxes.cpu().float() / torch.tensor([sx, sy, sx, sy])
    rles = None
    if det.masks is not None:
        masks = det.masks.cpu()
        width, height = orig_size
        if masks.shape[-2:] == (height, width):
            rles = encode_masks(masks.numpy())
        else:
            rles = [encode_masks(F.interpolate(m[None, None].float(), size=(height, width), mode="nearest")[0].numpy())[0]
                    for m in masks]
    return ImagePredictions(boxes.numpy(), det.scores.cpu().numpy().astype(np.float32),
                            det.labels.cpu().numpy().astype(np.int64), rles)


def describe_tiling(tiling: dict | None) -> str:
    """A run's tiling settings (``Tiling.as_dict``, as run.json stores them) in words."""
    if not tiling:
        return "whole images squeezed to the model's input size (infer.tiling=false)"
    given = f" (at {tiling['input_um_per_px']:g} um/px)" if tiling.get("input_um_per_px") else ""
    microns = f", {tiling['cell_um']:g} um" if tiling.get("cell_um") else ""
    return (f"tiled at the trained scale: input cells {tiling['input_cell_px']:.1f} px{given}, trained cells "
            f"{tiling['cell_px']:.1f} px{microns} ({tiling['network_cell_px']:.1f} px in the network's "
            f"{tiling['network_px']}-px input), overlap {tiling['overlap_cells']:g} cell diameters; each image's "
            "in counts.csv (cell_diameter_px)")
