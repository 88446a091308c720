"""Clip aggregation: many frame/crop embeddings -> one clip embedding, or a clip-to-image score directly.

- ``mean``: RICE's clip embedding, the mean of the frame embeddings (re-normalised).
- ``attention``: quality-weighted pooling; weights = softmax of the embedder's learned per-frame score.
- ``max``: set-to-image max-similarity; a clip scores an image by its best-matching frame, so it has no single
  clip vector and needs the gallery (``set_scores``).
"""
from __future__ import annotations

import numpy as np

METHODS = ("mean", "attention", "max")


def l2_normalise(v: np.ndarray) -> np.ndarray:
    """Unit rows (float32) along the last axis."""
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return (v / np.maximum(n, 1e-12)).astype(np.float32)


def attention_weights(embeddings: np.ndarray, embedder=None, scores: np.ndarray | None = None) -> np.ndarray:
    """Softmax over the frames of the embedder's quality scores (uniform when it has no pooling head)."""
    if scores is None:
        if embedder is None:
            raise ValueError("attention aggregation needs the embedder (its learned pooling head) or scores")
        scores = embedder.quality(embeddings)
    s = np.asarray(scores, np.float64).reshape(-1)
    w = np.exp(s - s.max())
    return (w / w.sum()).astype(np.float32)


def aggregate(embeddings: np.ndarray, method: str = "mean", embedder=None,
              scores: np.ndarray | None = None) -> np.ndarray:
    """(N, D) frame embeddings -> (D,) L2-normalised clip embedding."""
    e = np.asarray(embeddings, np.float32)
    if e.ndim != 2 or len(e) == 0:
        raise ValueError(f"expected a non-empty (N, D) array of embeddings, got shape {e.shape}")
    if method == "mean":
        return l2_normalise(e.mean(0))
    if method == "attention":
        return l2_normalise(attention_weights(e, embedder, scores) @ e)
    if method == "max":
        raise ValueError("'max' is set-to-image similarity and has no clip vector: use set_scores(frames, gallery)")
    raise ValueError(f"unknown aggregation {method!r}; expected one of {METHODS}")


def set_scores(frame_embs: np.ndarray, gallery_embs: np.ndarray, method: str = "max", embedder=None) -> np.ndarray:
    """(G,) similarity of one clip (its frame embeddings) to each gallery image, for any method."""
    f = np.asarray(frame_embs, np.float32)
    g = np.asarray(gallery_embs, np.float32)
    if method == "max":
        if len(g) == 0:
            return np.zeros(0, np.float32)
        return (g @ f.T).max(axis=1)
    return g @ aggregate(f, method, embedder)
