"""Matching edge cases (DESIGN.md "Metric definitions") on hand-made geometry, counted by hand."""

import numpy as np
import pytest

from leukodet.evaluation.matching import match_image, match_points

H, W = 48, 64
A, B = 0, 1  # two classes


def box_mask(x0, y0, x1, y1):
    mask = np.zeros((H, W), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def run(gt, pred, iou_type="segm", **kwargs):
    """gt: [(box, label)], pred: [(box, label, score)]; masks are the filled boxes."""
    gt_boxes = np.array([g[0] for g in gt], np.float64).reshape(-1, 4)
    pred_boxes = np.array([p[0] for p in pred], np.float64).reshape(-1, 4)
    masks = kwargs.pop("masks", None) or (np.array([box_mask(*g[0]) for g in gt]).reshape(-1, H, W),
                                          np.array([box_mask(*p[0]) for p in pred]).reshape(-1, H, W))
    return match_image(gt_boxes, [g[1] for g in gt], pred_boxes, [p[2] for p in pred], [p[1] for p in pred], 2,
                       gt_masks=masks[0], pred_masks=masks[1], iou_type=iou_type, **kwargs)


def counts(result):
    t = result.tally
    return t.tp.tolist(), t.fp.tolist(), t.fn.tolist(), (t.any_tp, t.any_fp, t.any_fn)


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_ground_truth_at_index_0_is_matched(iou_type):
    result = run([((0, 0, 20, 20), A)], [((1, 0, 21, 20), A, 0.9)], iou_type)
    assert result.matched.tolist() == [0]
    assert counts(result) == ([1, 0], [0, 0], [0, 0], (1, 0, 0))


def test_prediction_over_two_ground_truths_takes_the_higher_iou():
    # IoU with the first is 340/460 = 0.74, with the second 380/420 = 0.90: both above 0.5
    result = run([((0, 0, 20, 20), A), ((4, 0, 24, 20), A)], [((3, 0, 23, 20), A, 0.9)])
    assert result.matched.tolist() == [1]
    assert counts(result) == ([1, 0], [0, 0], [1, 0], (1, 0, 1))


def test_two_predictions_on_one_ground_truth_highest_score_first():
    # the first prediction overlaps better (IoU 1 vs 0.82) but scores lower: score order decides
    result = run([((0, 0, 20, 20), A)], [((0, 0, 20, 20), A, 0.6), ((2, 0, 22, 20), A, 0.9)])
    assert result.matched.tolist() == [-1, 0]
    assert counts(result) == ([1, 0], [1, 0], [0, 0], (1, 1, 0))


def test_empty_ground_truth_all_predictions_are_false_positives():
    result = run([], [((0, 0, 20, 20), A, 0.9), ((30, 0, 50, 20), B, 0.5)])
    assert result.matched.tolist() == [-1, -1]
    assert counts(result) == ([0, 0], [1, 1], [0, 0], (0, 2, 0))
    assert result.tally.confusion[2].tolist() == [1, 1, 0]  # background row


def test_no_predictions_all_ground_truth_missed():
    result = run([((0, 0, 20, 20), A), ((30, 0, 50, 20), B), ((30, 25, 50, 45), B)], [])
    assert counts(result) == ([0, 0], [0, 0], [1, 2], (0, 0, 3))
    assert result.tally.confusion[:, 2].tolist() == [1, 2, 0]  # background column


def test_nothing_at_all():
    assert counts(run([], [])) == ([0, 0], [0, 0], [0, 0], (0, 0, 0))


def test_wrong_class_match_is_fp_and_fn_but_a_found_cell():
    result = run([((0, 0, 20, 20), A)], [((0, 0, 20, 20), B, 0.9)])
    assert result.matched.tolist() == [0]  # matching ignores class
    assert counts(result) == ([0, 0], [0, 1], [1, 0], (1, 0, 0))
    assert result.tally.confusion.tolist() == [[0, 1, 0], [0, 0, 0], [0, 0, 0]]


def test_iou_of_exactly_the_threshold_matches():
    result = run([((0, 0, 20, 20), A)], [((0, 0, 20, 10), A, 0.9)])  # IoU 200/400
    assert result.matched.tolist() == [0]


def test_segm_compares_masks_and_bbox_compares_boxes():
    ys, xs = np.mgrid[:H, :W]
    in_box = (xs < 20) & (ys < 20)
    upper, lower = (in_box & (xs > ys)).astype(np.uint8), (in_box & (xs <= ys)).astype(np.uint8)
    gt, pred = [((0, 0, 20, 20), A)], [((0, 0, 20, 20), A, 0.9)]  # same box, disjoint triangles
    assert run(gt, pred, "segm", masks=(upper[None], lower[None])).matched.tolist() == [-1]
    assert run(gt, pred, "bbox", masks=(upper[None], lower[None])).matched.tolist() == [0]


def test_match_points_one_to_one_nearest_to_the_centre():
    points = np.array([[5.0, 5.0], [15.0, 15.0], [40.0, 40.0]])
    boxes = np.array([[0, 0, 22, 22], [8, 8, 30, 30], [45, 45, 60, 47]])
    # the best-scoring box holds points 0 and 1 and takes point 1 (nearer its centre 11, 11);
    # the second holds only point 1, now taken; the third holds none
    assert match_points([0.9, 0.8, 0.7], boxes, points).tolist() == [1, -1, -1]
    assert match_points([0.7, 0.8, 0.9], boxes, points).tolist() == [0, 1, -1]


def test_match_points_uses_the_mask_when_there_is_one():
    from pycocotools import mask as mask_utils

    ys, xs = np.mgrid[:H, :W]
    triangle = np.asfortranarray(((xs < 20) & (ys < 20) & (xs > ys)).astype(np.uint8))
    rle = mask_utils.encode(triangle)
    inside, outside = np.array([[15.0, 3.0]]), np.array([[3.0, 15.0]])  # both inside the box
    box = np.array([[0, 0, 20, 20]])
    assert match_points([0.9], box, inside, [rle]).tolist() == [0]
    assert match_points([0.9], box, outside, [rle]).tolist() == [-1]
    assert match_points([0.9], box, outside).tolist() == [0]


def test_points_count_as_ground_truth_after_instances():
    # one outlined cell (A) and two count-only points (B at 40,10; A at 40,35)
    result = run([((0, 0, 20, 20), A)], [((0, 0, 20, 20), A, 0.9), ((30, 0, 50, 20), B, 0.8),
                                         ((30, 25, 50, 45), B, 0.7), ((55, 30, 63, 40), A, 0.6)],
                 points_xy=np.array([[40.0, 10.0], [40.0, 35.0]]), point_labels=[B, A])
    assert result.matched.tolist() == [0, -1, -1, -1]
    assert result.matched_point.tolist() == [-1, 0, 1, -1]
    # TP: the cell and point 0; wrong class on point 1 (FP B, FN A); the last prediction is on nothing
    assert counts(result) == ([1, 1], [1, 1], [1, 0], (3, 1, 0))
