"""Thin script: `python detector/pseudo_label.py --help` (logic in detector/pseudo_labels.py)."""
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: import from the repo, never shadow modules with detector/*.py
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from detector.pseudo_labels import main  # noqa: E402
from lpr4m.cli import run_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_main(main))
