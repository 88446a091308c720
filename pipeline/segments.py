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


class OnlineSegmenter:
    """``change_points`` one window at a time, for a stream that is still running: ``push`` returns the index
    of the window where a new segment starts once that change is confirmed, else None."""

    def __init__(self, threshold: float = 0.7, hysteresis: int = 2):
        self.threshold = threshold
        self.hysteresis = max(1, int(hysteresis))
        self.n = 0
        self.ref_sum: np.ndarray | None = None
        self.counts: Counter = Counter()
        self.pending: list[tuple[int, np.ndarray, str | None]] = []

    def _restart(self, windows) -> None:
        self.ref_sum = np.sum([w for _, w, _ in windows], axis=0)
        self.counts = Counter(lab for _, _, lab in windows if lab is not None)

    def push(self, w: np.ndarray, label: str | None = None) -> int | None:
        j, w = self.n, np.asarray(w, dtype=np.float32).reshape(-1)
        self.n += 1
        if self.ref_sum is None:
            self._restart([(j, w, label)])
            return 0
        cur = self.counts.most_common(1)[0][0] if self.counts else None
        odd = float(_unit(self.ref_sum) @ w) < self.threshold or (label is not None and cur is not None
                                                                  and label != cur)
        if not odd:
            for _, pw, plab in self.pending + [(j, w, label)]:
                self.ref_sum += pw
                if plab is not None:
                    self.counts[plab] += 1
            self.pending = []
            return None
        if self.pending:
            _, lw, llab = self.pending[-1]
            if not ((llab is not None and llab == label) or float(lw @ w) >= self.threshold):
                self.pending = []  # the odd windows disagree among themselves: not one new product yet
        self.pending.append((j, w, label))
        if len(self.pending) < self.hysteresis:
            return None
        start = self.pending[0][0]
        self._restart(self.pending)
        self.pending = []
        return start


def change_points(window_embs: np.ndarray, labels: Sequence[str | None] | None = None, threshold: float = 0.7,
                  hysteresis: int = 2) -> list[int]:
    """Window indices where segments start (always begins with 0)."""
    w = np.asarray(window_embs, dtype=np.float32)
    labels = list(labels) if labels is not None else [None] * len(w)
    seg = OnlineSegmenter(threshold, hysteresis)
    return [s for s in (seg.push(w[j], labels[j]) for j in range(len(w))) if s is not None]


def segment_spans(n_frames: int, window: int, starts: Sequence[int]) -> list[tuple[int, int]]:
    """Window starts -> [start, end) frame ranges covering all frames."""
    window = max(1, int(window))
    bounds = [s * window for s in starts] + [n_frames]
    return [(a, min(b, n_frames)) for a, b in zip(bounds[:-1], bounds[1:]) if a < min(b, n_frames)]


def fmt_time(t: float) -> str:
    t = max(0, int(round(t)))
    return f"{t // 3600:02d}:{t % 3600 // 60:02d}:{t % 60:02d}"
