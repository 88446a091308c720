"""``python -m lpr4m {synth,stats,download,regroup,split,composite} ...``"""
from __future__ import annotations

import sys
from importlib import import_module

from lpr4m.cli import run_main

COMMANDS = {
    "synth": ("lpr4m.synth", "main", "write a synthetic LPR4M-mini"),
    "stats": ("lpr4m.stats", "main", "count and validate a dataset"),
    "download": ("lpr4m.download", "download_main", "img2dataset download of an LPR4M URL list"),
    "regroup": ("lpr4m.download", "regroup_main", "move downloaded shards into the LPR4M layout"),
    "split": ("lpr4m.split", "main", "an open-set split by product (links into the root)"),
    "composite": ("lpr4m.composite", "main", "detection data: shop images held up in real frames"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<9} {help_}" for name, (_, _, help_) in COMMANDS.items()]
        print("usage: python -m lpr4m COMMAND [--help]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module, func, _ = COMMANDS[argv[0]]
    return run_main(getattr(import_module(module), func), argv[1:])


if __name__ == "__main__":
    sys.exit(main())
