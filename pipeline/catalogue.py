"""Catalogue-scale search: how each gallery index type does on N embeddings (``pipeline/bench.py --catalogue N``).

A platform's catalogue holds millions of shop images; LPR4M's test gallery 66k. The embeddings are a clustered
random set standing in for a trained embedder's output: products as clusters in a low-dimensional latent space
(a trained embedding has far fewer degrees of freedom than its 256 dimensions), mapped to 256-d with isotropic
noise and L2-normalised. Queries come from the same distribution and are not in the index. Every index is built
by the gallery's own ``make_index`` (the factories and defaults ``pipeline/index.py`` uses) and compared with
exact search: recall@10 = share of the exact top 10 found in the index's top 10.
"""
from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.gallery import _faiss, _hnsw, _ivf, default_nprobe, make_index

logger = logging.getLogger(__name__)

CATALOGUE_TYPES = ("flat", "ivfsq", "ivfpq", "hnsw")
SWEEP = {"ivfsq": (8, 16, 32, 64, 128), "ivfpq": (16, 64, 256), "hnsw": (16, 32, 64, 128)}


def clustered_embeddings(n: int, d: int = 256, latent: int = 64, per_cluster: int = 50, spread: float = 1.0,
                         noise: float = 0.08, seed: int = 0, chunk: int = 100_000) -> np.ndarray:
    """(n, d) float32 unit vectors in clusters of about ``per_cluster`` (a product's views and look-alikes)."""
    rng = np.random.default_rng(seed)
    k = max(1, n // per_cluster)
    proj = rng.standard_normal((latent, d), dtype=np.float32) / np.float32(np.sqrt(latent))
    centres = rng.standard_normal((k, latent), dtype=np.float32)
    x = np.empty((n, d), np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        z = centres[rng.integers(0, k, m)] + np.float32(spread) * rng.standard_normal((m, latent), dtype=np.float32)
        v = z @ proj + np.float32(noise) * rng.standard_normal((m, d), dtype=np.float32)
        x[s:s + m] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return x


def recall_at(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each row of ``exact`` that appears in the same row of ``found`` (pure; -1 = no result)."""
    k = exact.shape[1]
    return float(np.mean([len(set(f[f >= 0].tolist()) & set(e.tolist())) / k for f, e in zip(found, exact)]))


def _ms_per_query(index, q: np.ndarray, k: int, batch: int, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for s in range(0, len(q), batch):
            index.search(q[s:s + batch], k)
        times.append((time.perf_counter() - t0) / len(q) * 1000)
    return statistics.median(times)


def _set_param(index, kind: str, value: int) -> None:
    if kind == "hnsw":
        _hnsw(index).hnsw.efSearch = value
    else:
        _ivf(index).nprobe = value


def measure_catalogue(n: int, kinds: Sequence[str] = CATALOGUE_TYPES, d: int = 256, n_queries: int = 1000,
                      k: int = 10, single_queries: int = 200, seed: int = 0, tmp_dir=None,
                      max_train: int = 200_000) -> list[dict]:
    """One row per index type and search setting: build s, index MB (its file), ms/query at batch 1 and
    batch ``n_queries``, recall@k against exact search. The default setting of each type is marked."""
    faiss = _faiss()
    x = clustered_embeddings(n + n_queries, d, seed=seed)
    base, q = x[:n], x[n:]
    t0 = time.perf_counter()
    exact_index = faiss.IndexFlatIP(d)
    exact_index.add(base)
    exact = exact_index.search(q, k)[1]
    logger.info("N=%d: data and exact top-%d of %d queries in %.1f s", n, k, n_queries, time.perf_counter() - t0)
    del exact_index
    rows = []
    for kind in kinds:
        t0 = time.perf_counter()
        index, factory, actual = make_index(kind, d, n)
        if not index.is_trained:
            index.train(base[:max_train])
        index.add_with_ids(base, np.arange(n, dtype=np.int64))
        build_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory(dir=tmp_dir) as tmp:
            path = os.path.join(tmp, "index.faiss")
            faiss.write_index(index, path)
            size_mb = Path(path).stat().st_size / 2**20
        logger.info("N=%d %s (%s): built in %.1f s, %.0f MB", n, kind, factory, build_s, size_mb)
        if actual == "flat":
            settings, default = [None], None
        elif actual == "hnsw":
            default = _hnsw(index).hnsw.efSearch = 128  # GalleryIndex's default
            settings = sorted(set(SWEEP["hnsw"]) | {default})
        else:
            nlist = _ivf(index).nlist
            default = default_nprobe(actual, nlist)
            settings = sorted({p for p in SWEEP[actual] if p <= nlist} | {default})
        for value in settings:
            if value is not None:
                _set_param(index, actual, value)
            found = index.search(q, k)[1]
            rows.append({"n": n, "type": actual, "factory": factory, "param": value, "default": value == default,
                         "build_s": build_s, "index_mb": size_mb, "recall": recall_at(found, exact),
                         "ms_batch1": _ms_per_query(index, q[:single_queries], k, 1),
                         "ms_batch": _ms_per_query(index, q, k, n_queries), "batch": n_queries})
        del index
    return rows


def catalogue_table(rows: Sequence[dict]) -> str:
    head = (f"{'N':>9} {'index':<22}{'search':>12}{'build s':>9}{'MB':>8}{'ms/q b1':>9}{'ms/q b1000':>11}"
            f"{'recall@10':>10}")
    out = [head]
    for r in rows:
        p = "" if r["param"] is None else ("ef " if r["type"] == "hnsw" else "nprobe ") + str(r["param"])
        out.append(f"{r['n']:>9} {r['factory']:<22}{p + ('*' if r['default'] else ' '):>12}{r['build_s']:9.1f}"
                   f"{r['index_mb']:8.0f}{r['ms_batch1']:9.3f}{r['ms_batch']:11.3f}{r['recall']:10.3f}")
    out.append("* the setting a built index uses by default (search_params in its meta.json)")
    return "\n".join(out)
