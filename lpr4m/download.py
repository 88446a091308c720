"""LPR4M download with img2dataset, and regroup of its shards into the LPR4M layout.

``download`` runs img2dataset with the dataset's own settings (txt list -> files, 256 px, keep_ratio) in
incremental mode, so re-running the same command only fetches shards that never finished. img2dataset keeps the
ids only in each sample's URL; ``regroup`` reads them back (``ids.target_from_url``) and places every image at
its layout path, by hard link when it can (no extra disk), never overwriting a different file.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Iterator, NamedTuple
from urllib.parse import urlsplit

from lpr4m.cli import (Parser, emit_json, nonnegative_int, output_file, output_folder, positive_float, positive_int,
                       progress, setup_logging)
from lpr4m.errors import BadInput, Problems
from lpr4m.ids import target_from_url
from lpr4m.io import atomic_write
from lpr4m.layout import Dataset

logger = logging.getLogger(__name__)

URL_RECORD = "_lpr4m_urls.txt"  # the cleaned list img2dataset reads; not .json: img2dataset globs OUT/*.json
SHARD_NAME_RE = re.compile(r"^\d+$")
STATS_RE = re.compile(r"^(\d+)_stats\.json$")
RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
DISTRIBUTOR_PACKAGES = {"pyspark": "pyspark", "ray": "ray"}
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
MAX_LISTED = 100  # failures listed per shard in the JSON report (all are counted)


# ---------------------------------------------------------------------------------------------------- URL list
def read_url_list(path: str | os.PathLike, problems: Problems) -> tuple[list[str], dict]:
    """The http(s) URLs of a txt list, in order, without duplicates; bad lines go to ``problems`` with file:line.

    Commas and double quotes are percent-encoded because img2dataset parses the txt list as one-column CSV.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInput(path, "URL list not found (expected a text file with one http(s) URL per line)")
    counts = Counter()
    urls: list[str] = []
    seen: set[str] = set()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            counts["lines"] += 1
            try:
                text = raw.decode("utf-8").strip().lstrip("\ufeff")
            except UnicodeDecodeError:
                problems.add(BadInput(path, "not UTF-8 text", lineno), "not_utf8")
                continue
            if not text:
                counts["blank"] += 1
                continue
            if text.startswith("#"):
                counts["comment"] += 1
                continue
            if not _is_http_url(text):
                problems.add(BadInput(path, f"not an http(s) URL: {text[:120]!r}", lineno), "not_http_url")
                continue
            if "," in text or '"' in text:
                text = text.replace('"', "%22").replace(",", "%2C")
                counts["percent_encoded"] += 1
            if text in seen:
                counts["duplicate"] += 1
                continue
            seen.add(text)
            urls.append(text)
    report = {"path": str(path), "lines": counts["lines"], "urls": len(urls),
              "blank": counts["blank"], "comment": counts["comment"], "duplicate": counts["duplicate"],
              "percent_encoded": counts["percent_encoded"], "skipped": problems.as_dict()}
    if not urls:
        raise BadInput(path, f"no http(s) URLs in {counts['lines']} lines (expected one URL per line)")
    return urls, report


def _is_http_url(text: str) -> bool:
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in text):
        return False
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018  (raises ValueError on a malformed port)
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)


# ---------------------------------------------------------------------------------------------------- download
def _check_output_folder(out: Path) -> None:
    """img2dataset reads every OUT/*.json as ``<shard>_stats.json`` (and crashes on others): refuse early."""
    if out.exists() and not out.is_dir():
        raise BadInput(out, "output exists and is not a folder")
    if out.is_dir():
        for p in sorted(out.glob("*.json")):
            if not STATS_RE.match(p.name):
                raise BadInput(p, "output folder holds a .json that is not an img2dataset <shard>_stats.json; "
                                  "use a fresh folder for the shards")


def _check_distributor(name: str) -> None:
    package = DISTRIBUTOR_PACKAGES.get(name)
    if package and importlib.util.find_spec(package) is None:
        raise BadInput(None, f"--distributor {name} needs the '{package}' package: pip install {package}")


