"""TensorFlow's "same" padding (timm's ``Conv2dSame``, in every TF-ported EfficientNet) in a form ONNX Runtime fuses.

timm computes these pads from the input shape at run time. In ONNX that is a chain of shape ops and a ``Pad`` that
ONNX Runtime cannot fold into the ``Conv`` when the batch axis is dynamic; each unfused pad also takes the tensor out
of ONNX Runtime's blocked (NCHWc) CPU layout and back. For inputs whose sides divide by the strides, the pads are
constants: ``constant_same_pads`` swaps the layers before export, and ``drop_trailing_empty_inputs`` removes what
still blocks the fusion in the exported graph. Measured on the CPU, 2 threads: the detector's network 20-30% faster,
the embedder 3.82 -> 2.72 ms/crop at 128 px, outputs unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EvenSizeSameConv(nn.Conv2d):
    """A strided conv with TensorFlow's "same" padding as constant pads.

    Exact for inputs whose sides divide by the stride, which holds for every input a detector sees (multiples of 32)
    and for embedder inputs whose size divides by 32.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                         conv.groups, conv.bias is not None)
        self.load_state_dict(conv.state_dict())
        (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
        th, tw = max((kh - 1) * dh + 1 - sh, 0), max((kw - 1) * dw + 1 - sw, 0)  # timm's pad for size % stride == 0
        self.same_pads = (tw // 2, tw - tw // 2, th // 2, th - th // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(F.pad(x, self.same_pads), self.weight, self.bias)


def constant_same_pads(module: nn.Module) -> int:
    """Replace every timm ``Conv2dSame`` inside ``module`` by an ``EvenSizeSameConv``; returns how many. Only for
    inference on inputs whose sides divide by the network's total stride."""
    from timm.layers.conv2d_same import Conv2dSame
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv2dSame):
                parent._modules[name] = EvenSizeSameConv(child)
                swapped += 1
    return swapped


def drop_trailing_empty_inputs(graph) -> int:
    """Remove the empty optional inputs the exporter writes at the end of a node's inputs (``Pad(x, pads, "")``).

    ONNX Runtime fuses a constant zero ``Pad`` into the next ``Conv`` only when every input it has is a constant,
    and an empty name is not one.
    """
    dropped = 0
    for node in graph.node:
        while node.input and node.input[-1] == "":
            node.input.pop()
            dropped += 1
    return dropped
