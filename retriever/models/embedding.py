"""One encoder for clip frames/crops and shop images (as RICE), a projection head and a quality pooling head."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


class Trunk(nn.Module):
    """A backbone as a list of stages, so training can freeze a prefix and start from cached prefix outputs.

    ``stage_names`` are attribute paths into ``net``; an empty list means "``net`` is one stage that returns
    pooled features" (any timm model with ``num_classes=0``, open_clip's visual tower).
    """

    def __init__(self, net: nn.Module, feat_dim: int, stage_names: list[list[str]] | None = None,
                 pool: nn.Module | None = None):
        super().__init__()
        self.net = net
        self.feat_dim = feat_dim
        self.stage_names = stage_names or []
        self.pool = pool if pool is not None else nn.Identity()

    def _stage(self, names: list[str]) -> nn.Module:
        mods = []
        for name in names:
            m = self.net
            for part in name.split("."):
                m = m[int(part)] if part.isdigit() else getattr(m, part)
            mods.append(m)
        return mods[0] if len(mods) == 1 else nn.Sequential(*mods)

    def stages(self) -> list[nn.Module]:
        if not self.stage_names:
            return [self.net]
        return [self._stage(names) for names in self.stage_names]

    @property
    def num_stages(self) -> int:
        return max(1, len(self.stage_names))

    def forward(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Run stages ``[start, stop)``; when ``stop`` is the end, pool to (B, feat_dim)."""
        stages = self.stages()
        stop = len(stages) if stop is None else stop
        for stage in stages[start:stop]:
            x = stage(x)
        if stop == len(stages):
            x = self.pool(x)
            if x.ndim > 2:
                x = x.flatten(1)
        return x


class QualityPool(nn.Module):
    """Learned attention / quality-weighted pooling: a score per frame embedding, softmax over the clip.

    It scores each frame from its own embedding, so a frame's weight can be computed by any backend that
    produced the embedding (numpy, ONNX Runtime, TensorRT). The last layer starts at zero: pooling starts as
    the mean (RICE's aggregation) and learns to down-weight blurred, occluded or off-product frames.
    """

    def __init__(self, dim: int, hidden: int = 64):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def scores(self, emb: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(emb))).squeeze(-1)

    def forward(self, emb: torch.Tensor, index: torch.Tensor, n_sets: int) -> torch.Tensor:
        """Pool ``emb`` (M, D) into ``n_sets`` vectors; ``index[m]`` says which set row m belongs to."""
        # The softmax runs in float32: under CUDA autocast the scores are half but exp() returns float32
        # (index_add then refused the mix on an H200).
        s = self.scores(emb).float()
        s_max = torch.full((n_sets,), -torch.inf, device=s.device).scatter_reduce(
            0, index, s, reduce="amax", include_self=True)
        w = torch.exp(s - s_max[index])
        den = torch.zeros(n_sets, device=s.device).index_add(0, index, w)
        out = torch.zeros(n_sets, emb.shape[1], device=emb.device, dtype=emb.dtype)
        out = out.index_add(0, index, emb * (w / den[index]).unsqueeze(1).to(emb.dtype))
        return F.normalize(out, dim=-1)


def mean_pool(emb: torch.Tensor, index: torch.Tensor, n_sets: int) -> torch.Tensor:
    """RICE's clip embedding: the mean of its frame embeddings, re-normalised."""
    out = torch.zeros(n_sets, emb.shape[1], device=emb.device, dtype=emb.dtype).index_add(0, index, emb)
    return F.normalize(out, dim=-1)


class EmbeddingModel(nn.Module):
    """trunk -> linear projection -> L2 normalisation; plus the pooling head trained with it."""

    def __init__(self, trunk: Trunk, embed_dim: int = 256, pool_hidden: int = 64):
        super().__init__()
        self.trunk = trunk
        # embed_dim <= 0: no projection, the trunk's own features (frozen-ImageNet baselines)
        self.embed_dim = embed_dim if embed_dim > 0 else trunk.feat_dim
        self.proj = nn.Linear(trunk.feat_dim, embed_dim) if embed_dim > 0 else nn.Identity()
        self.pool = QualityPool(self.embed_dim, pool_hidden)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        return F.normalize(self.proj(self.trunk(x, start=start)), dim=-1)

    def aggregate(self, emb: torch.Tensor, index: torch.Tensor, n_sets: int, method: str = "mean") -> torch.Tensor:
        if method == "attention":
            return self.pool(emb, index, n_sets)
        return mean_pool(emb, index, n_sets)
