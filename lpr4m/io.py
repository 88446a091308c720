"""Atomic file output (temp file + rename), JSON helpers that fail with a BadInput (not a traceback), and the one
advisory lock for writers that must not overlap."""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from lpr4m.errors import BadInput

logger = logging.getLogger(__name__)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: os.umask() briefly changes process state, not safe to call from threads


def _make_temp(path: Path, suffix: str) -> tuple[int, str]:
    try:
        return tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as err:  # the user's path in the one-line error, not our temp name beside it
        raise OSError(err.errno, err.strerror, str(path)) from None


def _commit(tmp: str, path: Path) -> None:
    """Rename a finished temp file over ``path`` with the mode a plain open() would give (0666 minus the umask):
    mkstemp makes it 0600, and so do writers that make their own file (safetensors)."""
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, path)


def check_output_file(path: str | os.PathLike) -> Path:
    """``path`` as a file we may create or replace: not a folder, and no file where a parent folder must be."""
    path = Path(path)
    if path.is_dir():
        raise BadInput(path, "is a folder; expected a file name for the output")
    if path.exists() and not path.is_file():  # a device or a pipe: renaming a temp file over it would replace it
        raise BadInput(path, "is not a regular file (a device or a pipe); expected a file name for the output")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise BadInput(path, f"cannot create it: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise BadInput(path, f"cannot create it: no permission to write in {parent}")
            break
    return path


def _output_path(path: str | os.PathLike) -> Path:
    path = check_output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kw) -> Iterator[Any]:
    """Open a temp file next to ``path``; on success rename it over ``path``, on error remove it.

    A reader never sees a half-written file and an interrupted job leaves the old file intact.
    """
    path = _output_path(path)
    fd, tmp = _make_temp(path, ".tmp")
    if "b" not in mode:
        open_kw.setdefault("encoding", "utf-8")
    try:
        with os.fdopen(fd, mode, **open_kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _commit(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_stale_temps(path: str | os.PathLike) -> int:
    """Remove the temp files a killed ``atomic_write`` / ``atomic_path`` of ``path`` left beside it (only call it
    where no other writer of ``path`` can be running, e.g. when resuming a run); returns how many."""
    path = Path(path)
    n = 0
    for suffix in {".tmp", path.suffix or ".tmp"}:
        for p in path.parent.glob(f".{glob.escape(path.name)}.*{suffix}"):
            if p.is_file():
                p.unlink(missing_ok=True)
                n += 1
    return n


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path for libraries that write files themselves (faiss, onnx, torch.save)."""
    path = _output_path(path)
    fd, tmp = _make_temp(path, path.suffix or ".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        _commit(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def new_folder(out: str | os.PathLike, what: str) -> Iterator[Path]:
    """Build a new dataset folder aside (``.NAME.partial`` beside ``out``) and rename it into place on success, so an
    interrupted or failed job leaves no half dataset. ``out`` must be new or an empty folder."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInput(out, f"already exists and is not an empty folder; {what} writes a new dataset "
                            f"(pick a new path)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


_HELD: dict[str, list] = {}  # lock file -> [open file, depth]: re-entrant within a process


@contextlib.contextmanager
def exclusive(lock_file: str | os.PathLike, what: str, wait: bool = True) -> Iterator[None]:
    """Hold an advisory lock (``fcntl.flock``) on ``lock_file`` (created if needed) for one writer at a time. A
    second process waits, saying for whom, or with ``wait=False`` gets a BadInput naming the holder's pid. The
    lock goes with the process, so a killed holder never leaves it stuck."""
    import fcntl
    lock_file = Path(lock_file)
    key = str(lock_file.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    f = open(lock_file, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            if not wait:
                raise BadInput(lock_file.parent, f"{what} is in use by {holder}; wait for it to finish") from None
            logger.warning("waiting for %s: another writer holds it (%s)", what, holder)
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        _HELD[key] = [f, 1]
        try:
            yield
        finally:
            del _HELD[key]
    finally:
        f.close()  # closing releases the lock


def cache_root() -> Path:
    """Where the project keeps generated state (dataset views, ultralytics settings, gallery indexes, TensorRT
    engines of ONNX Runtime): ``$LPR_CACHE_DIR`` or ``~/.cache/lpr``."""
    return Path(os.environ.get("LPR_CACHE_DIR") or Path.home() / ".cache" / "lpr").expanduser()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (weights, indexes): what configs record and loaders verify."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.write("\n")


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


def read_json(path: str | os.PathLike, expect: type | None = None) -> Any:
    """Read a JSON file; truncated/invalid JSON, a key given twice in one object (which ``json`` would silently
    resolve to the last) or the wrong top-level type raises BadInput naming the file. A UTF-8 BOM is allowed, as
    in every text reader of the project."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except FileNotFoundError:
        raise BadInput(path, "file not found") from None
    except json.JSONDecodeError as e:
        raise BadInput(path, f"invalid JSON ({e.msg} at column {e.colno})", line=e.lineno) from None
    except UnicodeDecodeError:
        raise BadInput(path, "not UTF-8 text (expected a JSON file)") from None
    except _DuplicateKey as e:
        key = json.dumps(e.args[0], ensure_ascii=False)
        second = text.find(key, text.find(key) + 1)
        raise BadInput(path, f"key {key} appears twice (expected each key once)",
                       line=text.count("\n", 0, second) + 1 if second >= 0 else None) from None
    except (RecursionError, ValueError) as e:  # nested thousands deep; an integer of thousands of digits
        raise BadInput(path, f"unreadable JSON ({type(e).__name__}: nested too deep or a number too long)") from None
    if expect is not None and not isinstance(obj, expect):
        raise BadInput(path, f"expected a JSON {expect.__name__}, got {type(obj).__name__}")
    return obj
