"""leukodet's metrics as a detectron2 DatasetEvaluator; AP50 equals detectron2's COCOEvaluator."""

import numpy as np
import pytest
import torch

from leukodet.preprocess.mapper import rasterize
from conftest import compose

d2 = pytest.importorskip("detectron2", reason="detectron2 is optional and not installed (built from source)")


def test_ap50_matches_detectron2_coco_evaluator(tmp_path):
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import Boxes, Instances

    from leukodet.data.catalog import get_dataset_dicts
    from leukodet.data.pipeline import ensure_prepared
    from leukodet.integrations.detectron2 import build_detectron2_evaluator

    cfg = compose(f"data.root={tmp_path / 'data'}", "data.generate.n_images=12")
    ensure_prepared(cfg.data)
    records = get_dataset_dicts("sample_wbc_val")
    rng = np.random.default_rng(0)
    inputs, outputs = [], []
    for record in records:
        height, width = record["height"], record["width"]
        masks, boxes, classes = [], [], []
        for ann in record["annotations"]:
            shift = int(rng.integers(0, 6))
            mask = np.roll(rasterize(ann["segmentation"], height, width), shift, axis=1)
            ys, xs = np.nonzero(mask)
            masks.append(mask)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            classes.append(ann["category_id"] if rng.random() > 0.2 else 1 - ann["category_id"])
        found = Instances((height, width))
        found.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        found.scores = torch.tensor(rng.random(len(boxes)), dtype=torch.float32)
        found.pred_classes = torch.tensor(classes, dtype=torch.int64)
        found.pred_masks = torch.from_numpy(np.stack(masks).astype(bool)) if masks else torch.zeros((0, height, width), dtype=torch.bool)
        inputs.append({"image_id": record["image_id"], "height": height, "width": width, "file_name": record["file_name"]})
        outputs.append({"instances": found})

    ours = build_detectron2_evaluator("sample_wbc_val")
    theirs = COCOEvaluator("sample_wbc_val", output_dir=str(tmp_path / "d2"))
    for evaluator in (ours, theirs):
        evaluator.reset()
        evaluator.process(inputs, outputs)
    summary = ours.evaluate()["leukodet"]
    reference = theirs.evaluate()
    assert summary["ap50_segm"] * 100 == pytest.approx(reference["segm"]["AP50"], abs=1e-6)
    assert summary["ap50_bbox"] * 100 == pytest.approx(reference["bbox"]["AP50"], abs=1e-6)
    assert 0 < summary["f1"] < 1
