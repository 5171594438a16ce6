"""Moving the boundary between classes on a new acquisition from unlabelled predictions (issue 27):
each cell's class margin, the valley between the two groups, and the shift that puts it back."""

from __future__ import annotations

import numpy as np
import pytest

from leukodet.evaluation.boundary import MARGIN_LIMIT, ROUGH_CELLS, class_margins, otsu_threshold, reference_valley
from leukodet.structures import ImagePredictions, OperatingPoint, logit, refilter

LYMPHOCYTE, OTHER = 0, 1


def field(cells: list[tuple[float, float]]) -> ImagePredictions:
    """One image whose cells each carry a lymphocyte and an "other" detection (scores given), on
    nearly the same box, as Mask R-CNN gives a cell it hesitates on; cells 100 px apart."""
    boxes, scores, labels = [], [], []
    for i, (lymphocyte, other) in enumerate(cells):
        x = 100.0 * i
        boxes += [[x, 0, x + 60, 60], [x + 2, 1, x + 61, 62]]
        scores += [lymphocyte, other]
        labels += [LYMPHOCYTE, OTHER]
    return ImagePredictions(np.array(boxes, np.float32), np.array(scores, np.float32), np.array(labels), None)


def acquisition(lymphocytes: int, others: int, lymphocyte_cell, other_cell) -> list[ImagePredictions]:
    """Fields of one cell each: ``lymphocytes`` then ``others``, scores spread a little cell to cell."""
    spread = np.linspace(-0.03, 0.03, max(lymphocytes, others))
    return ([field([tuple(np.add(lymphocyte_cell, (d, -d)))]) for d in spread[:lymphocytes]]
            + [field([tuple(np.add(other_cell, (-d, d)))]) for d in spread[:others]])


def test_a_cells_margin_is_its_lymphocyte_logit_less_its_best_other_and_lone_boxes_are_not_cells():
    two_cells = field([(0.9, 0.3), (0.02, 0.97)])
    lone = ImagePredictions(np.array([[500, 0, 560, 60], [700, 0, 760, 60]], np.float32),
                            np.array([0.4, 0.99], np.float32), np.array([LYMPHOCYTE, OTHER]), None)
    margins = class_margins([two_cells], LYMPHOCYTE)  # cells in order of their best score
    assert margins == pytest.approx([logit(0.02) - logit(0.97), logit(0.9) - logit(0.3)])
    assert class_margins([two_cells], OTHER) == pytest.approx(-margins)
    # the 0.4 lymphocyte alone is no cell; the sure "other" with no lymphocyte box sits at the clip
    assert class_margins([lone, field([])], LYMPHOCYTE).tolist() == [-MARGIN_LIMIT]


def test_the_valley_is_midway_across_the_gap_whatever_the_groups_sizes():
    few_many = np.r_[np.linspace(-6, -4, 10), np.linspace(2, 4, 40)]
    many_few = np.r_[np.linspace(-6, -4, 40), np.linspace(2, 4, 10)]
    assert otsu_threshold(few_many) == pytest.approx(-1) and otsu_threshold(many_few) == pytest.approx(-1)
    with pytest.raises(ValueError, match="5 cells: at least 10"):
        otsu_threshold(few_many[:5])
    with pytest.raises(ValueError, match="of one margin"):
        otsu_threshold(np.full(20, -MARGIN_LIMIT))


def test_the_shift_puts_a_new_scanners_lymphocytes_back_on_their_side():
    # trained acquisition: 10 lymphocytes of 40 cells; the new one: half are lymphocytes, and the model
    # scores them lower (most would be called "other")
    val = acquisition(10, 30, (0.9, 0.2), (0.05, 0.95))
    new = acquisition(25, 25, (0.3, 0.8), (0.01, 0.97))
    truth = [LYMPHOCYTE] * 25 + [OTHER] * 25
    # the move of the valley from the trained acquisition's margins to the new one's (adapt.class_bias=otsu)

    def shift(reference: list[ImagePredictions], target: list[ImagePredictions]) -> float:
        margins = class_margins(reference, LYMPHOCYTE)
        new_valley = otsu_threshold(class_margins(target, LYMPHOCYTE))
        return reference_valley(otsu_threshold(margins), len(margins)) - new_valley

    assert 3 < shift(val, new) < 5

    def called(images: list[ImagePredictions], bias: float) -> list[list[int]]:
        point = OperatingPoint(0.5, 0.5, class_bias=(bias, 0.0), cross_class_nms=0.5)
        return [refilter(image, point).labels.tolist() for image in images]

    assert called(new, 0.0) == [[OTHER]] * 50  # unadapted: every lymphocyte called "other"
    assert called(new, shift(val, new)) == [[label] for label in truth]
    # the trained acquisition against itself: the boundary stays in the gap, every cell keeps its class
    assert abs(shift(val, val[5:])) < 1 and called(val, shift(val, val[5:])) == called(val, 0.0)


def test_a_small_val_split_places_the_reference_near_the_models_own_boundary():
    assert reference_valley(2.7, 13) == pytest.approx(2.7 * 13 / (13 + ROUGH_CELLS))  # 0.82: mostly margin 0
    assert reference_valley(-0.9, 67) == pytest.approx(-0.62, abs=0.01)  # mostly its own
    assert reference_valley(-3.0, 3000) == pytest.approx(-3.0, abs=0.05) and reference_valley(5.0, 0) == 0
