"""torchvision Mask R-CNN inference as two stages with the operating point between them, shared by
the PyTorch path and the exported ONNX graphs:

    image -> ``DetectStage`` (resize + normalise, backbone, FPN, RPN, box head, score cut, NMS, cap)
          -> boxes, scores, labels + the feature maps the mask head reads
    kept boxes -> ``MaskStage`` (mask RoIAlign, mask head) -> one M x M probability map per box
          -> ``paste_masks`` at the output size, every detection at once

torchvision runs the same modules in one ``forward``; split here, the ONNX export is two graphs
and the operating point is applied in between by the caller, so the mask head only ever sees the
detections that are kept (each Mask R-CNN mask depends on its box alone). ``inference_copy`` folds
the frozen backbone's BatchNorm into its convolutions and stores weights channels-last.
"""

from __future__ import annotations

import copy
import itertools
import math

import torch
import torch.nn.functional as F
from timm.layers.norm_act import FrozenBatchNormAct2d
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.models.detection.roi_heads import expand_boxes
from torchvision.ops.misc import FrozenBatchNorm2d

# Masks are pasted this many at a time: bounds the float work buffer on large images.
PASTE_CHUNK = 32


@torch.no_grad()
def mask_feature_names(model: nn.Module) -> list[str]:
    """The feature maps the mask RoIAlign reads, in its order: its names that the backbone gives
    (it skips the others; e.g. the EfficientNet FPN has no level '3')."""
    pool = model.roi_heads.mask_roi_pool
    if pool is None:
        return []
    given = model.backbone(torch.zeros(1, 3, 64, 64, device=next(model.parameters()).device))
    return [name for name in pool.featmap_names if name in given]


def detect(model: nn.Module, images: list[torch.Tensor], memory_format=torch.contiguous_format):
    """Images (3, H, W) float in [0, 1] -> (ImageList of the resized images, feature maps, and per
    image boxes in the resized image's pixels, scores, 1-based labels), cut where ``roi_heads``'
    ``score_thresh``, ``nms_thresh`` and ``detections_per_img`` say (torchvision's order)."""
    image_list, _ = model.transform(images)
    features = model.backbone(image_list.tensors.contiguous(memory_format=memory_format))
    proposals, _ = model.rpn(image_list, features)
    heads = model.roi_heads
    box_features = heads.box_head(heads.box_roi_pool(features, proposals, image_list.image_sizes))
    class_logits, box_regression = heads.box_predictor(box_features)
    boxes, scores, labels = heads.postprocess_detections(class_logits, box_regression, proposals,
                                                         image_list.image_sizes)
    return image_list, features, boxes, scores, labels


def mask_probabilities(model: nn.Module, features: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                       labels: list[torch.Tensor], image_sizes: list[tuple[int, int]]) -> torch.Tensor:
    """The (K, M, M) mask probabilities of each box's own (1-based) class, images' boxes one after
    the other (split them by their counts)."""
    heads = model.roi_heads
    logits = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, boxes, image_sizes)))
    return logits[torch.arange(logits.shape[0], device=logits.device), torch.cat(labels)].sigmoid()


class DetectStage(nn.Module):
    """The exported first graph: one image (3, H, W) float in [0, 1] -> (boxes in the resized
    image's pixels, scores, 1-based labels, *the feature maps the mask head reads). The cut is the
    one set on ``roi_heads`` when it is traced."""

    def __init__(self, model: nn.Module, feature_names: list[str]):
        super().__init__()
        self.model = model
        self.feature_names = feature_names

    def forward(self, image: torch.Tensor):
        _, features, boxes, scores, labels = detect(self.model, [image])
        return (boxes[0], scores[0], labels[0], *(features[name] for name in self.feature_names))


class MaskStage(nn.Module):
    """The exported second graph: (boxes (K, 4) in the resized image's pixels, 1-based labels (K,),
    *feature maps) -> mask probabilities (K, M, M) of each box's own class."""

    def __init__(self, model: nn.Module, feature_names: list[str], image_size: tuple[int, int]):
        super().__init__()
        self.model = model
        self.feature_names = feature_names
        # RoIAlign takes its level scales (powers of 2, fixed by the backbone) from the image size
        self.image_size = image_size

    def forward(self, boxes: torch.Tensor, labels: torch.Tensor, *features: torch.Tensor) -> torch.Tensor:
        return mask_probabilities(self.model, dict(zip(self.feature_names, features)), [boxes], [labels],
                                  [self.image_size])


def resized_size(transform: nn.Module, height: int, width: int) -> tuple[int, int]:
    """The size torchvision's ``GeneralizedRCNNTransform`` resizes an image of this size to (at
    inference): its scale rule and ``F.interpolate``'s floor of size x scale."""
    scale = min(float(transform.min_size[-1]) / min(height, width), float(transform.max_size) / max(height, width))
    return math.floor(height * scale), math.floor(width * scale)


