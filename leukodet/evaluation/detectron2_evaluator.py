"""leukodet's metrics as a detectron2 ``DatasetEvaluator``, for detectron2 users' own trainers:

    evaluator = build_detectron2_evaluator("sample_wbc_val")
    inference_on_dataset(model, data_loader, evaluator)  # -> {"leukodet": {"f1": ..., "ap50_segm": ...}}

detectron2 is imported lazily (see ``leukodet.models.detectron2_adapter``). Single process: in a
distributed detectron2 run, evaluate on the main process.
"""

from __future__ import annotations

from leukodet.evaluation.metrics import evaluate
from leukodet.evaluation.predictions import to_original
from leukodet.models.base import Detections
from leukodet.models.detectron2_adapter import require_detectron2


def build_detectron2_evaluator(dataset_name: str, iou_type: str | None = None, min_confidence: float = 0.0):
    """A DatasetEvaluator scoring a registered split (leukodet's catalog mirrors every split into
    detectron2's) with the evaluator of ``leukodet.evaluation.metrics``."""
    require_detectron2()
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.evaluation import DatasetEvaluator

    class LeukodetEvaluator(DatasetEvaluator):
        def __init__(self):
            self.records = {r["image_id"]: r for r in DatasetCatalog.get(dataset_name)}
            self.class_names = list(MetadataCatalog.get(dataset_name).thing_classes)
            self.reset()

        def reset(self):
            self._pairs = []

        def process(self, inputs, outputs):
            for given, output in zip(inputs, outputs):
                found = output["instances"].to("cpu")  # already at the input's height x width
                masks = found.pred_masks.bool() if found.has("pred_masks") else None
                det = Detections(found.pred_boxes.tensor.float(), found.scores.float(), found.pred_classes.long(), masks)
                prediction = to_original(det, (1.0, 1.0), (given["width"], given["height"]))
                self._pairs.append((self.records[given["image_id"]], prediction))

        def evaluate(self):
            records = [record for record, _ in self._pairs]
            predictions = [prediction for _, prediction in self._pairs]
            result = evaluate(records, predictions, self.class_names, iou_type, min_confidence)
            return {"leukodet": result.summary()}

    return LeukodetEvaluator()
