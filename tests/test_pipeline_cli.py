"""Pipeline CLIs refuse bad flags and unsafe outputs in one line: flag ranges, --device per backend, bench's
--grocery, make_demo's --out, unwritable output paths."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lpr4m.errors import BadInput

pytestmark = pytest.mark.usefixtures("isolated_cache")
REPO = Path(__file__).resolve().parents[1]


def _run(main, argv, capsys):
    from lpr4m.cli import run_main
    code = run_main(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("module, argv", [
    ("run", ["--conf", "2"]), ("run", ["--conf", "nan"]), ("run", ["--crops-per-frame", "0"]),
    ("run", ["--crops-per-frame", "-1"]), ("run", ["--batch", "0"]), ("run", ["--batch", "-1"]),
    ("run", ["--seg-window", "0"]), ("run", ["--seg-window", "-3"]), ("run", ["--seg-window", "nan"]),
    ("run", ["--seg-hysteresis", "-1"]), ("run", ["--html-frames", "-1"]), ("run", ["--fps", "nan"]),
    ("run", ["--fps", "inf"]), ("run", ["--device", "bogus"]),
    ("evaluate", ["--frames", "0"]), ("evaluate", ["--limit", "0"]), ("evaluate", ["--limit", "-1"]),
    ("evaluate", ["--rankings-k", "-1"]), ("evaluate", ["--fps", "0"]), ("evaluate", ["--fps", "nan"]),
    ("evaluate", ["--device", "bogus"]), ("index", ["--batch", "0"]), ("index", ["--device", "bogus"]),
    ("bench", ["--runs", "0"]), ("bench", ["--cores", "0"]), ("bench", ["--seconds", "0"]),
    ("bench", ["--seconds", "-1"]), ("make_demo", ["--clips", "0"]),
])
def test_flags_out_of_range_are_refused_at_parse_time(module, argv, capsys):
    import importlib
    required = {"run": ["--clip", "x.mp4"], "evaluate": ["--data", "d"], "index": ["--out", "o"]}
    parser = importlib.import_module(f"pipeline.{module}").build_parser()
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(required.get(module, []) + argv)
    assert exc.value.code == 2 and f"argument {argv[0]}" in capsys.readouterr().err


def test_bench_missing_grocery_is_an_error(tmp_path, capsys):
    from pipeline.bench import main
    code, out, err = _run(main, ["--grocery", tmp_path / "nope", "--skip-speed"], capsys)
    assert code == 2 and str(tmp_path / "nope") in err and len(err.strip().splitlines()) == 1


# -- --device ------------------------------------------------------------------------------------------------
def test_resolve_device_refuses_a_gpu_the_backend_cannot_use(monkeypatch):
    import onnxruntime as ort
    import torch
    from pipeline.backends import resolve_device
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert resolve_device("auto", "onnx") == resolve_device("cpu", "onnx") == "cpu"
    for dev in ("cuda", "cuda:1", "0"):
        with pytest.raises(BadInput, match="ONNX Runtime has no CUDA provider"):
            resolve_device(dev, "onnx")
    with pytest.raises(BadInput, match="onnx backend runs on cpu"):
        resolve_device("mps", "onnx")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert resolve_device("auto", "onnx") == "cuda" and resolve_device("1", "onnx") == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", "torch") == "cpu"
    with pytest.raises(BadInput, match="torch sees no CUDA GPU"):
        resolve_device("cuda", "torch")
    with pytest.raises(BadInput, match="TensorRT engines run on a CUDA GPU"):
        resolve_device("cpu", "tensorrt")


def test_onnx_providers_take_the_asked_gpu_and_cache_tensorrt_engines(monkeypatch, tmp_path):
    import onnxruntime as ort

    from lpr4m.cli import onnx_providers
    monkeypatch.setenv("LPR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert onnx_providers("cpu") == onnx_providers("auto") == ["CPUExecutionProvider"]
    with pytest.raises(BadInput, match="no CUDA/TensorRT provider"):
        onnx_providers("cuda:1")
    assert onnx_providers("cuda:1", cpu_fallback=True) == ["CPUExecutionProvider"]  # the benchmark's choice
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    (trt, trt_opts), (cuda, cuda_opts), cpu = onnx_providers("cuda:1")
    assert (trt, cuda, cpu) == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert trt_opts["device_id"] == cuda_opts["device_id"] == 1  # not GPU 0 whatever was asked
    assert trt_opts["trt_engine_cache_enable"] and trt_opts["trt_engine_cache_path"].startswith(str(tmp_path))
    assert onnx_providers("2")[1] == ("CUDAExecutionProvider", {"device_id": 2})


def test_onnx_device_resolution_does_not_import_torch():
    code = ("import sys; from pipeline.backends import resolve_device; resolve_device('auto', 'onnx'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# -- outputs -------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc (a folder no one can write into)")
@pytest.mark.usefixtures("one_torch_thread")
def test_unwritable_output_is_one_line(lpr4m_mini, tmp_path_factory, capsys):
    from test_pipeline_index import tiny_embedder_weights
    from pipeline.index import main
    live = sorted((lpr4m_mini / "gallery").iterdir())[0]
    code, out, err = _run(main, ["--gallery", live, "--out", "/proc/idx", "--weights",
                                 tiny_embedder_weights(tmp_path_factory.getbasetemp())], capsys)
    assert code == 2 and err.startswith("error: /proc/") and len(err.strip().splitlines()) == 1


def test_make_demo_never_replaces_a_folder_it_did_not_write(lpr4m_mini, tmp_path, capsys):
    from pipeline.make_demo import main
    base = ["--data", lpr4m_mini, "--any-clips", "--clips", "1", "--out"]
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    code, _, err = _run(main, base + [user], capsys)
    assert code == 2 and "choose a new --out" in err and len(err.strip().splitlines()) == 1
    assert (user / "notes.txt").read_text() == "precious" and sorted(p.name for p in user.iterdir()) == ["notes.txt"]
    demo = tmp_path / "demo"
    demo.mkdir()  # empty: fine
    code, _, err = _run(main, base + [demo], capsys)
    assert code == 0, err
    made = sorted(p.name for p in demo.iterdir())
    code, _, err = _run(main, base + [demo], capsys)  # an earlier demo is replaced
    assert code == 0, err
    assert sorted(p.name for p in demo.iterdir()) == made
    (demo / "mine.txt").write_text("x")  # ... unless someone put files in it
    code, _, err = _run(main, base + [demo], capsys)
    assert code == 2 and "mine.txt" in err and (demo / "mine.txt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "user"]  # no temp folders left


def test_onnx_session_caches_its_optimised_graph(monkeypatch, tmp_path):
    import numpy as np
    import onnxruntime as ort
    from lpr4m.cli import onnx_session
    monkeypatch.setenv("LPR_CACHE_DIR", str(tmp_path))
    model = Path(__file__).resolve().parents[1] / "weights" / "retriever.onnx"
    x = np.random.default_rng(0).standard_normal((1, 3, 192, 192)).astype(np.float32)

    def run():
        s = onnx_session(model, ort.SessionOptions(), ["CPUExecutionProvider"])
        return s.run(None, {s.get_inputs()[0].name: x})[0]

    first = run()
    cached = list((tmp_path / "onnxruntime-graphs").glob("*.onnx"))
    assert len(cached) == 1 and not list((tmp_path / "onnxruntime-graphs").glob(".*"))
    np.testing.assert_array_equal(run(), first)  # from the cached graph
    cached[0].write_bytes(b"damaged")
    np.testing.assert_array_equal(run(), first)  # a damaged entry is rebuilt, not fatal
    assert cached[0].stat().st_size > 1000
