"""Export the embedder: ``python retriever/export.py --weights W --format onnx|engine``."""
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: import the package, not sibling modules, from the repo root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from lpr4m.cli import run_main  # noqa: E402
from retriever.exporting import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_main(main))
