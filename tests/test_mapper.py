"""The one mapper: masks, boxes and points stay pixel-aligned through augmentation; train = infer pixels."""

import cv2
import numpy as np
import pytest
import torch

from leukodet.data.coco import load_dataset_dicts, write_coco
from leukodet.preprocess.mapper import CellScale, DatasetMapper, rasterize
from leukodet.data.via import LabelPolicy, read_via
from conftest import compose

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


@pytest.fixture(scope="module")
def sample_dicts(wbc_sample, tmp_path_factory):
    result = read_via(wbc_sample / "via_region_data.json", labels=LabelPolicy("cell_type"))
    classes = sorted({r.label for rec in result.records for r in rec.regions})
    path = write_coco(tmp_path_factory.mktemp("coco") / "all.json", result.records, classes)
    return load_dataset_dicts(path)[0]


@pytest.fixture
def coloured_shapes(tmp_path):
    """Each instance painted in its own pure colour (the last one a 4x4 square in the corner), and
    a point on one marked pixel, so masks, boxes and points can be checked against the pixels
    after any geometric transform."""
    image = np.zeros((60, 90, 3), np.uint8)
    polygons = [[5, 5, 30, 5, 30, 20, 5, 20], [50, 10, 80, 30, 55, 50], [10, 35, 40, 35, 25, 55], [1, 1, 5, 1, 5, 5, 1, 5]]
    annotations = []
    for i, poly in enumerate(polygons):
        image[rasterize([poly], 60, 90) > 0] = COLOURS[i]
        xs, ys = poly[0::2], poly[1::2]
        annotations.append({"bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)], "bbox_mode": 1,
                            "segmentation": [poly], "category_id": i, "iscrowd": 0})
    image[44, 70] = (255, 255, 255)
    cv2.imwrite(str(tmp_path / "shapes.png"), image[..., ::-1])
    return {"file_name": str(tmp_path / "shapes.png"), "image_id": 1, "height": 60, "width": 90,
            "annotations": annotations, "points": [{"xy": [70.5, 44.5], "category_id": 1}]}


def assert_aligned(sample, n_expected):
    image = sample["image"].permute(1, 2, 0).numpy()
    inst = sample["instances"]
    assert len(inst["labels"]) == len(inst["boxes"]) == len(inst["masks"]) == n_expected
    for mask, box, label in zip(inst["masks"], inst["boxes"], inst["labels"]):
        painted = (image == COLOURS[label]).all(axis=2)
        assert np.array_equal(mask.numpy() > 0, painted)  # exact, pixel for pixel
        ys, xs = np.nonzero(painted)
        assert box.tolist() == pytest.approx([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], abs=1.0)
    ys, xs = np.nonzero((image == 255).all(axis=2))
    assert sample["points"].tolist() == [[xs[0] + 0.5, ys[0] + 0.5]] and sample["point_labels"].tolist() == [1]


@pytest.mark.parametrize("transforms", [
    [{"name": "hflip", "p": 1.0}], [{"name": "vflip", "p": 1.0}], [{"name": "rot90", "p": 1.0}],
    [{"name": "hflip"}, {"name": "vflip"}, {"name": "rot90"}],
])
def test_flips_and_quarter_turns_keep_masks_boxes_and_points_on_their_pixels(coloured_shapes, transforms):
    mapper = DatasetMapper({"steps": []}, {"transforms": transforms}, is_train=True)
    torch.manual_seed(0)
    for _ in range(4):
        assert_aligned(mapper(coloured_shapes), 4)


def test_instances_pushed_off_the_canvas_are_removed_together(coloured_shapes):
    mapper = DatasetMapper(None, [{"name": "scale_jitter", "scale_range": [1.3, 1.3], "p": 1.0}], is_train=True)
    inst = mapper(coloured_shapes)["instances"]
    assert inst["labels"].tolist() == [0, 1, 2]  # the corner square left the canvas
    assert len(inst["boxes"]) == len(inst["masks"]) == 3
    for mask, box in zip(inst["masks"], inst["boxes"]):
        ys, xs = np.nonzero(mask.numpy())
        assert box.tolist() == pytest.approx([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], abs=1.5)


def test_default_augmentation_keeps_instances_aligned(sample_dicts):
    mapper = DatasetMapper({"steps": []}, compose().augment, is_train=True)
    torch.manual_seed(1)
    for record in sample_dicts[:4]:
        sample = mapper(record)
        inst = sample["instances"]
        assert inst["masks"].shape[0] == inst["boxes"].shape[0] == inst["labels"].shape[0] > 0
        assert inst["masks"].shape[1:] == sample["image"].shape[1:]
        for mask, box in zip(inst["masks"], inst["boxes"]):
            ys, xs = np.nonzero(mask.numpy())
            assert box.tolist() == pytest.approx([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], abs=2.5)


def test_training_mapper_and_inference_path_give_the_same_pixels(sample_dicts):
    cfg = compose("+exp=segmented", "augment=none", "preprocess.scale=0.5")
    train = DatasetMapper(cfg.preprocess, cfg.augment, is_train=True)
    infer = DatasetMapper(cfg.preprocess, compose().augment, is_train=False)  # augmentation ignored
    for record in sample_dicts[:3]:
        assert torch.equal(train(record)["image"], infer.map_image(record["file_name"])["image"])


