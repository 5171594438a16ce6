"""BatchNorm statistics adapted to a new acquisition from unlabelled images (AdaBN, Li et al. 2016,
"Revisiting Batch Normalization For Practical Domain Adaptation").

The backbones are trained with frozen BatchNorm (ImageNet statistics; batch statistics of 2-image CPU
batches are noise), so a scanner's other colours and sharpness shift every layer's input away from
the statistics it normalizes with. Re-estimating them on the new images needs no label and no
gradient. Written here: timm and torchvision offer no AdaBN for frozen BatchNorm layers, and it is a
forward pre-hook per layer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from leukodet.models.base import DetectorAdapter


def running_statistics_layers(module: nn.Module) -> list[nn.Module]:
    """Every normalization layer that holds running statistics (BatchNorm, frozen or not)."""
    return [m for m in module.modules() if isinstance(getattr(m, "running_mean", None), torch.Tensor)
            and isinstance(getattr(m, "running_var", None), torch.Tensor)]


@torch.no_grad()
def adapt_batchnorm(adapter: DetectorAdapter, samples: Iterable[dict]) -> int:
    """Replace each BatchNorm layer's running mean and variance by its input's statistics over
    ``samples`` (mapper samples of the new acquisition, one forward each, as prediction sees them).
    During the pass each layer normalizes with the current image's own statistics, so a later
    layer's statistics are measured on adapted inputs; the stored values are the means over images
    of each image's mean and of its second moment. Returns the number of images used."""
    layers = running_statistics_layers(adapter)
    if not layers:
        raise ValueError(f"{type(adapter).__name__} has no BatchNorm layer to adapt")
    sums = {layer: [torch.zeros_like(layer.running_mean, dtype=torch.float64),
                    torch.zeros_like(layer.running_var, dtype=torch.float64)] for layer in layers}

    def measure(layer, inputs):
        x = inputs[0].double()
        mean, second = x.mean(dim=(0, 2, 3)), (x * x).mean(dim=(0, 2, 3))
        sums[layer][0] += mean
        sums[layer][1] += second
        layer.running_mean.copy_(mean)
        layer.running_var.copy_((second - mean * mean).clamp_min(0))

    saved = {layer: (layer.running_mean.clone(), layer.running_var.clone()) for layer in layers}
    hooks = [layer.register_forward_pre_hook(measure) for layer in layers]
    images = 0
    adapter.eval()
    try:
        for sample in samples:
            adapter.backbone_features([sample])
            images += 1
        if not images:
            raise ValueError("no image to adapt the BatchNorm statistics on")
    except BaseException:  # the model is left as it was
        for layer, (mean, var) in saved.items():
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
        raise
    finally:
        for hook in hooks:
            hook.remove()
    for layer, (total, second) in sums.items():
        mean = total / images
        layer.running_mean.copy_(mean)
        layer.running_var.copy_((second / images - mean * mean).clamp_min(0))
    return images
