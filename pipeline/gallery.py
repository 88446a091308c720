"""The gallery index: shop-image embeddings in faiss, saved as a folder with ``index-<token>.faiss`` + ``meta.json``.

Why a folder: the index and its meta (embedder fingerprint, ids, titles, paths) must change together. A save
writes a new index file beside the old one, then replaces ``meta.json`` (which names its index file) in one atomic
rename, so a reader or a kill sees the old pair or the new pair, never a mix or nothing; ``meta.json`` records the
index file's sha256 and a checksum of its rows, and ``load`` checks both. Writers take a lock on the folder, and a
folder that is not one of our indexes is never written to.

Vectors are L2-normalised and searched by inner product (= cosine). Every index is addressed by our own int64
ids (``IndexIDMap2`` around flat / HNSW, native ids for IVF), so ``add`` and ``remove`` need no rebuild; HNSW
cannot delete, so removal rebuilds it from its stored vectors (no re-embedding).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from lpr4m.errors import BadInput, Problems
from lpr4m.ids import GALLERY_NAME_RE, IMAGE_SUFFIXES, LIVE_ID_RE, check_safe_name
from lpr4m.io import atomic_path, exclusive, read_json, sha256_file, write_json

logger = logging.getLogger(__name__)

FORMAT = "lpr-gallery-index"
VERSION = 1
INDEX_FILE = "index.faiss"  # the name versions before index-<token>.faiss used
META_FILE = "meta.json"
LOCK_FILE = ".lock"
INDEX_TYPES = ("auto", "flat", "ivfsq", "ivfpq", "hnsw")
MIN_IVFPQ_TRAIN = 1000  # below this, k-means/PQ training is meaningless: fall back to the exact index
# "auto": exact search up to this many vectors (~1.5 ms a query on 2 cores), HNSW above: on `pipeline/bench.py
# --catalogue` it kept recall@10 0.99 at 100k and 0.93 at 1M under 2 ms a query, where IVF-SQ8 fell to 0.83 / 0.66
# at its default probes (but HNSW holds the vectors and its graph: 1.2 GB at 1M against IVF-SQ8's 256 MB)
AUTO_FLAT_MAX = 20_000
TITLE_FILES = ("titles.txt", "titles.tsv")
ROW_COLUMNS = ("ids", "image_ids", "views", "live_ids", "paths")  # meta's per-vector lists, row i = faiss id ids[i]


def _faiss():
    import faiss  # imported lazily: `--help` and the report writers must not pay for it
    return faiss


@dataclass
class GalleryItem:
    """One shop image: which product (image_id), which view, which live's gallery, its title and file."""

    image_id: str
    view: int = 0
    live_id: str = ""
    title: str = ""
    path: str = ""  # relative to the gallery root (posix)

    @property
    def key(self) -> str:
        return f"{self.image_id}-{self.view}"


@dataclass
class Match:
    """A search hit: the product (best view) and its cosine score."""

    image_id: str
    score: float
    title: str = ""
    live_id: str = ""
    view: int = 0
    path: str = ""  # absolute, for reports; may not exist any more
    id: int = -1

    def as_dict(self) -> dict:
        return asdict(self)


# -- collecting shop images ----------------------------------------------------------------------------------
def _read_titles_file(path: Path) -> dict[str, str]:
    titles = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n\r")
            if not line.strip():
                continue
            key, sep, title = line.partition("\t")
            if not sep:
                raise BadInput(path, "expected 'image_id<TAB>title' lines", line=n)
            titles[key.strip()] = title.strip()
    return titles


def _name_to_id(stem: str) -> tuple[str, int]:
    """``<image_id>-<view>`` (LPR4M gallery name) -> (image_id, view); any other stem is its own id, view 0."""
    m = GALLERY_NAME_RE.match(stem)
    if m:
        return m.group("image"), int(m.group("view"))
    return stem, 0


def collect_folder(folder: Path) -> list[GalleryItem]:
    """Every image under a plain folder (recursive, sorted). A ``titles.txt`` (id TAB title) names products;
    a sub-folder's name is used as the live id (LPR4M ``gallery/<live_id>/``)."""
    titles: dict[str, str] = {}
    for name in TITLE_FILES:
        if (folder / name).is_file():
            titles.update(_read_titles_file(folder / name))
    for p in sorted(folder.glob("test_image_title*.txt")):
        titles.update(_read_titles_file(p))
    # a live's folder inside an LPR4M root (ROOT/gallery/<live_id>) or ROOT/gallery: titles are in annotations/
    for root in (folder.parent.parent, folder.parent):
        if (root / "gallery").is_dir() and (root / "annotations").is_dir() and folder.resolve().is_relative_to(
                (root / "gallery").resolve()):
            from lpr4m.layout import Dataset
            titles = {**Dataset(root).titles, **titles}
            break
    items = []
    seen: dict[tuple[str, str, int], Path] = {}
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() not in IMAGE_SUFFIXES or not p.is_file() or p.name.startswith("."):
            continue
        rel = p.relative_to(folder)
        try:
            rel.as_posix().encode("utf-8")
        except UnicodeEncodeError:  # the index's meta.json records names as UTF-8 text
            raise BadInput(p, "file name is not valid UTF-8; rename the file") from None
        image_id, view = _name_to_id(p.stem)
        live_id = rel.parts[0] if len(rel.parts) > 1 else (folder.name if LIVE_ID_RE.match(folder.name) else "")
        if (other := seen.setdefault((live_id, image_id, view), rel)) != rel:
            raise BadInput(folder / rel, f"the same shop image as {other} (image id {image_id!r}, view {view}); "
                                         "keep one of the two files")
        items.append(GalleryItem(image_id, view, live_id, titles.get(image_id, titles.get(p.stem, "")),
                                 rel.as_posix()))
    return items


