"""Speed of the retriever: embeddings/s (PyTorch vs ONNX Runtime) and ranking time at LPR4M test scale.

faiss-benchmark style: warm up, repeat each measurement, print the median with a fixed-width table, and always a
baseline row measured in the same run (brute-force numpy ranking next to faiss).
"""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from lpr4m.cli import Parser, emit_json, nonnegative_int, output_file, positive_int, setup_logging
from retriever.metrics import rank_k_accuracy, search_galleries

logger = logging.getLogger(__name__)

DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "retriever.safetensors"


def timed(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, min_time: float = 0.0) -> list[float]:
    for _ in range(warmup):
        fn()
    times, t_all = [], time.perf_counter()
    while len(times) < repeats or time.perf_counter() - t_all < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def synthetic_lpr_test(n_queries: int = 20079, n_lives: int = 110, gallery_size: int = 600, dim: int = 256,
                       seed: int = 0):
    """Query and gallery embeddings shaped like the LPR4M test split: queries near one of their live's images."""
    rng = np.random.default_rng(seed)
    galleries, q_live, q_gt = {}, [], []
    for li in range(n_lives):
        n = int(rng.integers(int(gallery_size * 0.8), int(gallery_size * 1.2) + 1))
        g = rng.standard_normal((n, dim)).astype(np.float32)
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        galleries[f"live{li}"] = ([f"live{li}-img{j}" for j in range(n)], g)
    lives = list(galleries)
    q = np.zeros((n_queries, dim), np.float32)
    for i in range(n_queries):
        live = lives[i % n_lives]
        ids, g = galleries[live]
        j = int(rng.integers(len(ids)))
        v = g[j] + 0.9 * rng.standard_normal(dim).astype(np.float32) / np.sqrt(dim) * 6
        q[i] = v / np.linalg.norm(v)
        q_live.append(live)
        q_gt.append([ids[j]])
    return q, q_live, q_gt, galleries


def brute_force_rank(q, q_live, galleries, k):
    """Reference: per-live matrix product + full argsort in numpy."""
    out = [None] * len(q)
    rows_by = {}
    for i, live in enumerate(q_live):
        rows_by.setdefault(live, []).append(i)
    for live, rows in rows_by.items():
        ids, g = galleries[live]
        order = np.argsort(-(q[rows] @ g.T), axis=1, kind="stable")[:, :k]
        for r, i in enumerate(rows):
            out[i] = [ids[j] for j in order[r]]
    return out


