"""Where a model puts the boundary between one class and the rest on a set of images, from its raw
predictions alone (no label): each cell's class margin, and the valley between the two groups of
margins (Otsu's threshold).

On another scanner a model still finds the cells and ranks them within each class, but the boundary
between classes moves (README, Cross-validation): trained on one acquisition, the lymphocytes of the
other sit at lower margins. ``adapt.class_bias=otsu`` moves the boundary by as much as the valley of
the margins moved from the run's val split (``reference_valley``) to the new images
(``engine.adapt``), so the boundary keeps its place relative to the two groups, whatever their
sizes (the share of lymphocytes differs between labs, so matching the share of each class would
move it wrongly).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

from leukodet.structures import SAME_CELL_IOU, ImagePredictions, logit

MARGIN_LIMIT = 10.0  # logits either way: beyond, a cell is as sure of its class as can be
ABSENT_SCORE = 1e-3  # a class with no detection on a cell: far below any kept score (the raw floor is 0.05)
CELL_SCORE = 0.5  # a cell is a detection above this, of any class
MIN_CELLS = 10  # fewer margins cannot show two groups
# fewer margins place the valley roughly (a warning); the val valley is drawn toward margin 0 as if this
# many more cells sat there (reference_valley; README, Adapting to a new scanner)
ROUGH_CELLS = 30


def class_margins(predictions: Sequence[ImagePredictions], bias_class: int) -> np.ndarray:
    """Each cell's margin for ``bias_class``: the logit of its best score for that class minus the
    logit of its best score for any other (clipped to +-``MARGIN_LIMIT``). A cell is a detection
    above ``CELL_SCORE``, highest first, with every not yet taken detection of any class overlapping
    it at box IoU > ``SAME_CELL_IOU`` (Mask R-CNN scores each class apart, so one cell the model
    hesitates on carries a box per class)."""
    margins = []
    for found in predictions:
        if len(found) == 0:
            continue
        overlap = box_iou(torch.from_numpy(found.boxes).float(), torch.from_numpy(found.boxes).float()).numpy()
        taken = np.zeros(len(found), bool)
        for top in np.argsort(-found.scores, kind="stable"):
            if taken[top] or found.scores[top] <= CELL_SCORE:
                continue
            cell = (overlap[top] > SAME_CELL_IOU) & ~taken
            taken |= cell
            mine = found.labels[cell] == bias_class
            own = found.scores[cell][mine].max(initial=ABSENT_SCORE)
            other = found.scores[cell][~mine].max(initial=ABSENT_SCORE)
            margins.append(float(logit(own) - logit(other)))
    return np.clip(np.asarray(margins, np.float64), -MARGIN_LIMIT, MARGIN_LIMIT)


def otsu_threshold(margins: np.ndarray) -> float:
    """The margin that splits ``margins`` into the two groups with the most variance between them
    (Otsu 1979), midway between the two margins it falls between. By hand on the sorted values, not
    OpenCV's: that one quantizes to 8 bits and, where groups are apart, returns the first level of
    the gap (the lower group's edge) rather than the gap's middle; scikit-image is not a dependency."""
    values = np.sort(np.asarray(margins, np.float64))
    n = len(values)
    if n < MIN_CELLS or values[0] == values[-1]:
        raise ValueError(f"{n} cells{' of one margin' if n and values[0] == values[-1] else ''}: at least "
                         f"{MIN_CELLS} with different margins are needed to find the boundary between two groups")
    below = np.arange(1, n)  # a split after this many values
    low_sum = np.cumsum(values)[:-1]
    between = below * (n - below) * (low_sum / below - (values.sum() - low_sum) / (n - below)) ** 2
    between[values[1:] == values[:-1]] = -1  # no split between equal values
    split = int(np.argmax(between))
    return float((values[split] + values[split + 1]) / 2)


def reference_valley(valley: float, cells: int) -> float:
    """The val split's valley as the boundary's reference: drawn toward the model's own boundary
    (margin 0, equal scores) as if ``ROUGH_CELLS`` more cells sat there. A small val split places
    its valley by the few cells nearest the gap (leaving one acquisition out, 13 val cells put it
    anywhere from -5.0 to +2.7 logits over five seeds, 67 within +-0.9: README, Adapting to a new
    scanner); a large one holds it."""
    return valley * cells / (cells + ROUGH_CELLS)
