"""Benchmark machinery: catalogue recall against an independent count, index choice by size, the decoding
baselines against our sampler, the process launcher. Timings themselves are not asserted (benchmarks print them)."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from lpr4m.errors import BadInput


def test_recall_at_matches_a_plain_count():
    from pipeline.catalogue import recall_at
    rng = np.random.default_rng(0)
    exact = np.stack([rng.permutation(50)[:10] for _ in range(30)])
    found = exact.copy()
    found[:, 7:] = -1  # three misses per row, as a search with too few results returns
    found[::2, 0] = 99
    expected = np.mean([sum(1 for v in f if v in set(e)) / 10 for f, e in zip(found.tolist(), exact.tolist())])
    assert recall_at(found, exact) == pytest.approx(expected)
    assert recall_at(exact, exact) == 1.0


def test_auto_index_type_follows_the_catalogue_size():
    from pipeline.gallery import AUTO_FLAT_MAX, default_nlist, make_index, resolve_index_type
    assert resolve_index_type("auto", AUTO_FLAT_MAX) == "flat"
    assert resolve_index_type("auto", AUTO_FLAT_MAX + 1) == "hnsw"
    assert resolve_index_type("hnsw", 10) == "hnsw"
    with pytest.raises(BadInput, match="unknown --index-type"):
        resolve_index_type("lsh", 10)
    _, factory, actual = make_index("auto", 16, 100_000)
    assert actual == "hnsw" and factory.startswith("IDMap2,HNSW")
    _, factory, actual = make_index("ivfsq", 16, 100_000)
    assert actual == "ivfsq" and factory == f"IVF{default_nlist(100_000)},SQ8"
    assert default_nlist(1_000_000) == 4096 and default_nlist(2000) == 32  # 4 sqrt(N), >= 39 vectors per list


def test_catalogue_rows_cover_every_type_and_setting():
    import faiss
    from pipeline.catalogue import catalogue_table, measure_catalogue
    faiss.omp_set_num_threads(1)
    rows = measure_catalogue(3000, ("flat", "ivfsq", "hnsw"), d=32, n_queries=50, single_queries=5)
    flat = [r for r in rows if r["type"] == "flat"]
    assert len(flat) == 1 and flat[0]["recall"] == 1.0 and flat[0]["default"]
    for kind in ("ivfsq", "hnsw"):
        sweep = [r for r in rows if r["type"] == kind]
        assert sum(r["default"] for r in sweep) == 1 and len(sweep) >= 3
        assert max(r["recall"] for r in sweep) >= 0.9  # clustered data: approximate search finds most neighbours
        assert all(r["index_mb"] > 0 and r["build_s"] >= 0 and r["ms_batch1"] > 0 for r in sweep)
    assert "recall@10" in catalogue_table(rows) and len(catalogue_table(rows).splitlines()) == len(rows) + 2


def test_clustered_embeddings_are_unit_vectors_with_neighbours():
    from pipeline.catalogue import clustered_embeddings
    x = clustered_embeddings(2000, d=64, seed=1)
    assert x.shape == (2000, 64) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    sims = x[:100] @ x.T
    np.fill_diagonal(sims[:, :100], -1)
    assert np.median(sims.max(axis=1)) > 0.5 > np.median(sims)  # near neighbours exist; most pairs are far
    assert np.array_equal(x, clustered_embeddings(2000, d=64, seed=1))


@pytest.mark.parametrize("gop", [5, 30])
def test_decoding_baselines_and_our_sampler_take_the_same_frames(tmp_path, gop):
    from lpr4m.frames import sample_frames, write_video
    from pipeline.bench import plain_seek_loop, sequential_decode
    frames = [np.full((64, 96, 3), (i * 4) % 256, np.uint8) for i in range(60)]  # 6 s at 10 fps
    clip = tmp_path / "c.mp4"
    write_video(clip, frames, fps=10, options={"g": str(gop)})
    ours = sum(1 for _ in sample_frames(clip, mode="fps", fps=1.0))
    assert plain_seek_loop(clip, 1.0) == sequential_decode(clip, 1.0) == ours == 6


def test_measure_process_times_a_process_and_reports_failure():
    from pipeline.bench import measure_process
    r = measure_process([sys.executable, "-c", "x = bytearray(60 * 2**20); x[::4096] = b'1' * len(x[::4096])"], 1)
    assert r["rc"] == 0 and r["wall_s"] > 0 and 60 < r["peak_rss_mb"] < 200  # the child's peak, not this process's
    with pytest.raises(BadInput, match="exit 3"):
        measure_process([sys.executable, "-c", "raise SystemExit(3)"], 1)
