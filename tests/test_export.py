"""Fast inference and ONNX export: the vectorised mask paste equals torchvision's, the inference copy
(BatchNorm folded, channels-last, two stages) gives the trained model's detections, and the exported
graphs run by ONNX Runtime give them too."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

from leukodet.models.staged import fuse_frozen_batchnorm, inference_copy, paste_masks, resized_size
from leukodet.structures import OperatingPoint, to_original
from test_models import briefly_trained, tiny_batch

POINTS = [OperatingPoint(0.05, 0.5, 100), OperatingPoint(0.3, 0.3, 10)]


def paired(reference, other):
    """(same count and classes, max box difference px, max score difference, min mask IoU) of two
    lists of ImagePredictions, detections paired by class and box (``engine.export.agreement``)."""
    from leukodet.engine.export import agreement

    found = agreement(reference, other)
    if found.same_count_and_classes != found.images:
        return False, None, None, None
    return True, found.max_box_difference_px, found.max_score_difference, found.min_mask_iou or 1.0


def in_file_pixels(adapter, batch, point):
    width, height = batch[0]["image"].shape[-1], batch[0]["image"].shape[-2]
    return [to_original(d, (1.0, 1.0), (width, height)) for d in adapter.predict(batch, point)]


def test_paste_masks_equals_torchvisions_one_box_at_a_time():
    generator = torch.Generator().manual_seed(0)
    probabilities = torch.rand((40, 28, 28), generator=generator)
    corners = torch.rand((40, 2), generator=generator) * torch.tensor([150.0, 130.0])
    sizes = torch.rand((40, 2), generator=generator) * 60 + 1
    # clipped to the image as detections are; the paste's grown boxes then cross the border
    boxes = torch.cat([corners, corners + sizes], dim=1).clamp(min=0).minimum(torch.tensor([169.0, 149.0] * 2))
    expected = paste_masks_in_image(probabilities[:, None], boxes, (150, 170))[:, 0] > 0.5
    pasted = paste_masks(probabilities, boxes, 150, 170)
    assert pasted.shape == expected.shape and pasted.dtype == torch.bool
    assert expected.sum() > 1000  # the comparison is not between empty masks
    # the same bilinear samples summed in another order: a pixel within float rounding of 0.5 may flip
    assert (pasted != expected).sum() <= 3
    assert paste_masks(probabilities[:0], boxes[:0], 150, 170).shape == (0, 150, 170)


def test_agreement_pairs_detections_by_box_not_by_position():
    """Two detections whose scores tie within float rounding come out in either order: the pairing
    must not read that as a 100-px box difference (it failed CI on a barely trained ResNet-50)."""
    from leukodet.engine.export import agreement
    from leukodet.structures import ImagePredictions

    boxes = np.array([[10, 10, 40, 40], [100, 20, 130, 50], [60, 60, 90, 90]], np.float32)
    reference = ImagePredictions(boxes, np.array([0.9, 0.5, 0.5], np.float32), np.array([0, 1, 1]), None)
    swapped = reference.select([0, 2, 1])
    swapped.boxes[0] += 0.01
    found = agreement([reference], [swapped])
    assert found.ok and found.max_box_difference_px == pytest.approx(0.01, abs=1e-6)
    other_class = ImagePredictions(boxes, reference.scores, np.array([0, 0, 1]), None)
    assert not agreement([reference], [other_class]).ok


def test_batchnorm_folding_keeps_the_backbone_output():
    adapter = briefly_trained("maskrcnn_effnet_lite0")
    model = adapter.model.eval()
    image = torch.rand((1, 3, 160, 192), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model.backbone(image)
        folded = inference_copy(model, fuse=False, channels_last=False)
        assert fuse_frozen_batchnorm(folded.backbone) > 40  # every conv + frozen BN pair of EfficientNet-Lite0
        after = folded.backbone(image)
    for name in before:
        assert torch.allclose(before[name], after[name], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["maskrcnn_effnet_lite0", "maskrcnn_r50_fpn"])
def test_inference_copy_gives_the_trained_models_detections(name):
    adapter = briefly_trained(name)
    fast = adapter.for_inference()
    batch = tiny_batch()
    for point in POINTS:
        reference, candidate = in_file_pixels(adapter, batch, point), in_file_pixels(fast, batch, point)
        assert sum(len(r) for r in reference) > 0
        same, box_diff, score_diff, min_iou = paired(reference, candidate)
        assert same and box_diff < 0.05 and score_diff < 1e-4 and min_iou > 0.98


def test_resized_size_is_torchvisions():
    adapter = briefly_trained("maskrcnn_effnet_lite0")
    for height, width in ((160, 192), (300, 300), (97, 250), (480, 640)):
        image_list, _ = adapter.model.transform([torch.rand(3, height, width)])
        assert resized_size(adapter.model.transform, height, width) == tuple(image_list.image_sizes[0])


@pytest.mark.parametrize("masks", [True, False])
def test_onnxruntime_gives_the_pytorch_detections_at_any_image_size(tmp_path, masks):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")
    from leukodet.models.onnx_runtime import OnnxDetector, export_onnx

    adapter = briefly_trained("maskrcnn_effnet_lite0", masks=masks)
    fast = adapter.for_inference()
    batch = tiny_batch(masks=masks)
    exported = fast.model.to(memory_format=torch.contiguous_format)
    files = export_onnx(exported, batch[0]["image"].float() / 255, tmp_path / "model.onnx")
    assert [f.name for f in files] == (["model.onnx", "model.masks.onnx"] if masks else ["model.onnx"])
    transform = adapter.model.transform
    onnx = OnnxDetector(tmp_path / "model.onnx", 2, transform.min_size[-1], transform.max_size, threads=1)
    assert onnx.has_masks == masks
    for size in ((160, 192), (200, 150)):  # the traced size and another one
        sized = tiny_batch(masks=masks, size=size)
        for point in POINTS:
            reference, candidate = in_file_pixels(fast, sized, point), in_file_pixels(onnx, sized, point)
            assert sum(len(r) for r in reference) > 0 or point != POINTS[0]
            same, box_diff, score_diff, min_iou = paired(reference, candidate)
            assert same and box_diff < 0.05 and score_diff < 1e-4 and min_iou > 0.98, (size, point)
    with pytest.raises(ValueError, match="below the ONNX model's score floor"):
        onnx.predict(batch, OperatingPoint(0.01, 0.5, 100))



def test_flip_tta_is_mirror_symmetric_and_its_raw_detections_refilter_exactly():
    from dataclasses import replace

    from leukodet.models.tta import FlipTTA, mirrored
    from leukodet.structures import RAW, refilter

    adapter = briefly_trained("maskrcnn_effnet_lite0")
    tta = FlipTTA(adapter.for_inference())
    batch = tiny_batch()
    point = OperatingPoint(0.1, 0.5, 300)
    direct = tta.predict(batch, point)
    plain = adapter.predict(batch, point)
    assert sum(len(d) for d in direct) > sum(len(p) for p in plain) > 0  # the mirror adds detections
    # predicting the mirror image gives the mirrored detections: the two passes only swap roles
    swapped = tta.predict([{**s, "image": s["image"].flip(-1)} for s in batch], point)
    for d, s in zip(direct, swapped):
        back = mirrored(s, batch[0]["image"].shape[-1])
        order_d, order_s = d.scores.argsort(), back.scores.argsort()
        assert torch.allclose(d.scores[order_d], back.scores[order_s], atol=1e-4)
        assert torch.allclose(d.boxes[order_d], back.boxes[order_s], atol=0.05)
    # cutting the pooled raw detections later gives what the wrapper gives at the point
    raw = [to_original(d, (1.0, 1.0), (192, 160)) for d in tta.predict(batch, replace(RAW, min_confidence=0.05))]
    for r, d in zip(raw, direct):
        again, want = refilter(r, point), to_original(d, (1.0, 1.0), (192, 160))
        assert np.array_equal(again.labels, want.labels) and np.allclose(again.scores, want.scores)
        assert [m["counts"] for m in again.rles] == [m["counts"] for m in want.rles]