def check_live_ids(asked: Iterable[str], known: Iterable[str], where) -> None:
    """Refuse a ``--live`` id the gallery does not have: it would silently rank among nothing."""
    known = sorted(set(known) - {""})
    unknown = [x for x in asked if x not in known]
    if unknown:
        listed = ", ".join(known[:5]) + (f", ... ({len(known)} in all)" if len(known) > 5 else "")
        raise BadInput(where, f"--live {unknown[0]!r} is not a live-stream id of this gallery ("
                              + (f"known: {listed})" if known else "it has none: no <live_id>/ sub-folders)"))


def collect_lpr4m(root: Path, split: str = "test", live_ids: Sequence[str] | None = None,
                  main_only: bool = False) -> list[GalleryItem]:
    """Shop images of an LPR4M root: the test galleries (``gallery/<live>/``), the training images, or both."""
    from lpr4m.layout import Dataset
    ds = Dataset(root)
    items: list[GalleryItem] = []
    if split in ("test", "all"):
        titles = ds.titles
        if live_ids:
            check_live_ids(live_ids, ds.live_galleries, ds.annotation("gallery"))
        lives = list(live_ids) if live_ids else sorted(ds.live_galleries)
        for live in lives:
            for image_id, view, path in ds.gallery(live, main_only=main_only):
                items.append(GalleryItem(image_id, view, live, titles.get(image_id, ""),
                                         path.relative_to(ds.root).as_posix()))
    if split in ("training", "all"):
        seen: dict[str, tuple[str, str]] = {}
        for clip in ds.training_clips(Problems()):
            seen.setdefault(clip.image_id, (clip.live_id, clip.image_title))
        for image_id, (live, title) in sorted(seen.items()):
            path = ds.training_image_path(image_id)
            if path.is_file():
                items.append(GalleryItem(image_id, 0, live, title, path.relative_to(ds.root).as_posix()))
    return items


def is_lpr4m_root(path: Path) -> bool:
    return (path / "annotations").is_dir() and ((path / "gallery").is_dir() or (path / "training_image").is_dir())


def collect(src, split: str = "test", live_ids: Sequence[str] | None = None,
            main_only: bool = False) -> tuple[Path, list[GalleryItem]]:
    """(gallery root, items) for a plain image folder or an LPR4M root. No images -> BadInput."""
    src = Path(src)
    if not src.exists():
        raise BadInput(src, "gallery folder not found")
    if not src.is_dir():
        raise BadInput(src, "expected a folder of shop images or an LPR4M root, got a file")
    if is_lpr4m_root(src):
        items = collect_lpr4m(src, split, live_ids, main_only)
    else:
        items = collect_folder(src)
        if live_ids:
            check_live_ids(live_ids, (it.live_id for it in items), src)
            items = [it for it in items if it.live_id in set(live_ids)]
        if main_only:
            items = [it for it in items if it.view == 0]
    if not items:
        raise BadInput(src, "no shop images found (expected .jpg/.png files, or an LPR4M root with gallery/)")
    return src.resolve(), items