def bilinear_weights(start: torch.Tensor, size: torch.Tensor, length: int, source: int) -> torch.Tensor:
    """(K, length, source) weights that resize a ``source``-long signal to ``size[k]`` samples
    placed from ``start[k]`` on a ``length``-long axis (zero elsewhere): ``F.interpolate``'s
    bilinear, align_corners=False, sampling rule, which torchvision's paste uses per box."""
    index = torch.arange(length, dtype=torch.float32)[None] - start[:, None]  # (K, length)
    inside = (index >= 0) & (index < size[:, None])
    position = ((index + 0.5) * (source / size[:, None].float()) - 0.5).clamp(min=0)
    low = position.floor().clamp(max=source - 1)
    frac = position - low
    low = low.long()
    high = (low + 1).clamp(max=source - 1)
    weights = torch.zeros(len(start), length, source)
    weights.scatter_add_(2, low[..., None], ((1 - frac) * inside)[..., None])
    weights.scatter_add_(2, high[..., None], (frac * inside)[..., None])
    return weights


def paste_masks(probabilities: torch.Tensor, boxes: torch.Tensor, height: int, width: int,
                threshold: float = 0.5) -> torch.Tensor:
    """(K, M, M) mask probabilities in (K, 4) XYXY boxes -> (K, height, width) bool masks.

    torchvision's paste (the map padded by one pixel, the box grown to match and rounded, a
    bilinear resize to the box) for all boxes at once: a bilinear resize is separable, so each
    pasted mask is ``rows @ map @ cols.T`` with per-box weight matrices that are zero outside the
    box; no Python loop over detections.
    """
    count, side = probabilities.shape[0], probabilities.shape[-1]
    out = torch.zeros((count, height, width), dtype=torch.bool)
    if count == 0:
        return out
    padded = F.pad(probabilities.float().cpu(), (1, 1, 1, 1))
    grown = expand_boxes(boxes.float().cpu(), (side + 2) / side).to(torch.int64)
    x0, y0, x1, y1 = grown.unbind(1)
    widths, heights = (x1 - x0 + 1).clamp(min=1), (y1 - y0 + 1).clamp(min=1)
    for first in range(0, count, PASTE_CHUNK):
        part = slice(first, first + PASTE_CHUNK)
        rows = bilinear_weights(y0[part], heights[part], height, side + 2)
        cols = bilinear_weights(x0[part], widths[part], width, side + 2)
        out[part] = torch.bmm(rows, torch.bmm(padded[part], cols.transpose(1, 2))) > threshold
    return out


def fuse_frozen_batchnorm(module: nn.Module) -> int:
    """Fold every frozen BatchNorm that directly follows a convolution (timm's
    ``FrozenBatchNormAct2d``, torchvision's ``FrozenBatchNorm2d``) into that convolution, in
    place; the norm is replaced by its activation. Returns the number folded. Exact up to float
    rounding, for inference only (the folded weights are not the trained parameters)."""
    folded = 0
    for parent in module.modules():
        children = list(parent.named_children())
        for (_, conv), (norm_name, norm) in itertools.pairwise(children):
            if not (isinstance(conv, nn.Conv2d) and isinstance(norm, (FrozenBatchNormAct2d, FrozenBatchNorm2d))):
                continue
            weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, norm.running_mean, norm.running_var,
                                                getattr(norm, "eps", 1e-5), norm.weight, norm.bias)
            conv.weight, conv.bias = weight, bias
            setattr(parent, norm_name, norm.act if isinstance(norm, FrozenBatchNormAct2d) else nn.Identity())
            folded += 1
    return folded


def inference_copy(model: nn.Module, fuse: bool = True, channels_last: bool = True,
                   rpn_proposals: tuple[int, int] | None = None) -> nn.Module:
    """A copy of a torchvision detector for inference: frozen BatchNorm folded into the backbone's
    convolutions, weights channels-last, eval mode, no gradients; ``rpn_proposals`` (before NMS,
    after NMS) replace the trained test-time counts when given (a sparse field needs few: the RoI
    box head's time is proportional to them)."""
    model = copy.deepcopy(model).eval()
    model.requires_grad_(False)
    if rpn_proposals is not None:
        before, after = (int(n) for n in rpn_proposals)
        if not 0 < after <= before:
            raise ValueError(f"rpn_proposals [{before}, {after}]: give [before NMS, after NMS], 0 < after <= before")
        model.rpn._pre_nms_top_n["testing"], model.rpn._post_nms_top_n["testing"] = before, after
    if fuse:
        fuse_frozen_batchnorm(model.backbone)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model