def _import_img2dataset():
    """Import img2dataset with its side channels off (albumentations' update check, wandb)."""
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
    os.environ["WANDB_MODE"] = "disabled"
    os.environ["WANDB_DISABLED"] = "true"
    os.environ["WANDB_SILENT"] = "true"
    import img2dataset  # noqa: PLC0415  (slow and chatty: only when downloading)
    return img2dataset


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """img2dataset and its worker processes print progress to fd 1; keep stdout for our JSON result."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved, 1)
        os.close(saved)


def shard_stats(out: Path) -> dict[int, dict]:
    """``{shard_id: stats}`` from img2dataset's ``<shard>_stats.json`` files (a shard is done when it has one)."""
    stats = {}
    for p in sorted(out.glob("*_stats.json")):
        m = STATS_RE.match(p.name)
        if not m:
            continue
        try:
            with open(p, encoding="utf-8") as f:
                stats[int(m[1])] = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            logger.warning("unreadable stats file %s: %s", p, e)
    return stats


def summarize_stats(stats: dict[int, dict]) -> dict:
    totals = Counter()
    errors = Counter()
    for s in stats.values():
        for k in ("count", "successes", "failed_to_download", "failed_to_resize"):
            totals[k] += int(s.get(k, 0) or 0)
        for msg, n in (s.get("status_dict") or {}).items():
            if msg != "success":
                errors[msg] += int(n)
    return {"shards": len(stats), "samples": totals["count"], "successes": totals["successes"],
            "failures": {"failed_to_download": totals["failed_to_download"],
                         "failed_to_resize": totals["failed_to_resize"]},
            "errors": dict(errors.most_common(50))}