def content_hash(root: Path, items: Sequence[GalleryItem]) -> str:
    """sha256 over the relative paths and bytes of the gallery's files (the cache key of an on-the-fly index)."""
    h = hashlib.sha256()
    for it in sorted(items, key=lambda i: i.path):
        h.update(it.path.encode() + b"\0" + it.title.encode() + b"\0")
        with contextlib.suppress(OSError), open(root / it.path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# -- embedding ---------------------------------------------------------------------------------------------------
def embedder_info(embedder) -> dict:
    """What the index remembers about its embedder (the fingerprint is what a query must match)."""
    cfg = getattr(embedder, "config", None)
    get = (lambda k: getattr(cfg, k, None)) if cfg is not None and not isinstance(cfg, dict) else \
        (lambda k: (cfg or {}).get(k))
    extra = get("extra") or {}
    return {"fingerprint": str(embedder.fingerprint), "name": get("backbone") or type(embedder).__name__,
            "sha256": get("sha256"), "source_sha256": extra.get("source_sha256") if isinstance(extra, dict) else None,
            "embed_dim": get("embed_dim"), "weights": str(getattr(embedder, "weights_path", "") or "")}


def same_embedder(a: dict, b: dict) -> bool:
    """Same fingerprint, or the same checkpoint in another runtime: an ONNX/TensorRT export (parity-checked by
    the export command) records its source's sha256, and the preprocessing part of the fingerprint must agree."""
    if a["fingerprint"] == b["fingerprint"]:
        return True
    pre_a, pre_b = a["fingerprint"].rsplit("-", 1)[0], b["fingerprint"].rsplit("-", 1)[0]
    if pre_a != pre_b:
        return False
    sha_a = {a.get("sha256"), a.get("source_sha256")} - {None, ""}
    sha_b = {b.get("sha256"), b.get("source_sha256")} - {None, ""}
    return bool(sha_a & sha_b)


def embed_items(embedder, root: Path, items: Sequence[GalleryItem], problems: Problems, batch_size: int = 32,
                show_progress: bool = True) -> tuple[np.ndarray, list[GalleryItem]]:
    """Embed shop images in batches; unreadable images are skipped and counted (fatal with ``--strict``)."""
    from lpr4m.cli import progress
    from lpr4m.images import load_rgb
    vecs, kept = [], []
    batch, batch_items = [], []

    def flush():
        if batch:
            vecs.append(np.asarray(embedder.embed(batch), dtype=np.float32))
            kept.extend(batch_items)
            batch.clear()
            batch_items.clear()

    for it in progress(items, desc="embed gallery", unit="img", disable=None if show_progress else True):
        try:
            batch.append(load_rgb(root / it.path))
        except BadInput as err:
            problems.add(err, "unreadable_image")
            continue
        batch_items.append(it)
        if len(batch) >= batch_size:
            flush()
    flush()
    if not vecs:
        return np.zeros((0, 0), np.float32), []
    x = np.ascontiguousarray(np.concatenate(vecs), dtype=np.float32)
    return normalise(x), kept


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.array(x, dtype=np.float32, copy=True, ndmin=2)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(n, 1e-12))


