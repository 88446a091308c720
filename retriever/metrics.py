"""Rank-k accuracy counted as RICE's ``lpr_eval.py`` counts it, and the faiss search that feeds it.

Counting rules (pure functions, tested against brute force and hand-computed cases):
- each query is ranked against its own live's gallery (``test_liveid_to_gallery``) -- or one global gallery;
- a query hits at k when ANY of its ground-truth images is among the first k (galleries shorter than k: the
  whole gallery);
- the denominator is every query, including those that failed (no frames, unreadable images): a failed query
  is a miss at every k, and the number of them is reported.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import logging

import numpy as np

logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines about AVX builds are noise

DEFAULT_KS = (1, 3, 5, 10)


def rank_k_accuracy(rankings: Sequence[Sequence[str] | None], gt_ids: Sequence[Iterable[str]],
                    ks: Sequence[int] = DEFAULT_KS) -> dict:
    """Rank-k accuracy of ranked gallery ids per query (``None`` = a failed query, counted as a miss).

    >>> rank_k_accuracy([["a", "b"], ["b", "c"], None], [["b"], ["b"], ["a"]], ks=(1, 2))
    {'R1': 0.3333333333333333, 'R2': 0.6666666666666666, 'n_queries': 3, 'n_failed': 1, 'hits': {'R1': 1, 'R2': 2}}
    """
    if len(rankings) != len(gt_ids):
        raise ValueError(f"{len(rankings)} rankings for {len(gt_ids)} queries")
    ks = tuple(int(k) for k in ks)
    if any(k < 1 for k in ks):
        raise ValueError("k must be >= 1")
    hits = {k: 0 for k in ks}
    failed = 0
    for ranked, gt in zip(rankings, gt_ids):
        if ranked is None:
            failed += 1
            continue
        gt = set(gt)
        first = next((i for i, image_id in enumerate(ranked) if image_id in gt), None)
        if first is None:
            continue
        for k in ks:
            if first < k:
                hits[k] += 1
    n = len(rankings)
    out = {f"R{k}": (hits[k] / n if n else 0.0) for k in ks}
    out.update(n_queries=n, n_failed=failed, hits={f"R{k}": hits[k] for k in ks})
    return out


def by_product(rankings: Sequence[Sequence[str] | None], gt_ids: Sequence[Iterable[str]], seen_ids: set[str],
               ks: Sequence[int] = DEFAULT_KS) -> dict:
    """Rank-k of queries whose product was trained on (any ground-truth id in ``seen_ids``) apart from the others.

    An empty group is reported as ``{"n_queries": 0}``, never as an R1 of 0.

    >>> by_product([["a"], ["b"]], [["a"], ["b"]], {"a"}, ks=(1,))["unseen"]["R1"]
    1.0
    """
    groups = {"seen": [], "unseen": []}
    for i, gt in enumerate(gt_ids):
        groups["seen" if set(gt) & seen_ids else "unseen"].append(i)
    return {name: rank_k_accuracy([rankings[i] for i in rows], [gt_ids[i] for i in rows], ks) if rows
            else {"n_queries": 0} for name, rows in groups.items()}


def rank_from_scores(scores: np.ndarray, gallery_ids: Sequence[str], k: int | None = None):
    """Ranked ids and scores of one query from its (G,) scores (ties keep gallery order)."""
    scores = np.asarray(scores, np.float32).reshape(-1)
    order = np.argsort(-scores, kind="stable")[: (len(scores) if k is None else k)]
    return [gallery_ids[i] for i in order], scores[order]


def _flat_ip(embs: np.ndarray):
    import faiss
    index = faiss.IndexFlatIP(embs.shape[1])
    index.add(np.ascontiguousarray(embs, np.float32))
    return index


def _gallery_groups(query_galleries: Sequence[str | None], usable: Sequence[bool],
                    galleries: Mapping[str, tuple[Sequence[str], np.ndarray]], out: list):
    """Group usable queries by gallery so each gallery is searched once; yields ``(rows, ids, embs)`` for
    non-empty galleries and fills ``out`` with an empty ranking for queries whose gallery is empty or unknown."""
    by_gallery: dict[str, list[int]] = {}
    for i, (name, ok) in enumerate(zip(query_galleries, usable)):
        if name is not None and ok:
            by_gallery.setdefault(name, []).append(i)
    for name, rows in by_gallery.items():
        ids, embs = galleries.get(name, ((), None))
        if embs is None or len(ids) == 0:
            for i in rows:
                out[i] = ([], np.zeros(0, np.float32))
            continue
        yield rows, ids, embs


def search_galleries(query_embs: np.ndarray, query_galleries: Sequence[str | None],
                     galleries: Mapping[str, tuple[Sequence[str], np.ndarray]], k: int = 10):
    """faiss exact inner-product search of each query in its own gallery.

    ``query_galleries[i]`` names the gallery of query i (``None`` = failed query, returns None there);
    ``galleries[name] = (image_ids, (G, D) embeddings)``. Returns per query ``(ranked ids, scores)`` or None.
    Queries are grouped by gallery so each gallery is indexed once (one IndexFlatIP per live).
    """
    query_embs = np.ascontiguousarray(query_embs, np.float32)
    out: list = [None] * len(query_galleries)
    for rows, ids, embs in _gallery_groups(query_galleries, [True] * len(query_galleries), galleries, out):
        kk = min(k, len(ids))
        dist, idx = _flat_ip(embs).search(query_embs[rows], kk)
        for r, i in enumerate(rows):
            keep = idx[r] >= 0
            out[i] = ([ids[j] for j in idx[r][keep]], dist[r][keep])
    return out


def search_sets(query_sets: Sequence[np.ndarray | None], query_galleries: Sequence[str | None],
                galleries: Mapping[str, tuple[Sequence[str], np.ndarray]], k: int = 10):
    """Set-to-image max-similarity search: a clip scores an image by its best frame (``aggregate`` "max")."""
    out: list = [None] * len(query_sets)
    usable = [q is not None and len(q) > 0 for q in query_sets]
    for rows, ids, embs in _gallery_groups(query_galleries, usable, galleries, out):
        frames = np.concatenate([query_sets[i] for i in rows]).astype(np.float32)
        starts = np.cumsum([0] + [len(query_sets[i]) for i in rows[:-1]])
        sims = np.maximum.reduceat(frames @ np.asarray(embs, np.float32).T, starts, axis=0)
        kk = min(k, len(ids))
        top = np.argpartition(-sims, kk - 1, axis=1)[:, :kk] if kk < len(ids) else \
            np.tile(np.arange(len(ids)), (len(rows), 1))
        for r, i in enumerate(rows):
            cand = top[r]
            order = cand[np.lexsort((cand, -sims[r, cand]))]
            out[i] = ([ids[j] for j in order], sims[r, order])
    return out


def recall_table(results: Mapping[str, dict], ks: Sequence[int] = DEFAULT_KS) -> str:
    """A fixed-width text table: one row per setting, R@k columns and the failed-query count."""
    head = f"{'setting':<34}" + "".join(f"{'R' + str(k):>8}" for k in ks) + f"{'queries':>9}{'failed':>8}"
    rows = [head]
    for name, r in results.items():
        rows.append(f"{name:<34}" + "".join(f"{r.get(f'R{k}', float('nan')):>8.3f}" for k in ks)
                    + f"{r.get('n_queries', 0):>9d}{r.get('n_failed', 0):>8d}")
    return "\n".join(rows)