def test_sample_fields_and_scaled_annotations(sample_dicts):
    record = sample_dicts[0]
    sample = DatasetMapper({"steps": [{"name": "scale", "factor": 0.25}]})(record)  # a reduced JPEG decode
    assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, 96, 128)
    assert sample["scale"] == pytest.approx((0.25, 0.25)) and (sample["orig_width"], sample["orig_height"]) == (512, 384)
    inst = sample["instances"]
    assert inst["boxes"].dtype == torch.float32 and inst["labels"].dtype == torch.int64
    assert inst["masks"].dtype == torch.uint8 and inst["masks"].shape[1:] == (96, 128)
    x, y, w, h = record["annotations"][0]["bbox"]
    assert inst["boxes"][0].tolist() == pytest.approx([x / 4, y / 4, (x + w) / 4, (y + h) / 4])
    full = DatasetMapper({"steps": []})(record)["instances"]["masks"][0].sum().item()
    assert inst["masks"][0].sum().item() == pytest.approx(full / 16, rel=0.15)
    assert sample["record"] is record and sample["image_id"] == record["image_id"]


def test_box_only_and_polygon_free_records_have_no_masks(sample_dicts):
    boxes_only = [{k: v for k, v in a.items() if k != "segmentation"} for a in sample_dicts[0]["annotations"]]
    mapper = DatasetMapper({"steps": []}, compose().augment, is_train=True)
    for record in ({**sample_dicts[0], "box_only": True}, {**sample_dicts[0], "annotations": boxes_only}):
        sample = mapper(record)
        assert sample["instances"]["masks"] is None and len(sample["instances"]["boxes"]) > 0
    mixed = {**sample_dicts[0], "annotations": [sample_dicts[0]["annotations"][0], *boxes_only]}
    with pytest.raises(ValueError, match="annotation 1 has no segmentation"):
        mapper(mixed)
    empty = DatasetMapper(None).map_image(sample_dicts[0]["file_name"])["instances"]
    assert empty["masks"].shape == (0, 384, 512) and empty["boxes"].shape == (0, 4)


def test_cell_scale_windows_keep_each_cut_cell_on_its_visible_pixels(coloured_shapes):
    # cells 20 px in their source's files, trained at 20 px: no resize, so the window is checked
    # pixel for pixel; 40 px windows of a 90x60 image cut most shapes somewhere
    scale = CellScale(cell_px=20, source_cell_px={"scanner": 20}, default_cell_px=5, side=40)
    mapper = DatasetMapper({"steps": []}, None, is_train=True, cell_scale=scale)
    torch.manual_seed(0)
    seen_cut = 0
    for _ in range(12):
        sample = mapper({**coloured_shapes, "source": "scanner"})
        image, inst = sample["image"].permute(1, 2, 0).numpy(), sample["instances"]
        assert image.shape == (40, 40, 3) and sample["scale"] == (1.0, 1.0)
        visible = [c for c in range(4) if (image == COLOURS[c]).all(axis=2).any()]
        assert sorted(inst["labels"].tolist()) == visible  # every visible cell, no empty one
        for mask, box, label in zip(inst["masks"], inst["boxes"], inst["labels"]):
            painted = (image == COLOURS[label]).all(axis=2)
            assert np.array_equal(mask.numpy() > 0, painted)
            ys, xs = np.nonzero(painted)
            assert box.tolist() == pytest.approx([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], abs=1.0)
            seen_cut += painted.sum() < (rasterize([coloured_shapes["annotations"][label]["segmentation"][0]], 60, 90)
                                         > 0).sum()
        assert len(sample["points"]) == int((image == 255).all(axis=2).any())
    assert seen_cut > 0


def test_cell_scale_brings_each_source_to_the_trained_cell_size(coloured_shapes):
    # validation windows: the whole image, resized to the trained scale, padded to at least a window
    scale = CellScale(cell_px=10, source_cell_px={"big": 20}, default_cell_px=40, side=64, random_crop=False)
    mapper = DatasetMapper({"steps": []}, cell_scale=scale)
    for source, factor in (("big", 0.5), ("unknown scanner", 0.25)):
        sample = mapper({**coloured_shapes, "source": source})
        assert sample["image"].shape == (3, 64, 64) and sample["scale"] == pytest.approx((factor, factor), abs=0.01)
        sx, sy = sample["scale"]  # the exact factor of a whole-pixel size
        x, y, w, h = coloured_shapes["annotations"][1]["bbox"]
        assert sample["instances"]["boxes"][1].tolist() == pytest.approx([x * sx, y * sy, (x + w) * sx, (y + h) * sy])
        background = sample["image"][:, 63, 63]  # the padding: the image's border colour (black here)
        assert background.tolist() == [0, 0, 0]
    big = DatasetMapper({"steps": []}, cell_scale=replace_side(scale, 16))({**coloured_shapes, "source": "big"})
    assert big["image"].shape == (3, 30, 45)  # larger than a window: whole, never cut


def replace_side(scale, side):
    from dataclasses import replace

    return replace(scale, side=side)