# -- index construction ------------------------------------------------------------------------------------------
def _pq_m(d: int) -> int:
    """PQ sub-quantisers: about 4 dims each, and a divisor of d."""
    for m in range(max(1, d // 4), 0, -1):
        if d % m == 0 and m <= 64:
            return m
    return 1


def resolve_index_type(index_type: str, n: int) -> str:
    """The concrete index type: ``auto`` is exact search for small galleries and HNSW for catalogues."""
    if index_type not in INDEX_TYPES:
        raise BadInput(None, f"unknown --index-type {index_type!r} (expected one of {', '.join(INDEX_TYPES)})")
    if index_type == "auto":
        return "flat" if n <= AUTO_FLAT_MAX else "hnsw"
    return index_type


def default_nlist(n: int) -> int:
    """IVF lists: a power of two near 4 sqrt(N), with at least 39 training vectors per list (faiss' floor)."""
    cap = max(1, n // 39)
    p = max(0, int(round(math.log2(max(1.0, min(4 * math.sqrt(n), cap))))))
    return 1 << (p - 1 if p > 0 and 1 << p > cap else p)


def default_nprobe(index_type: str, nlist: int) -> int:
    """Lists searched per query: nlist/8 (IVF-SQ8 reached recall@10 0.96 of exact search there at 100k on the
    catalogue benchmark, 1 ms a query; at 1M it needs more than 2 ms for less)."""
    return min(nlist, max(8, nlist // 8))


def make_index(index_type: str, d: int, n_train: int, nlist: int | None = None, hnsw_m: int = 32):
    """(faiss index, factory string, actual type). IVF with too few vectors falls back to exact search."""
    faiss = _faiss()
    index_type = resolve_index_type(index_type, n_train)
    if index_type in ("ivfpq", "ivfsq") and n_train < MIN_IVFPQ_TRAIN:
        logger.warning("IVF needs at least %d shop images to train its quantisers (have %d): "
                       "using the exact flat index instead", MIN_IVFPQ_TRAIN, n_train)
        index_type = "flat"
    if index_type == "flat":
        factory = "IDMap2,Flat"
    elif index_type == "hnsw":
        factory = f"IDMap2,HNSW{hnsw_m}"
    elif index_type == "ivfsq":
        factory = f"IVF{nlist or default_nlist(n_train)},SQ8"
    else:
        nlist = nlist or max(1, min(int(4 * math.sqrt(n_train)), n_train // 39))
        nbits = 8 if n_train >= 39 * 256 else 6 if n_train >= 39 * 64 else 4
        factory = f"IVF{nlist},PQ{_pq_m(d)}x{nbits}"
    return faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT), factory, index_type


class GalleryIndex:
    """A faiss index of shop images with the meta that makes its ids meaningful."""

    def __init__(self, index, meta: dict, path: Path | None = None):
        self.index = index
        self.meta = meta
        self.path = path
        self._rebuild_lookup()
        self._gpu_index = None
        self._mapped = False

    # -- bookkeeping -------------------------------------------------------------------------------------------
    def _rebuild_lookup(self) -> None:
        m = self.meta
        self.items: dict[int, GalleryItem] = {
            int(i): GalleryItem(img, int(v), live, m["titles"].get(img, ""), p)
            for i, img, v, live, p in zip(m["ids"], m["image_ids"], m["views"], m["live_ids"], m["paths"])}
        self._by_live: dict[str, np.ndarray] = {}
        groups: dict[str, list[int]] = {}
        for i, it in self.items.items():
            groups.setdefault(it.live_id, []).append(i)
        self._by_live = {k: np.asarray(v, dtype=np.int64) for k, v in groups.items()}
        views: dict[str, int] = {}
        for it in self.items.values():
            views[it.image_id] = views.get(it.image_id, 0) + 1
        self._max_views = max(views.values(), default=1)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def index_type(self) -> str:
        return self.meta["index_type"]

    @property
    def live_ids(self) -> list[str]:
        return sorted(self._by_live)

    @property
    def image_ids(self) -> list[str]:
        return sorted({it.image_id for it in self.items.values()})

    def gallery_root(self) -> Path | None:
        root = self.meta.get("gallery_root")
        if root is None:
            return None
        root = Path(root)
        return root if root.is_absolute() or self.path is None else (self.path / root).resolve()

    def item_path(self, item: GalleryItem) -> Path | None:
        root = self.gallery_root()
        return None if root is None else root / item.path

    def _append_items(self, ids: np.ndarray, items: Sequence[GalleryItem]) -> None:
        m = self.meta
        for i, it in zip(ids.tolist(), items):
            m["ids"].append(int(i))
            m["image_ids"].append(it.image_id)
            m["views"].append(int(it.view))
            m["live_ids"].append(it.live_id)
            m["paths"].append(it.path)
            if it.title:
                m["titles"][it.image_id] = it.title
        m["next_id"] = int(max([m["next_id"] - 1, *ids.tolist()]) + 1) if len(ids) else m["next_id"]
        self._rebuild_lookup()

    # -- build / add / remove ----------------------------------------------------------------------------------
    @classmethod
    def build(cls, embedder, root: Path, items: Sequence[GalleryItem], index_type: str = "flat",
              problems: Problems | None = None, batch_size: int = 32, nlist: int | None = None,
              source: dict | None = None, show_progress: bool = True) -> "GalleryIndex":
        problems = problems or Problems()
        x, kept = embed_items(embedder, root, items, problems, batch_size, show_progress)
        if not kept:
            raise BadInput(root, f"none of the {len(items)} shop images could be read")
        gi = cls.from_vectors(x, kept, embedder_info(embedder), root, index_type, nlist=nlist, source=source,
                              skipped=problems.messages)
        gi.meta["skipped_total"] = problems.total  # the messages stop at Problems.max_messages; the count does not
        return gi

    @classmethod
    def from_vectors(cls, x: np.ndarray, items: Sequence[GalleryItem], embedder: dict, root: Path | None = None,
                     index_type: str = "flat", nlist: int | None = None, source: dict | None = None,
                     skipped: Sequence[str] = ()) -> "GalleryIndex":
        """An index over given (already embedded) vectors; used by ``build`` and by tests on raw vectors."""
        x = normalise(x)
        if len(x) != len(items):
            raise ValueError(f"{len(x)} vectors for {len(items)} items")
        d = x.shape[1]
        index, factory, actual = make_index(index_type, d, len(x), nlist)
        if not index.is_trained:
            index.train(x)
        params = {}
        ivf = _ivf(index)
        if ivf is not None:
            ivf.nprobe = params["nprobe"] = default_nprobe(actual, ivf.nlist)
        hnsw = _hnsw(index)
        if hnsw is not None:
            hnsw.hnsw.efSearch = params["efSearch"] = 128
        meta = {"format": FORMAT, "version": VERSION, "embedder": embedder, "dim": int(d),
                "metric": "inner_product", "normalized": True, "index_type": actual, "requested_type": index_type,
                "factory": factory, "search_params": params,
                "gallery_root": None if root is None else str(Path(root).resolve()),
                "source": source or {}, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "ids": [], "image_ids": [], "views": [], "live_ids": [], "paths": [], "titles": {},
                "next_id": 0, "skipped": list(skipped)}
        gi = cls(index, meta)
        ids = np.arange(len(x), dtype=np.int64)
        index.add_with_ids(x, ids)
        gi._append_items(ids, items)
        return gi

    def add(self, embedder, root: Path, items: Sequence[GalleryItem], problems: Problems | None = None,
            batch_size: int = 32, replace: bool = True, show_progress: bool = True) -> int:
        """Embed and append shop images. An image already indexed (same image id and view) is replaced."""
        self.check_embedder(embedder)
        problems = problems or Problems()
        if self.meta.get("gallery_root") and Path(root).resolve() != self.gallery_root():
            # paths are stored relative to one root: re-root the new ones when they live elsewhere
            items = [GalleryItem(it.image_id, it.view, it.live_id, it.title,
                                 os.path.relpath(Path(root).resolve() / it.path, self.gallery_root()))
                     for it in items]
            root = self.gallery_root()
        x, kept = embed_items(embedder, Path(root), items, problems, batch_size, show_progress)
        skipped = list(self.meta.get("skipped", []))
        self.meta["skipped_total"] = self.meta.get("skipped_total", len(skipped)) + problems.total
        self.meta["skipped"] = skipped + problems.messages
        if not kept:
            return 0
        return self.add_vectors(x, kept, replace=replace)

    def add_vectors(self, x: np.ndarray, items: Sequence[GalleryItem], replace: bool = True) -> int:
        self._writable()
        x = normalise(x)
        if x.shape[1] != self.dim:
            raise BadInput(self.path, f"vectors of size {x.shape[1]} do not fit this index (size {self.dim})")
        if replace:
            old = {it.key: i for i, it in self.items.items()}
            dup = [old[it.key] for it in items if it.key in old]
            if dup:
                self._remove_ids(np.asarray(dup, dtype=np.int64))
        start = int(self.meta["next_id"])
        ids = np.arange(start, start + len(x), dtype=np.int64)
        self.index.add_with_ids(x, ids)
        self._append_items(ids, items)
        self._gpu_index = None
        return len(x)

    def remove(self, keys: Iterable[str]) -> tuple[int, list[str]]:
        """Drop shop images by image id (all views) or ``<image_id>-<view>``; returns (removed, unknown keys)."""
        by_image: dict[str, list[int]] = {}
        by_key: dict[str, int] = {}
        for i, it in self.items.items():
            by_image.setdefault(it.image_id, []).append(i)
            by_key[it.key] = i
        drop, unknown = [], []
        for k in keys:
            if k in by_image:
                drop.extend(by_image[k])
            elif k in by_key:
                drop.append(by_key[k])
            else:
                unknown.append(k)
        drop = sorted(set(drop))
        if drop:
            self._remove_ids(np.asarray(drop, dtype=np.int64))
        return len(drop), unknown

    def _remove_ids(self, ids: np.ndarray) -> None:
        faiss = _faiss()
        self._writable()
        if _hnsw(self.index) is not None:
            # HNSW graphs cannot delete: rebuild from the stored (exact) vectors, keeping ids
            keep = np.asarray([i for i in self.meta["ids"] if i not in set(ids.tolist())], dtype=np.int64)
            x = np.stack([self.index.reconstruct(int(i)) for i in keep]) if len(keep) else \
                np.zeros((0, self.dim), np.float32)
            logger.info("HNSW cannot remove vectors in place: rebuilt it from %d stored vectors", len(keep))
            index = faiss.index_factory(self.dim, self.meta["factory"], faiss.METRIC_INNER_PRODUCT)
            _hnsw(index).hnsw.efSearch = self.meta["search_params"].get("efSearch", 128)
            if len(keep):
                index.add_with_ids(np.ascontiguousarray(x, dtype=np.float32), keep)
            self.index = index
        else:
            self.index.remove_ids(ids)
        drop = set(ids.tolist())
        m = self.meta
        rows = [r for r in zip(*(m[c] for c in ROW_COLUMNS)) if r[0] not in drop]
        for c, col in zip(ROW_COLUMNS, zip(*rows) if rows else [()] * len(ROW_COLUMNS)):
            m[c] = list(col)
        live_images = set(m["image_ids"])
        m["titles"] = {k: v for k, v in m["titles"].items() if k in live_images}
        self._rebuild_lookup()
        self._gpu_index = None

    def report_skipped(self, strict: bool = False) -> None:
        """Warn about (or, ``strict``, refuse) an index that was built without some unreadable shop images."""
        skipped = self.meta.get("skipped", [])
        report_skipped(skipped, self.meta.get("skipped_total", len(skipped)), strict)

    # -- embedder check ----------------------------------------------------------------------------------------
    def check_embedder(self, embedder) -> None:
        """Refuse a query embedder that is not the one the index was built with (vectors would be meaningless)."""
        mine = self.meta["embedder"]
        theirs = embedder_info(embedder)
        if not same_embedder(mine, theirs):
            raise BadInput(self.path, (
                f"index was built with embedder {mine.get('name')} [{mine['fingerprint']}] but the query "
                f"embedder is {theirs.get('name')} [{theirs['fingerprint']}]; rebuild it with "
                f"python pipeline/index.py --gallery DIR --out INDEX --weights {theirs.get('weights') or 'W'}"))

    # -- search ------------------------------------------------------------------------------------------------
    def _search_index(self):
        faiss = _faiss()
        if faiss.get_num_gpus() > 0 and _hnsw(self.index) is None:  # GPU faiss has no HNSW
            if self._gpu_index is None:
                self._gpu_index = faiss.index_cpu_to_all_gpus(self.index)
            return self._gpu_index
        return self.index

    def search(self, queries: np.ndarray, k: int = 5, live_id: str | None = None) -> list[list[Match]]:
        """Top-k products (distinct image ids, best view) per query; ``live_id`` ranks in that live's gallery."""
        faiss = _faiss()
        q = normalise(queries)
        if q.shape[1] != self.dim:
            raise BadInput(self.path, f"query vectors of size {q.shape[1]} do not fit this index (size {self.dim})")
        pool = self._by_live.get(live_id) if live_id is not None else None
        if live_id is not None and pool is None:
            return [[] for _ in q]
        n_eligible = self.ntotal if pool is None else len(pool)
        kk = int(min(n_eligible, k * self._max_views))
        if kk <= 0:
            return [[] for _ in q]
        if pool is None:
            index = self._search_index()
            scores, ids = index.search(q, kk)
        else:
            # restricted search runs on the CPU index (selectors are a CPU feature for most index types)
            sel = faiss.IDSelectorBatch(pool)
            if _ivf(self.index) is not None:
                params = faiss.SearchParametersIVF(sel=sel, nprobe=_ivf(self.index).nprobe)
            elif _hnsw(self.index) is not None:
                params = faiss.SearchParametersHNSW(sel=sel, efSearch=max(kk, _hnsw(self.index).hnsw.efSearch))
            else:
                params = faiss.SearchParameters(sel=sel)
            scores, ids = self.index.search(q, kk, params=params)
        root = self.gallery_root()
        out = []
        for srow, irow in zip(scores, ids):
            seen, hits = set(), []
            for s, i in zip(srow.tolist(), irow.tolist()):
                if i < 0 or i not in self.items:
                    continue
                it = self.items[i]
                if it.image_id in seen:
                    continue
                seen.add(it.image_id)
                hits.append(Match(it.image_id, float(s), it.title, it.live_id, it.view,
                                  str(root / it.path) if root is not None else it.path, int(i)))
                if len(hits) == k:
                    break
            out.append(hits)
        return out

    def vectors(self, ids: Sequence[int] | None = None) -> np.ndarray:
        """Stored vectors (exact for flat/HNSW, decoded for IVF-PQ), e.g. for set-to-image scoring."""
        ids = self.meta["ids"] if ids is None else ids
        if _ivf(self.index) is not None:
            ivf = _ivf(self.index)
            ivf.make_direct_map()
        return np.stack([self.index.reconstruct(int(i)) for i in ids]) if len(ids) else \
            np.zeros((0, self.dim), np.float32)

    # -- persistence -------------------------------------------------------------------------------------------
    def save(self, path, relative_root: bool = True) -> Path:
        """Write ``path/`` = {index-<token>.faiss, meta.json}; ``meta.json`` names its index file and is replaced
        in one atomic rename, so a reader or a kill sees the old pair or the new pair, never neither.

        Only our files are touched: ``path`` must be new, empty or one of our index folders (``check_out``), the
        index file the new meta no longer names and our stale temp files are removed, nothing else.
        ``relative_root``: store the gallery folder relative to the index folder (the pair can move together);
        a cache far from the gallery stores it absolute."""
        faiss = _faiss()
        path = Path(path)
        with index_lock(path):
            name = f"index-{secrets.token_hex(8)}.faiss"
            try:
                with atomic_path(path / name) as p:
                    faiss.write_index(self.index, str(p))
                meta = dict(self.meta)
                root = meta.get("gallery_root")
                if relative_root and root is not None and Path(root).is_absolute():
                    # relative to the index folder, so a repo-local cache or a copied folder keeps working
                    meta["gallery_root"] = os.path.relpath(root, path.resolve())
                meta.update(index_file=name, index_sha256=sha256_file(path / name), ntotal=self.ntotal,
                            rows_sha256=rows_sha256(meta))
                write_json(path / META_FILE, meta, indent=1)  # the switch
            except BaseException:
                (path / name).unlink(missing_ok=True)
                raise
            _remove_stale(path, keep=name)
        self.path = path
        self.meta.update(index_file=name, ntotal=self.ntotal)
        return path

    @classmethod
    def load(cls, path, embedder=None, _retry: bool = True) -> "GalleryIndex":
        """Read an index folder (or its meta.json / index.faiss); checks format, integrity and the embedder."""
        faiss = _faiss()
        path = Path(path)
        if path.is_file() and path.name in (META_FILE, INDEX_FILE):
            path = path.parent
        if not path.exists():
            raise BadInput(path, "index not found (build one with python pipeline/index.py --gallery DIR --out INDEX)")
        if not path.is_dir() or not (path / META_FILE).is_file():
            raise BadInput(path, f"not a gallery index folder (expected {META_FILE} and {INDEX_FILE} inside)")
        meta = read_json(path / META_FILE, expect=dict)
        if meta.get("format") != FORMAT:
            raise BadInput(path / META_FILE, f"not a gallery index meta file (format is not {FORMAT!r})")
        missing = [k for k in ("embedder", "dim", "ids", "image_ids", "views", "live_ids", "paths", "titles",
                               "factory", "index_type", "index_sha256", "rows_sha256") if k not in meta]
        if missing:
            raise BadInput(path / META_FILE, f"incomplete index meta (missing {', '.join(missing)})")
        lengths = {len(meta[c]) for c in ROW_COLUMNS}
        if len(lengths) != 1 or rows_sha256(meta) != meta["rows_sha256"]:
            raise BadInput(path / META_FILE, f"{'/'.join(ROW_COLUMNS)} do not match the index they were written "
                                             "with (edited or damaged meta.json; rebuild the index)")
        ipath = path / check_safe_name(str(meta.get("index_file", INDEX_FILE)), "index file name", path / META_FILE)
        if not ipath.is_file():
            if _retry and read_json(path / META_FILE, expect=dict).get("index_file") != meta.get("index_file"):
                return cls.load(path, embedder, _retry=False)  # a writer switched to a new pair meanwhile
            raise BadInput(ipath, "index file missing next to meta.json")
        if sha256_file(ipath) != meta["index_sha256"]:
            raise BadInput(ipath, "index file does not match its meta.json (sha256 differs; rebuild the index)")
        try:
            # memory-mapped: a process maps the catalogue's codes instead of copying them; ``_writable`` reads a
            # private copy before the first add or remove
            # (the two flags do not combine: IVF lists map through a file reader, flat codes through a mapped one)
            ivf = str(meta["factory"]).startswith("IVF")
            index = faiss.read_index(str(ipath), faiss.IO_FLAG_MMAP if ivf else faiss.IO_FLAG_MMAP_IFC)
        except RuntimeError as e:
            raise BadInput(ipath, f"unreadable faiss index ({str(e).splitlines()[0][:120]})") from None
        if index.ntotal != len(meta["ids"]) or index.d != meta["dim"]:
            raise BadInput(ipath, f"index holds {index.ntotal} vectors of size {index.d}; meta.json says "
                                  f"{len(meta['ids'])} of size {meta['dim']}")
        _copy_search_params(meta, index)
        gi = cls(index, meta, path)
        gi._mapped = True
        if embedder is not None:
            gi.check_embedder(embedder)
        return gi

    def _writable(self) -> None:
        if self._mapped:
            faiss = _faiss()
            ivf = _ivf(self.index)
            if ivf is not None:  # mapped IVF lists cannot be serialised or cloned: copy them into memory
                lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
                ivf.invlists.copy_subset_to(lists, faiss.InvertedLists.SUBSET_TYPE_ID_MOD, 1, 0)  # every id
                ivf.replace_invlists(lists, True)
                lists.this.disown()  # the index owns them now, not Python's garbage collector
            else:
                self.index = faiss.deserialize_index(faiss.serialize_index(self.index))
                _copy_search_params(self.meta, self.index)
            self._mapped, self._gpu_index = False, None

    def summary(self) -> dict:
        return {"index": str(self.path) if self.path else None, "index_type": self.index_type,
                "factory": self.meta["factory"], "dim": self.dim, "ntotal": self.ntotal,
                "products": len(self.image_ids), "lives": len(self.live_ids),
                "embedder": self.meta["embedder"], "skipped": len(self.meta.get("skipped", []))}


def is_index_folder(path: Path) -> bool:
    """Whether ``path`` is one of our index folders: its ``meta.json`` is a JSON object of our format."""
    try:
        return read_json(Path(path) / META_FILE, expect=dict).get("format") == FORMAT
    except BadInput:
        return False


def check_out(path) -> Path:
    """``path`` as an index folder we may write: new, empty, or ours. Anything else exits 2 before any work, so an
    index is never written over a folder of the user's."""
    path = Path(path)
    if not path.exists():
        return path
    if not path.is_dir():
        raise BadInput(path, "exists and is not a folder (choose another --out for the index)")
    if any(p.name != LOCK_FILE for p in path.iterdir()) and not is_index_folder(path):
        raise BadInput(path, f"is a non-empty folder that is not a gallery index (no {META_FILE} of format "
                             f"{FORMAT!r}); choose another --out")
    return path


@contextlib.contextmanager
def index_lock(path):
    """One writer at a time for an index folder (``path/.lock``; a second writer waits and says for whom).
    Re-entrant, so a load-modify-save can hold it around ``save``. ``path`` is checked first."""
    path = check_out(path)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    with exclusive(path / LOCK_FILE, f"the index {path}"):
        try:
            yield
        finally:
            if created and not (path / META_FILE).exists():  # a first build that failed leaves no folder
                (path / LOCK_FILE).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    path.rmdir()


_STALE = re.compile(r"^(index-[0-9a-f]{16}\.faiss|\.(index(-[0-9a-f]{16})?\.faiss|meta\.json)\..+\.(tmp|faiss))$")


def _remove_stale(path: Path, keep: str) -> None:
    """Our index files that ``meta.json`` no longer names and our temp files a killed writer left (the caller
    holds the lock, so no writer is using them); also the folders older versions swapped through."""
    for p in path.iterdir():
        if p.name != keep and p.is_file() and _ours(p):
            p.unlink(missing_ok=True)
    for p in path.parent.glob(f".{path.name}.*"):
        if p.is_dir() and (p.name.endswith(".tmp") or p.name.startswith(f".{path.name}.old-")) and _swap_leftover(p):
            shutil.rmtree(p, ignore_errors=True)


FAISS_MAGIC = (b"IxM2", b"IwPQ")  # the first bytes faiss writes for IndexIDMap2 (flat, HNSW) and IndexIVFPQ


def _ours(file: Path) -> bool:
    """Whether a file in or beside an index is one we wrote: a hidden temp file of ours, or an index file by name
    and content (whole or cut short by a kill), not a user's file that happens to carry an index's name."""
    if not (_STALE.match(file.name) or file.name == INDEX_FILE):
        return False
    if file.name.startswith("."):
        return True
    with open(file, "rb") as f:
        head = f.read(4)
    return not head or any(magic.startswith(head) for magic in FAISS_MAGIC)


def _swap_leftover(folder: Path) -> bool:
    """Whether a folder beside an index is what an older version's swap left: one of our index folders, or holding
    nothing but our index files. A user's folder that happens to have such a name is kept."""
    files = list(folder.iterdir())
    return is_index_folder(folder) or all(f.is_file() and (f.name == LOCK_FILE or _ours(f)) for f in files)


def rows_sha256(meta: dict) -> str:
    """sha256 over the per-vector lists: ties each faiss id to its product, so a shifted or edited list in
    meta.json is refused instead of giving wrong answers (``index_sha256`` only covers the faiss file)."""
    rows = json.dumps([meta[c] for c in ROW_COLUMNS], separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(rows.encode()).hexdigest()


def report_skipped(messages: Sequence[str], total: int, strict: bool = False) -> None:
    """The warning of an index build that skipped unreadable shop images; under ``strict`` the first one is fatal,
    the same for a cached index as for a fresh build."""
    if total and strict:
        raise BadInput(None, messages[0] if messages else f"{total} unreadable shop image(s)")
    if total:
        logger.warning("skipped %d unreadable shop image(s): %s", total, "; ".join(messages[:5]))


def cache_dir() -> Path:
    """Where on-the-fly gallery indexes are cached: ``$LPR_CACHE_DIR/indexes`` or ``~/.cache/lpr/indexes``."""
    from lpr4m.io import cache_root
    return cache_root() / "indexes"


def cached_index(gallery_dir, embedder, index_type: str = "auto", strict: bool = False,
                 show_progress: bool = True) -> GalleryIndex:
    """The index of a gallery folder, built on first use and cached by (gallery content, embedder, type)."""
    root, items = collect(gallery_dir)
    h = hashlib.sha256("|".join([content_hash(root, items), embedder_info(embedder)["fingerprint"],
                                 index_type, str(VERSION)]).encode()).hexdigest()[:20]
    path = cache_dir() / h
    if (path / META_FILE).is_file():
        try:
            gi = GalleryIndex.load(path, embedder)
        except BadInput as err:
            logger.warning("cached index unusable (%s): rebuilding", err)
        else:
            logger.info("gallery index from cache %s", path)
            gi.report_skipped(strict)
            return gi
    logger.info("building the gallery index of %s (%d shop images); cached at %s", root, len(items), path)
    problems = Problems(strict=strict)
    gi = GalleryIndex.build(embedder, root, items, index_type, problems, show_progress=show_progress,
                            source={"gallery": str(root), "cache_key": h})
    gi.report_skipped()
    try:
        gi.save(path, relative_root=False)
    except OSError as e:  # a read-only home must not stop recognition
        logger.warning("could not cache the index at %s (%s)", path, e)
    return gi


def _copy_search_params(meta: dict, index) -> None:
    params = meta.get("search_params", {})
    if _ivf(index) is not None and "nprobe" in params:
        _ivf(index).nprobe = int(params["nprobe"])
    if _hnsw(index) is not None and "efSearch" in params:
        _hnsw(index).hnsw.efSearch = int(params["efSearch"])


def _ivf(index):
    faiss = _faiss()
    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, AttributeError):
        return None


def _hnsw(index):
    faiss = _faiss()
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    inner = faiss.downcast_index(inner)
    return inner if isinstance(inner, faiss.IndexHNSW) else None


__all__ = ["GalleryIndex", "GalleryItem", "Match", "collect", "collect_folder", "collect_lpr4m", "content_hash",
           "embed_items", "embedder_info", "make_index", "normalise", "same_embedder", "cached_index"]
