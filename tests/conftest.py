"""Shared test fixtures: the real-data location, a synthesized LPR4M-mini, and ``--runslow``.

Kept light on purpose: no heavy imports at collection time (torch is capped through the OpenMP env vars it reads
on import, and again if a test module already imported it).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# several helpers share two cores: cap math-library threads before any test imports torch / numpy / cv2
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "2")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _cap_torch_threads() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() > 2:
        torch.set_num_threads(2)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    _cap_torch_threads()
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow test: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the clone (real images and videos); skips when it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"real shared data not found at {SHARED} (CI keeps ../shared beside the clone)")
    return SHARED


@pytest.fixture(scope="session")
def lpr4m_mini(tmp_path_factory) -> Path:
    """A synthetic LPR4M-mini (preset "test", seed 0), built once per session; treat it as read-only."""
    from lpr4m.synth import synthesize

    root = tmp_path_factory.mktemp("lpr4m-mini") / "data"
    synthesize(root, seed=0, preset="test", progress_bar=False)
    return root


@pytest.fixture(scope="session")
def mini_composite(lpr4m_mini, tmp_path_factory) -> Path:
    """Catalogue composites of the mini's shop images on frames of its own clips: 8 clips of 2 frames, half of
    the products in the test split; read-only."""
    from lpr4m.composite import composite

    root = tmp_path_factory.mktemp("composite") / "data"
    composite(root, [lpr4m_mini], [lpr4m_mini / "clips"], test_products=0.5, clips=8, frames_per_clip=2,
              frame_size=(320, 240), per_video=2, seed=0, workers=1)
    return root


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one intra-op thread is as fast and does not spin against the decoder thread or other jobs."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """Index caches and ultralytics state go to a per-test folder, never the user's ~/.cache/lpr."""
    monkeypatch.setenv("LPR_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def ort_ops(tmp_path):
    """``ort_ops(model.onnx)``: how many nodes of each op type ONNX Runtime's portable (basic) graph optimisations
    leave, e.g. to check that it fused every ``Pad`` into its ``Conv``."""
    import collections

    def count(onnx_path) -> collections.Counter:
        import onnx
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(tmp_path / "ort-optimized.onnx")
        ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        return collections.Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)
    return count