def build_download_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m lpr4m download", description=__doc__.split("\n\n")[0])
    p.add_argument("url_list", help="text file, one http(s) URL per line (LPR4M's *_url.txt lists)")
    p.add_argument("out", type=output_folder,
                   help="img2dataset output folder (shards); re-running resumes unfinished shards")
    p.add_argument("--processes", type=positive_int, default=max(1, min(16, os.cpu_count() or 1)))
    p.add_argument("--threads", type=positive_int, default=32, help="download threads per process")
    p.add_argument("--distributor", choices=("multiprocessing", "pyspark", "ray"), default="multiprocessing")
    p.add_argument("--image-size", type=positive_int, default=256)
    p.add_argument("--resize-mode", choices=RESIZE_MODES, default="keep_ratio",
                   help="img2dataset semantics: keep_ratio makes the SHORT side image-size, keep_ratio_largest "
                        "the long side")
    p.add_argument("--resize-only-if-bigger", action="store_true", help="never upscale small images")
    p.add_argument("--encode-quality", type=int, choices=range(1, 101), metavar="1..100", default=95)
    p.add_argument("--samples-per-shard", type=positive_int, default=10000)
    p.add_argument("--retries", type=nonnegative_int, default=0, help="retries per URL")
    p.add_argument("--timeout", type=positive_float, default=10, help="seconds per request")
    p.add_argument("--max-shard-retry", type=nonnegative_int, default=1)
    p.add_argument("--strict", action="store_true", help="the first bad URL-list line is fatal")
    p.add_argument("--out", type=output_file, dest="out_json", metavar="FILE",
                   help="write the JSON summary here instead of stdout")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def download(url_list, out, *, processes=1, threads=32, distributor="multiprocessing", image_size=256,
             resize_mode="keep_ratio", resize_only_if_bigger=False, encode_quality=95, samples_per_shard=10000,
             retries=0, timeout=10.0, max_shard_retry=1, strict=False) -> dict:
    """Validate ``url_list``, run img2dataset into ``out`` (incremental) and summarise its stats files."""
    for name, value, low in (("processes", processes, 1), ("threads", threads, 1), ("image_size", image_size, 1),
                             ("samples_per_shard", samples_per_shard, 1), ("retries", retries, 0),
                             ("max_shard_retry", max_shard_retry, 0)):
        if value < low:
            raise BadInput(None, f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    if timeout <= 0:
        raise BadInput(None, f"--timeout must be > 0, got {timeout}")
    if resize_mode not in RESIZE_MODES:
        raise BadInput(None, f"--resize-mode must be one of {', '.join(RESIZE_MODES)}")
    out = Path(out)
    _check_distributor(distributor)
    problems = Problems(strict=strict)
    urls, list_report = read_url_list(url_list, problems)
    _check_output_folder(out)

    cleaned = "".join(u + "\n" for u in urls).encode("utf-8")
    digest = hashlib.sha256(cleaned).hexdigest()
    before = shard_stats(out) if out.is_dir() else {}
    record = out / URL_RECORD
    if before and record.is_file() and hashlib.sha256(record.read_bytes()).hexdigest() != digest:
        raise BadInput(out, f"holds shards of a different URL list ({record.name}); incremental mode would skip "
                            "the wrong URLs: use a fresh output folder")

    # recorded before the run, so an interrupted run still guards its folder against a different list
    if not (record.is_file() and hashlib.sha256(record.read_bytes()).hexdigest() == digest):
        with atomic_write(record, "wb") as f:
            f.write(cleaned)

    n_shards = -(-len(urls) // samples_per_shard)
    t0 = time.perf_counter()
    i2d = _import_img2dataset()
    logger.info("downloading %d URLs in %d shards to %s (%d already done)", len(urls), n_shards, out, len(before))
    with _stdout_to_stderr():
        i2d.download(
            url_list=str(record), output_folder=str(out), input_format="txt", output_format="files",
            image_size=image_size, resize_mode=resize_mode, resize_only_if_bigger=resize_only_if_bigger,
            encode_quality=encode_quality, encode_format="jpg", processes_count=processes, thread_count=threads,
            distributor=distributor, number_sample_per_shard=samples_per_shard, retries=retries, timeout=timeout,
            max_shard_retry=max_shard_retry, incremental_mode="incremental", enable_wandb=False,
            extract_exif=False, compute_hash="sha256",
        )
    seconds = time.perf_counter() - t0

    after = shard_stats(out)
    new = {k: v for k, v in after.items() if k not in before}
    unfinished = sorted(set(range(n_shards)) - set(after))
    if unfinished:
        logger.warning("%d shards did not finish (%s...): run the same command again to retry them",
                       len(unfinished), unfinished[:10])
    return {"output": str(out), "url_list": list_report, "expected_shards": n_shards,
            "unfinished_shards": unfinished, "total": summarize_stats(after), "this_run": summarize_stats(new),
            "skipped_done_shards": len(before), "seconds": round(seconds, 3),
            "settings": {"input_format": "txt", "output_format": "files", "image_size": image_size,
                         "resize_mode": resize_mode, "resize_only_if_bigger": resize_only_if_bigger,
                         "incremental_mode": "incremental", "processes": processes, "threads": threads,
                         "distributor": distributor, "samples_per_shard": samples_per_shard,
                         "retries": retries, "timeout": timeout}}


def download_main(argv=None) -> int:
    args = build_download_parser().parse_args(argv)
    setup_logging(args.verbose)
    result = download(args.url_list, args.out, processes=args.processes, threads=args.threads,
                      distributor=args.distributor, image_size=args.image_size, resize_mode=args.resize_mode,
                      resize_only_if_bigger=args.resize_only_if_bigger, encode_quality=args.encode_quality,
                      samples_per_shard=args.samples_per_shard, retries=args.retries, timeout=args.timeout,
                      max_shard_retry=args.max_shard_retry, strict=args.strict)
    emit_json(result, args.out_json)
    return 0


# ---------------------------------------------------------------------------------------------------- regroup
class Sample(NamedTuple):
    shard: str
    key: str
    url: str | None
    status: str | None
    error: str | None
    image: Path | None  # the downloaded file, None when absent


def find_shards(shards: Path) -> list[str]:
    """Shard names (``00000`` ...) that have a folder or a ``.parquet`` in img2dataset's files output."""
    if not shards.is_dir():
        raise BadInput(shards, "shards folder not found (expected img2dataset files output)")
    names = {p.name for p in shards.iterdir() if p.is_dir() and SHARD_NAME_RE.match(p.name)}
    names |= {p.stem for p in shards.glob("*.parquet") if SHARD_NAME_RE.match(p.stem)}
    if not names:
        raise BadInput(shards, "no img2dataset shards (expected 00000/ folders or 00000.parquet files)")
    return sorted(names)


def shard_samples(shards: Path, name: str, problems: Problems) -> Iterator[Sample]:
    """Every sample of one shard: the parquet lists all (failed ones too), the per-sample .json the saved ones."""
    meta: dict[str, dict] = {}
    parquet = shards / f"{name}.parquet"
    if parquet.is_file():
        try:
            import pyarrow.parquet as pq  # noqa: PLC0415
            table = pq.read_table(parquet)
            cols = [c for c in ("key", "url", "status", "error_message") if c in table.column_names]
            if "key" not in cols:
                raise ValueError("no 'key' column")
            for row in table.select(cols).to_pylist():
                if row.get("key"):
                    meta[str(row["key"])] = row
        except Exception as e:  # noqa: BLE001  (pyarrow raises many types on a truncated file)
            problems.add(BadInput(parquet, f"unreadable shard parquet ({e}); using the per-sample .json"),
                         "bad_parquet")
    folder = shards / name
    files: dict[str, Path] = {}
    if folder.is_dir():
        for p in folder.iterdir():
            suffix = p.suffix.lower()
            if suffix == ".json":
                try:
                    with open(p, encoding="utf-8") as f:
                        obj = json.load(f)
                    if not isinstance(obj, dict):
                        raise ValueError("not a JSON object")
                except (OSError, ValueError) as e:
                    problems.add(BadInput(p, f"unreadable sample .json ({e})"), "bad_json")
                    continue
                meta.setdefault(p.stem, {}).update({k: obj.get(k) for k in ("url", "status", "error_message")
                                                    if k in obj})
            elif suffix in IMAGE_EXTS and not p.name.startswith("."):
                files[p.stem] = p
    for key in sorted(set(meta) | set(files)):
        m = meta.get(key, {})
        yield Sample(name, key, m.get("url"), m.get("status"), m.get("error_message"), files.get(key))


def _same_content(a: Path, b: Path) -> bool:
    try:
        if os.path.samefile(a, b):
            return True
        if a.stat().st_size != b.stat().st_size:
            return False
        with open(a, "rb") as fa, open(b, "rb") as fb:
            while True:
                x, y = fa.read(1 << 20), fb.read(1 << 20)
                if x != y:
                    return False
                if not x:
                    return True
    except OSError:
        return False


def _publish(tmp: Path, dest: Path) -> bool:
    """Give ``tmp`` the name ``dest`` unless ``dest`` exists (link = atomic no-clobber); False if it existed."""
    try:
        os.link(tmp, dest)
    except FileExistsError:
        return False
    except OSError:  # no hard links on this filesystem: rename, after the existence check
        if dest.exists():
            return False
        os.replace(tmp, dest)
        return True
    os.unlink(tmp)
    return True


def _copy_into(src: Path, dest: Path) -> bool:
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        shutil.copyfile(src, tmp)
        return _publish(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


LINK_FALLBACK = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES)


def place(src: Path, dest: Path, mode: str) -> str:
    """Put ``src`` at ``dest``: returns placed / already (same content there) / conflict (different file there)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() or dest.is_symlink():
        if not _same_content(src, dest):
            return "conflict"
        if mode == "move":
            src.unlink()  # the data is at dest already (same bytes, or another name of the same file)
        return "already"
    if mode in ("link", "move"):
        try:
            os.link(src, dest)
        except FileExistsError:
            return "already" if _same_content(src, dest) else "conflict"
        except OSError as e:
            if e.errno not in LINK_FALLBACK:
                raise
            if not _copy_into(src, dest):
                return "already" if _same_content(src, dest) else "conflict"
        if mode == "move":
            src.unlink()
        return "placed"
    if not _copy_into(src, dest):
        return "already" if _same_content(src, dest) else "conflict"
    return "placed"


def regroup(shards, root, mode: str = "link", strict: bool = False) -> dict:
    """Place every downloaded sample of ``shards`` at its LPR4M path under ``root`` (see ids.target_from_url)."""
    if mode not in ("link", "copy", "move"):
        raise ValueError(f"mode must be link, copy or move, got {mode!r}")
    shards, root = Path(shards), Path(root)
    names = find_shards(shards)
    root.mkdir(parents=True, exist_ok=True)
    ds = Dataset(root)
    problems = Problems(strict=strict)
    totals = Counter()
    by_kind = Counter()
    per_shard = []
    t0 = time.perf_counter()
    bar = progress(desc="regroup", unit="img")
    try:
        for name in names:
            counts = Counter()
            failures: list[dict] = []

            def fail(kind: str, sample: Sample, message: str, problem: bool = True) -> None:
                counts[kind] += 1
                if len(failures) < MAX_LISTED:
                    failures.append({"kind": kind, "key": sample.key, "url": sample.url, "message": message})
                if problem:
                    problems.add(BadInput(shards / name, f"sample {sample.key}: {message}"), kind)

            for s in shard_samples(shards, name, problems):
                counts["samples"] += 1
                bar.update(1)
                if s.status not in (None, "success"):
                    # a failed download is a fact about the source, not bad input: counted, never fatal
                    fail(s.status, s, s.error or s.status, problem=False)
                    continue
                if not s.url:
                    fail("no_url", s, "no 'url' in the shard metadata")
                    continue
                try:
                    target = target_from_url(s.url)
                    dest = ds.path(*target.parts)
                except BadInput as e:
                    fail("unmapped_url", s, e.message)
                    continue
                if s.image is None or not s.image.is_file():
                    if dest.is_file():
                        counts["already"] += 1  # moved there by an earlier --move run
                        by_kind[target.kind] += 1
                    else:
                        fail("missing_file", s, "downloaded image file not found")
                    continue
                outcome = place(s.image, dest, mode)
                if outcome == "conflict":
                    fail("conflict", s, f"{target.relpath} already exists with different content (kept)")
                    continue
                counts[outcome] += 1
                by_kind[target.kind] += 1
            totals.update(counts)
            per_shard.append({"shard": name, **{k: counts[k] for k in sorted(counts)}, "failures": failures})
    finally:
        bar.close()
    return {"shards_folder": str(shards), "root": str(root), "mode": mode, "shards": len(names),
            "totals": {k: totals[k] for k in sorted(totals)}, "placed_by_kind": dict(sorted(by_kind.items())),
            "problems": problems.as_dict(), "per_shard": per_shard,
            "seconds": round(time.perf_counter() - t0, 3)}


def build_regroup_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m lpr4m regroup",
               description="place img2dataset 'files' shards into the LPR4M layout by URL id")
    p.add_argument("shards", help="img2dataset output folder (00000/ 00000.parquet ...)")
    p.add_argument("root", help="LPR4M root to fill (training_video/, query/, gallery/, training_image/)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--link", dest="mode", action="store_const", const="link",
                   help="hard link, copying when on another filesystem (default)")
    g.add_argument("--copy", dest="mode", action="store_const", const="copy")
    g.add_argument("--move", dest="mode", action="store_const", const="move")
    p.set_defaults(mode="link")
    p.add_argument("--strict", action="store_true",
                   help="first problem (unmapped URL, missing file, conflict) is fatal; failed downloads never are")
    p.add_argument("--out", type=output_file, help="write the JSON report here instead of stdout")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def regroup_main(argv=None) -> int:
    args = build_regroup_parser().parse_args(argv)
    setup_logging(args.verbose)
    emit_json(regroup(args.shards, args.root, args.mode, args.strict), args.out)
    return 0
