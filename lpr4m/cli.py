"""What every command shares: offline environment, logging, and "bad input -> one line, exit 2"."""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Callable, Sequence

from lpr4m.errors import BadInput

EXIT_BAD_INPUT = 2


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Call a CLI ``main``; a BadInput (or a missing file) becomes ``error: FILE:LINE: ...`` and exit 2."""
    try:
        return main(argv) or 0
    except BadInput as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def parse_ks(text: str) -> tuple[int, ...]:
    """argparse type for ``--ks 1,5,10``."""
    import argparse
    try:
        ks = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError("k values must be >= 1")
    return ks


def emit_json(result: Any, out: str | None = None) -> None:
    """The JSON result of a command: to ``--out FILE`` (atomically) or to stdout."""
    if out:
        from lpr4m.io import write_json
        write_json(out, result)
    else:
        json.dump(result, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
        sys.stdout.flush()


def progress(iterable=None, **kw):
    """tqdm that stays quiet when stderr is not a terminal (CI logs, pipes) unless LPR_PROGRESS=1."""
    from tqdm.auto import tqdm
    kw.setdefault("disable", not (sys.stderr.isatty() or os.environ.get("LPR_PROGRESS") == "1"))
    kw.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kw)
