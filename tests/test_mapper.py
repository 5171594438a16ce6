"""The one mapper: masks and boxes stay pixel-aligned through augmentation; train = infer pixels."""


import cv2
import numpy as np
import pytest
import torch

from leukodet.data.coco import load_dataset_dicts, write_coco
from leukodet.data.mapper import DatasetMapper
from leukodet.data.via import LabelPolicy, read_via
from tests.conftest import compose


@pytest.fixture(scope="module")
def sample_dicts(wbc_sample, tmp_path_factory):
    result = read_via(wbc_sample / "via_region_data.json", labels=LabelPolicy("cell_type"))
    classes = sorted({r.label for rec in result.records for r in rec.regions})
    path = write_coco(tmp_path_factory.mktemp("coco") / "all.json", result.records, classes)
    return load_dataset_dicts(path)[0]


@pytest.fixture
def coloured_shapes(tmp_path):
    """An image where each instance is painted in its own pure colour, so its mask can be checked
    against the pixels after any geometric transform."""
    image = np.zeros((60, 90, 3), np.uint8)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    polygons = [[5, 5, 30, 5, 30, 20, 5, 20], [50, 10, 80, 30, 55, 50], [10, 35, 40, 35, 25, 55]]
    annotations = []
    from leukodet.data.mapper import rasterize

    for i, (poly, colour) in enumerate(zip(polygons, colours)):
        image[rasterize([poly], 60, 90) > 0] = colour
        xs, ys = poly[0::2], poly[1::2]
        annotations.append({"bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)], "bbox_mode": 1,
                            "segmentation": [poly], "category_id": i, "iscrowd": 0})
    cv2.imwrite(str(tmp_path / "shapes.png"), image[..., ::-1])
    return {"file_name": str(tmp_path / "shapes.png"), "image_id": 1, "height": 60, "width": 90,
            "annotations": annotations, "points": []}, colours


@pytest.mark.parametrize("transform", ["hflip", "vflip", "rot90"])
def test_geometric_augmentation_keeps_masks_on_their_pixels(coloured_shapes, transform):
    record, colours = coloured_shapes
    mapper = DatasetMapper({"steps": []}, {"transforms": [{"name": transform, "p": 1.0}]}, is_train=True)
    torch.manual_seed(0)
    for _ in range(3):
        sample = mapper(record)
        image = sample["image"].permute(1, 2, 0).numpy()
        inst = sample["instances"]
        assert len(inst["labels"]) == 3
        for mask, box, label in zip(inst["masks"], inst["boxes"], inst["labels"]):
            painted = (image == colours[label]).all(axis=2)
            assert np.array_equal(mask.numpy() > 0, painted)  # exact, pixel for pixel
            ys, xs = np.nonzero(painted)
            assert box.tolist() == pytest.approx([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], abs=1.0)


def test_scale_jitter_and_colour_keep_instances_aligned(sample_dicts):
    mapper = DatasetMapper({"steps": []}, compose().augment, is_train=True)
    torch.manual_seed(1)
    for record in sample_dicts[:4]:
        sample = mapper(record)
        inst = sample["instances"]
        assert inst["masks"].shape[0] == inst["boxes"].shape[0] == inst["labels"].shape[0]
        assert inst["masks"].shape[1:] == sample["image"].shape[1:]
        for mask, box in zip(inst["masks"], inst["boxes"]):
            ys, xs = np.nonzero(mask.numpy())
            if len(xs):
                assert box.tolist() == pytest.approx([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], abs=2.5)


def test_training_mapper_and_inference_path_give_the_same_pixels(sample_dicts):
    cfg = compose("+exp=segmented", "augment=none")
    train = DatasetMapper(cfg.preprocess, cfg.augment, is_train=True)
    infer = DatasetMapper(cfg.preprocess, None, is_train=False)
    for record in sample_dicts[:3]:
        assert torch.equal(train(record)["image"], infer.map_image(record["file_name"])["image"])


def test_sample_fields_and_scaled_annotations(sample_dicts):
    mapper = DatasetMapper({"steps": [{"name": "scale", "factor": 0.5}]})
    record = sample_dicts[0]
    sample = mapper(record)
    assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, 192, 256)
    assert sample["scale"] == (0.5, 0.5) and (sample["orig_width"], sample["orig_height"]) == (512, 384)
    x, y, w, h = record["annotations"][0]["bbox"]
    assert sample["instances"]["boxes"][0].tolist() == pytest.approx([x / 2, y / 2, (x + w) / 2, (y + h) / 2])
    full = DatasetMapper({"steps": []})(record)["instances"]["masks"][0].sum().item()
    assert sample["instances"]["masks"][0].sum().item() == pytest.approx(full / 4, rel=0.1)
    assert sample["record"] is record


def test_box_only_records_have_no_masks(sample_dicts):
    record = {**sample_dicts[0], "box_only": True,
              "annotations": [{k: v for k, v in a.items() if k != "segmentation"} for a in sample_dicts[0]["annotations"]]}
    sample = DatasetMapper({"steps": []}, compose().augment, is_train=True)(record)
    assert sample["instances"]["masks"] is None and len(sample["instances"]["boxes"]) > 0
