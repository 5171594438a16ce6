"""Everything detectron2, in one module (an optional engine: built from source, never a dependency).

detectron2 is imported inside functions only, so the rest of leukodet imports and is tested
without it. Here: the adapter that runs model-zoo configs (e.g. the seed's R101-FPN) in leukodet's
loop, the registration of leukodet's catalog splits in detectron2's ``DatasetCatalog`` /
``MetadataCatalog``, and leukodet's metrics as a detectron2 ``DatasetEvaluator``.
"""

from __future__ import annotations

import importlib.util

import torch

from leukodet.data.catalog import add_listener, get_dataset_dicts, get_metadata
from leukodet.evaluation.metrics import evaluate
from leukodet.models.base import DetectorAdapter
from leukodet.registry import MODELS
from leukodet.structures import RAW, Detections, OperatingPoint, to_original


INSTALL_HINT = (
    "detectron2 is an optional engine and is not installed. It is not on PyPI: clone "
    "facebookresearch/detectron2 and run `pip install 'setuptools<81' && pip install --no-build-isolation "
    "<clone>`; or use the default engine (model=maskrcnn_effnet_lite0, torchvision)."
)


def require_detectron2() -> None:
    if importlib.util.find_spec("detectron2") is None:
        raise ImportError(INSTALL_HINT)


class Detectron2Detector(DetectorAdapter):
    """A detectron2 GeneralizedRCNN behind the adapter protocol."""

    def __init__(self, cfg, num_classes: int, has_masks: bool):
        super().__init__()
        from detectron2.modeling import build_model

        self.cfg = cfg
        self.model = build_model(cfg)
        self.num_classes = num_classes
        self.has_masks = has_masks
        self.bgr = cfg.INPUT.FORMAT == "BGR"

    def _inputs(self, batch: list[dict], with_targets: bool) -> list[dict]:
        from detectron2.structures import BitMasks, Boxes, Instances

        inputs = []
        for sample in batch:
            image = sample["image"].flip(0) if self.bgr else sample["image"]
            entry = {"image": image.float(), "height": image.shape[1], "width": image.shape[2]}
            if with_targets:
                inst = sample["instances"]
                gt = Instances(tuple(image.shape[1:]))
                gt.gt_boxes = Boxes(inst["boxes"])
                gt.gt_classes = inst["labels"]
                if self.has_masks:
                    gt.gt_masks = BitMasks(inst["masks"].bool())
                entry["instances"] = gt
            inputs.append(entry)
        return inputs

    def compute_losses(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        from detectron2.utils.events import EventStorage

        # detectron2 models log training statistics into an EventStorage, which its own trainer
        # opens; here the Lightning loop drives, so one is opened per step.
        with EventStorage():
            return self.model(self._inputs(batch, True))

    @torch.no_grad()
    def predict(self, batch: list[dict], prefilter: OperatingPoint = RAW) -> list[Detections]:
        self.model.eval()
        heads = self.model.roi_heads.box_predictor  # read by FastRCNNOutputLayers.inference on every call
        heads.test_score_thresh, heads.test_nms_thresh, heads.test_topk_per_image = (
            prefilter.min_confidence, prefilter.nms, prefilter.max_detections)
        outputs = self.model(self._inputs(batch, False))
        return [detections_of(out["instances"]) for out in outputs]


def detections_of(instances) -> Detections:
    """detectron2 ``Instances`` -> leukodet ``Detections`` (on the CPU)."""
    found = instances.to("cpu")
    masks = found.pred_masks.bool() if found.has("pred_masks") else None
    return Detections(found.pred_boxes.tensor.float(), found.scores.float(), found.pred_classes.long(), masks)


def build_detectron2(config: str, num_classes: int, masks: bool = True, weights: str = "none",
                     rpn_nms: float = 0.7, min_size: int = 800, max_size: int = 1333,
                     anchor_sizes=None, device: str | None = None) -> Detectron2Detector:
    """A detectron2 model-zoo config (e.g. ``COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml``)
    or a config file path. ``weights``: none | coco (the zoo checkpoint, downloaded) | a local file."""
    require_detectron2()
    from detectron2 import model_zoo
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(config if config.endswith(".yaml") and "/" in config and not config.startswith("COCO")
                        else model_zoo.get_config_file(config))
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.MODEL.MASK_ON = masks
    cfg.MODEL.RPN.NMS_THRESH = rpn_nms
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = min_size, max_size
    if anchor_sizes is not None:
        cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[s] for s in anchor_sizes]
    cfg.MODEL.DEVICE = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg.MODEL.WEIGHTS = ""
    adapter = Detectron2Detector(cfg, num_classes, masks)
    if weights == "coco":
        url = model_zoo.get_checkpoint_url(config)
        try:
            DetectionCheckpointer(adapter.model).load(url)
        except Exception as err:
            raise RuntimeError(f"model.weights=coco needs {url}, which could not be downloaded ({err}). "
                               f"Download it elsewhere and pass model.weights=/path/to/model_final.pkl") from None
    elif weights != "none":
        DetectionCheckpointer(adapter.model).load(weights)
    return adapter


@MODELS.register(name="d2_mask_rcnn_R_50_FPN_3x")
def d2_mask_rcnn_r50_fpn_3x(num_classes: int, **kwargs) -> Detectron2Detector:
    return build_detectron2("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml", num_classes, **kwargs)


@MODELS.register(name="d2_mask_rcnn_R_101_FPN_3x")
def d2_mask_rcnn_r101_fpn_3x(num_classes: int, **kwargs) -> Detectron2Detector:
    """The seed's backbone (R101-FPN, COCO 3x schedule)."""
    return build_detectron2("COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml", num_classes, **kwargs)


MODELS.register(build_detectron2, name="detectron2")


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
                det = detections_of(output["instances"])  # already at the input's height x width
                prediction = to_original(det, (1.0, 1.0), (given["width"], given["height"]))
                self._pairs.append((self.records[given["image_id"]], prediction))

        def evaluate(self):
            records = [record for record, _ in self._pairs]
            predictions = [prediction for _, prediction in self._pairs]
            result = evaluate(records, predictions, self.class_names, iou_type, min_confidence)
            return {"leukodet": result.summary()}

    return LeukodetEvaluator()


def register_in_detectron2(name: str) -> None:
    """Mirror one leukodet catalog split into detectron2's catalogs (idempotent: a Hydra multirun
    registers the same names again)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    metadata = get_metadata(name)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: get_dataset_dicts(name))
    # The prepared JSON numbers categories from 1; detectron2 maps them to its 0-based ids with this.
    id_map = {i + 1: i for i in range(len(metadata["thing_classes"]))}
    MetadataCatalog.get(name).set(thing_classes=metadata["thing_classes"], thing_colors=metadata["thing_colors"],
                                  json_file=metadata["json_file"], evaluator_type="coco",
                                  thing_dataset_id_to_contiguous_id=id_map)


if importlib.util.find_spec("detectron2") is not None:
    add_listener(register_in_detectron2)
