"""Split a long recording into product segments: change points between short windows of frame embeddings.

A boundary is a window that no longer looks like the current segment: its cosine similarity to the segment's
mean embedding drops below ``threshold``, or its top-1 product differs from the segment's usual top-1. One odd
window (a hand passing, a close-up) must not cut a segment, so a change is confirmed only after ``hysteresis``
consecutive odd windows that agree with each other (hysteresis as in a Schmitt trigger); unconfirmed odd
windows are absorbed back. Pure numpy, so it is tested on hand-made embeddings.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def window_embeddings(frame_embs: np.ndarray, window: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Mean (re-normalised) of each run of ``window`` frames: (W, D) and the [start, end) frame range of each."""
    frame_embs = np.asarray(frame_embs, dtype=np.float32).reshape(len(frame_embs), -1)
    window = max(1, int(window))
    spans = [(s, min(s + window, len(frame_embs))) for s in range(0, len(frame_embs), window)]
    if not spans:
        return np.zeros((0, frame_embs.shape[1] if frame_embs.ndim == 2 else 0), np.float32), []
    return np.stack([_unit(frame_embs[a:b].mean(axis=0)) for a, b in spans]), spans


def change_points(window_embs: np.ndarray, labels: Sequence[str | None] | None = None, threshold: float = 0.7,
                  hysteresis: int = 2) -> list[int]:
    """Window indices where segments start (always begins with 0)."""
    w = np.asarray(window_embs, dtype=np.float32)
    n = len(w)
    if n == 0:
        return []
    labels = list(labels) if labels is not None else [None] * n
    hysteresis = max(1, int(hysteresis))
    starts = [0]
    ref_sum = w[0].copy()
    counts = Counter([labels[0]] if labels[0] is not None else [])
    pending: list[int] = []

    def odd(j: int) -> bool:
        cur = counts.most_common(1)[0][0] if counts else None
        return float(_unit(ref_sum) @ w[j]) < threshold or (labels[j] is not None and cur is not None
                                                            and labels[j] != cur)

    def agree(a: int, b: int) -> bool:
        same = labels[a] is not None and labels[a] == labels[b]
        return same or float(w[a] @ w[b]) >= threshold

    for j in range(1, n):
        if odd(j):
            if pending and not agree(pending[-1], j):
                pending = []  # the odd windows disagree among themselves: not one new product yet
            pending.append(j)
            if len(pending) >= hysteresis:
                starts.append(pending[0])
                ref_sum = w[pending].sum(axis=0)
                counts = Counter(labels[p] for p in pending if labels[p] is not None)
                pending = []
        else:
            for p in pending + [j]:
                ref_sum += w[p]
                if labels[p] is not None:
                    counts[labels[p]] += 1
            pending = []
    return starts


def segment_spans(n_frames: int, window: int, starts: Sequence[int]) -> list[tuple[int, int]]:
    """Window starts -> [start, end) frame ranges covering all frames."""
    window = max(1, int(window))
    bounds = [s * window for s in starts] + [n_frames]
    return [(a, min(b, n_frames)) for a, b in zip(bounds[:-1], bounds[1:]) if a < min(b, n_frames)]


def fmt_time(t: float) -> str:
    t = max(0, int(round(t)))
    return f"{t // 3600:02d}:{t % 3600 // 60:02d}:{t % 60:02d}"