def bench_ranking(n_queries, n_lives, gallery_size, dim, repeats, ks=(1, 3, 5, 10)):
    q, q_live, q_gt, galleries = synthetic_lpr_test(n_queries, n_lives, gallery_size, dim)
    k = max(ks)
    res = {}

    def run_faiss():
        ranked = search_galleries(q, q_live, galleries, k)
        res["faiss"] = rank_k_accuracy([r[0] for r in ranked], q_gt, ks)

    def run_brute():
        res["numpy"] = rank_k_accuracy(brute_force_rank(q, q_live, galleries, k), q_gt, ks)

    t_faiss = timed(run_faiss, repeats)
    t_brute = timed(run_brute, max(1, repeats // 2))
    n_images = sum(len(v[0]) for v in galleries.values())
    return {"queries": n_queries, "lives": n_lives, "gallery_images": n_images, "dim": dim,
            "faiss_s": statistics.median(t_faiss), "numpy_argsort_s": statistics.median(t_brute),
            "runs": [len(t_faiss), len(t_brute)], "R1_faiss": res["faiss"]["R1"], "R1_numpy": res["numpy"]["R1"],
            "same_result": res["faiss"]["hits"] == res["numpy"]["hits"]}


def bench_embedding(weights, batch: int, repeats: int, threads: int):
    import torch
    from retriever.embedder import load_embedder
    from retriever.exporting import export_onnx
    if threads:
        torch.set_num_threads(threads)
    weights = Path(weights)
    rows = {}
    emb_pt = load_embedder(weights)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (360, 640, 3), dtype=np.uint8) for _ in range(batch)]
    onnx_path = weights.with_suffix(".onnx")
    tmpdir = None
    if not (onnx_path.is_file() and onnx_path.with_name(onnx_path.name + ".json").is_file()):
        tmpdir = tempfile.TemporaryDirectory()
        import shutil
        src = Path(tmpdir.name) / weights.name
        shutil.copy(weights, src)
        shutil.copy(weights.with_suffix(".json"), src.with_suffix(".json"))
        onnx_path = Path(export_onnx(src)["path"])
    emb_ort = load_embedder(onnx_path)
    if threads:
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        emb_ort.backend.session = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    for name, emb in (("pytorch", emb_pt), ("onnxruntime", emb_ort)):
        t = timed(lambda e=emb: e.embed(images, batch_size=batch), repeats)
        rows[name] = {"images_per_s": batch / statistics.median(t), "ms_per_image": 1000 * statistics.median(t) / batch,
                      "runs": len(t)}
    y1, y2 = emb_pt.embed(images[:4]), emb_ort.embed(images[:4])
    rows["parity_min_cosine"] = float((y1 * y2).sum(1).min())
    rows["input_size"] = emb_pt.config.input_size
    rows["batch"] = batch
    if tmpdir is not None:
        tmpdir.cleanup()
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="retriever/bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    p.add_argument("--batch", type=positive_int, default=32)
    p.add_argument("--repeats", "--runs", type=positive_int, default=5)
    p.add_argument("--threads", type=nonnegative_int, default=2,
                   help="CPU threads for both backends (0 = library default)")
    p.add_argument("--queries", type=positive_int, default=20079)
    p.add_argument("--lives", type=positive_int, default=110)
    p.add_argument("--gallery-size", type=positive_int, default=600)
    p.add_argument("--dim", type=positive_int, default=None,
                   help="embedding size for the ranking bench (default: weights')")
    p.add_argument("--skip-embed", action="store_true", help="only the ranking benchmark")
    p.add_argument("--csv", type=output_file, default=None, help="also write the table rows here")
    p.add_argument("--out", type=output_file, default=None)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    import faiss
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    result = {}
    dim = args.dim or 256
    if not args.skip_embed:
        from retriever.embedder import read_config
        dim = args.dim or read_config(args.weights).embed_dim
        result["embedding"] = bench_embedding(args.weights, args.batch, args.repeats, args.threads)
    result["ranking"] = bench_ranking(args.queries, args.lives, args.gallery_size, dim, args.repeats)
    lines = [f"{'what':<44}{'value':>12}  unit"]
    if "embedding" in result:
        e = result["embedding"]
        for name in ("pytorch", "onnxruntime"):
            lines.append(f"{'embed ' + name + ' (batch %d, %dpx)' % (e['batch'], e['input_size']):<44}"
                         f"{e[name]['images_per_s']:>12.1f}  images/s")
        lines.append(f"{'onnxruntime / pytorch':<44}{e['onnxruntime']['images_per_s'] / e['pytorch']['images_per_s']:>12.2f}  x")
    r = result["ranking"]
    what = f"rank {r['queries']} q in {r['lives']} lives ({r['gallery_images']} img)"
    lines.append(f"{what + ' faiss':<44}{r['faiss_s']:>12.3f}  s (median of {r['runs'][0]})")
    lines.append(f"{what + ' numpy':<44}{r['numpy_argsort_s']:>12.3f}  s (baseline)")
    lines.append(f"{'numpy / faiss':<44}{r['numpy_argsort_s'] / r['faiss_s']:>12.2f}  x   same counts: {r['same_result']}")
    print("\n".join(lines), flush=True)
    if args.csv:
        from lpr4m.io import atomic_write
        with atomic_write(args.csv) as f:
            f.write("what,value,unit\n")
            for line in lines[1:]:
                f.write(",".join([line[:44].strip(), line[44:56].strip(), line[56:].strip()]) + "\n")
    emit_json(result, args.out)
    return 0
