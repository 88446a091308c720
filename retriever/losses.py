"""RICE's losses: symmetric InfoNCE between clip and shop-image embeddings (ICL) with a learnable temperature,
negatives gathered from every rank under DDP, and an optional pairwise matching head on hard negatives (PMD)."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def gather_features(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, with gradients flowing back to the local rows (open_clip's gather_with_grad)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    import torch.distributed.nn.functional as dist_fn
    return torch.cat(dist_fn.all_gather(x), dim=0)


class InfoNCELoss(nn.Module):
    """Symmetric InfoNCE; ``logit_scale`` = log(1 / temperature) is learned and clamped at log(100) as in CLIP."""

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_log_scale = math.log(max_scale)

    def forward(self, clip_emb: torch.Tensor, image_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and the local (B, B_global) clip->image logits (row i matches column rank*B + i)."""
        all_clip, all_img = gather_features(clip_emb), gather_features(image_emb)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        scale = self.logit_scale.clamp(max=self.max_log_scale).exp()
        labels = torch.arange(len(clip_emb), device=clip_emb.device) + rank * len(clip_emb)
        logits_c2i = scale * clip_emb @ all_img.T
        logits_i2c = scale * image_emb @ all_clip.T
        loss = 0.5 * (F.cross_entropy(logits_c2i, labels) + F.cross_entropy(logits_i2c, labels))
        return loss, logits_c2i

    @property
    def temperature(self) -> float:
        return float(1.0 / self.logit_scale.detach().clamp(max=self.max_log_scale).exp())


class MatchingHead(nn.Module):
    """Pairwise matching classifier (RICE's PMD, simplified): is this <clip, image> pair the same product?

    Trained on each positive pair and its hardest in-batch negatives in both directions, it pushes the shared
    encoder to separate look-alike products (a second milk carton of one brand) that InfoNCE treats as easy
    once the temperature has settled.
    """

    def __init__(self, dim: int, hidden: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4 * dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([a, b, a * b, (a - b).abs()], dim=-1)).squeeze(-1)

    def loss(self, clip_emb: torch.Tensor, image_emb: torch.Tensor) -> torch.Tensor:
        b = len(clip_emb)
        if b < 2:
            return clip_emb.sum() * 0
        with torch.no_grad():
            sim = clip_emb @ image_emb.T
            sim.fill_diagonal_(-torch.inf)
            hard_img = sim.argmax(1)  # hardest wrong image per clip
            hard_clip = sim.argmax(0)  # hardest wrong clip per image
        pos = self(clip_emb, image_emb)
        neg = torch.cat([self(clip_emb, image_emb[hard_img]), self(clip_emb[hard_clip], image_emb)])
        logits = torch.cat([pos, neg])
        target = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)])
        weight = torch.cat([torch.full_like(pos, 2.0), torch.ones_like(neg)])  # balance 1 positive : 2 negatives
        return F.binary_cross_entropy_with_logits(logits, target, weight=weight)
