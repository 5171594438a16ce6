"""The one boundary to detectron2 (optional; built from source, never a dependency).

Everything detectron2 is imported inside functions, so the rest of leukodet imports and is
tested without it. Model-zoo configs (e.g. the seed's R101-FPN) train in the same loop and are
scored by the same evaluator through the adapter protocol.
"""

from __future__ import annotations

import importlib.util

import torch

from leukodet.models.base import DetectorAdapter, Detections
from leukodet.registry import MODELS

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

    def losses(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        from detectron2.utils.events import EventStorage

        self.model.train()
        # detectron2 models log training statistics into an EventStorage, which its own trainer
        # opens; here the Lightning loop drives, so one is opened per step.
        with EventStorage():
            return self.model(self._inputs(batch, True))

    @torch.no_grad()
    def predict(self, batch: list[dict]) -> list[Detections]:
        self.model.eval()
        outputs = self.model(self._inputs(batch, False))
        result = []
        for out in outputs:
            inst = out["instances"].to("cpu")
            masks = inst.pred_masks.bool() if inst.has("pred_masks") else None
            result.append(Detections(inst.pred_boxes.tensor.float(), inst.scores.float(), inst.pred_classes.long(), masks))
        return result

    def set_thresholds(self, min_confidence=None, nms=None, max_detections=None) -> None:
        heads = self.model.roi_heads.box_predictor
        if min_confidence is not None:
            heads.test_score_thresh = float(min_confidence)
        if nms is not None:
            heads.test_nms_thresh = float(nms)
        if max_detections is not None:
            heads.test_topk_per_image = int(max_detections)

    def thresholds(self) -> tuple[float, float, int]:
        heads = self.model.roi_heads.box_predictor
        return heads.test_score_thresh, heads.test_nms_thresh, heads.test_topk_per_image


def build_detectron2(config: str, num_classes: int, masks: bool = True, weights: str = "none",
                     min_confidence: float = 0.5, detection_nms: float = 0.5, rpn_nms: float = 0.7,
                     detections_per_image: int = 300, min_size: int = 800, max_size: int = 1333,
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
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = min_confidence
    cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST = detection_nms
    cfg.MODEL.RPN.NMS_THRESH = rpn_nms
    cfg.TEST.DETECTIONS_PER_IMAGE = detections_per_image
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
