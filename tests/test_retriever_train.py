"""Training CLI (cached and on-the-fly views, resume, DDP with gloo), evaluation CLI, ONNX export parity."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lpr4m.cli import run_main
from lpr4m.layout import Dataset
from retriever import load_embedder
from retriever.benchmark import main as bench_main
from retriever.data import UniqueImageBatchSampler, load_pairs
from retriever.evaluation import main as evaluate_main
from retriever.exporting import main as export_main
from retriever.training import main as train_main

REPO = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "efficientnet_lite0", "--input-size", "64", "--batch-size", "4", "--threads", "1",
        "--log-every", "1", "--eval-frames", "3", "--workers", "0"]


def _train(args, tmp_path, capsys):
    out = tmp_path / f"result-{len(list(tmp_path.iterdir()))}.json"
    assert run_main(train_main, args + ["--out", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def trained(lpr4m_mini, tmp_path_factory):
    """One short cached-view training run shared by the evaluation and export tests."""
    runs = tmp_path_factory.mktemp("runs")
    out = runs / "r.json"
    assert run_main(train_main, ["--data", str(lpr4m_mini), "--preset", "cpu", *TINY, "--epochs", "2",
                                 "--cache-views", "2", "--image-views", "2", "--runs-dir", str(runs),
                                 "--eval-every", "1", "--max-minutes", "0", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_sampler_keeps_images_unique_across_ranks():
    ids = [f"img{i % 9}" for i in range(60)]
    for world in (1, 2):
        per_rank = [list(UniqueImageBatchSampler(ids, 4, seed=3, rank=r, world_size=world)) for r in range(world)]
        assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) > 0
        for global_batch in zip(*per_rank):
            flat = [i for b in global_batch for i in b]
            assert len({ids[i] for i in flat}) == len(flat) == 4 * world


def test_cached_training_run(trained, lpr4m_mini):
    run = Path(trained["run_dir"])
    assert (run / "config.json").is_file() and (run / "metrics.json").is_file()
    rows = (run / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and "mean_R1" in rows[0]  # header + one row per epoch
    emb = load_embedder(trained["weights"])
    assert emb.config.input_size == 64 and emb.config.training_command.startswith("python retriever/train.py")
    assert 0 <= trained["best"]["R1"] <= 1


def test_on_the_fly_training_with_pmd(lpr4m_mini, tmp_path, capsys):
    res = _train(["--data", str(lpr4m_mini), *TINY, "--epochs", "1", "--freeze-stages", "6", "--limit", "12",
                  "--pmd", "--train-agg", "mean", "--val-data", "none", "--runs-dir", str(tmp_path / "runs")],
                 tmp_path, capsys)
    assert res["steps"] >= 1 and Path(res["weights"]).is_file()


def test_resume_continues_where_it_stopped(lpr4m_mini, tmp_path, capsys):
    common = ["--data", str(lpr4m_mini), "--preset", "cpu", *TINY, "--epochs", "2", "--cache-views", "1",
              "--image-views", "1", "--val-data", "none", "--ckpt-every", "1", "--max-minutes", "0"]
    full = _train(common + ["--runs-dir", str(tmp_path / "a")], tmp_path, capsys)
    part = _train(common + ["--runs-dir", str(tmp_path / "b"), "--stop-after-steps", "3"], tmp_path, capsys)
    assert part["stopped_early"] and part["steps"] == 3
    partial = Path(part["run_dir"]) / ".train_state.pt.k1ll3d.pt"  # what a kill during a state save leaves
    partial.write_bytes(b"\0" * 1024)
    resumed = _train(["--resume", part["run_dir"]], tmp_path, capsys)
    assert resumed["steps"] == full["steps"] and resumed["run_dir"] == part["run_dir"]
    assert not partial.exists() and not list(Path(part["run_dir"]).glob(".*.pt"))
    # one trainer a run folder: a second --resume while another process holds it exits 2 naming the holder
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom lpr4m.io import exclusive\n"
                               "with exclusive(sys.argv[1], 'run'):\n    print('held', flush=True)\n    time.sleep(60)",
                               str(Path(part["run_dir"]) / ".lock")], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run_main(train_main, ["--resume", part["run_dir"]]) == 2
        assert f"is in use by pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    a = load_embedder(full["weights"]).embed([np.full((40, 40, 3), 128, np.uint8)])
    b = load_embedder(resumed["weights"]).embed([np.full((40, 40, 3), 128, np.uint8)])
    assert float((a * b).sum()) > 0.999  # same batches, same views: the same model
    # a real process killed (SIGKILL) halfway through writing its third checkpoint: the resume starts from the
    # second, removes the half-written temp file, and ends with the same model
    proc = subprocess.run([sys.executable, "-c", KILL_IN_THIRD_SAVE, *common, "--runs-dir", str(tmp_path / "c")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    (killed,) = list((tmp_path / "c").iterdir())
    assert list(killed.glob(".train_state.pt.*"))  # what the kill left
    again = _train(["--resume", str(killed)], tmp_path, capsys)
    assert again["steps"] == full["steps"] and not list(killed.glob(".train_state.pt.*"))
    c = load_embedder(again["weights"]).embed([np.full((40, 40, 3), 128, np.uint8)])
    assert float((a * c).sum()) > 0.999


KILL_IN_THIRD_SAVE = """
import os, signal, sys, torch
from retriever.training import main
real_save = torch.save
saves = []

def save_then_die(obj, f, *a, **k):
    if ".train_state.pt." in str(f):
        saves.append(f)
        if len(saves) == 3:
            real_save(obj, f, *a, **k)
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)  # half of it reached the disk
            os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *a, **k)

torch.save = save_then_die
main(sys.argv[1:])
"""


def _ddp_worker(rank, world, port, q):
    import torch.distributed as dist
    from retriever.losses import InfoNCELoss
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    c = torch.nn.functional.normalize(torch.randn(8, 6), dim=1)
    i = torch.nn.functional.normalize(torch.randn(8, 6), dim=1)
    loss, _ = InfoNCELoss()(c[rank * 4:(rank + 1) * 4], i[rank * 4:(rank + 1) * 4])
    q.put((rank, float(loss)))
    dist.destroy_process_group()


def test_gathered_infonce_equals_full_batch_loss():
    """Two gloo ranks, 4 rows each: the mean of their losses is the loss on the whole batch of 8."""
    import socket
    import torch.multiprocessing as mp
    from retriever.losses import InfoNCELoss
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(30)
    torch.manual_seed(0)
    c = torch.nn.functional.normalize(torch.randn(8, 6), dim=1)
    i = torch.nn.functional.normalize(torch.randn(8, 6), dim=1)
    full, _ = InfoNCELoss()(c, i)
    assert (got[0] + got[1]) / 2 == pytest.approx(float(full.detach()), rel=1e-5)


def test_torchrun_ddp_two_processes(lpr4m_mini, tmp_path):
    out = tmp_path / "ddp.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "retriever" / "train.py"), "--data", str(lpr4m_mini), "--preset", "cpu", *TINY,
           "--batch-size", "2", "--epochs", "1", "--cache-views", "1", "--image-views", "1", "--val-data", "none",
           "--device", "cpu", "--runs-dir", str(tmp_path / "runs"), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # torchrun and both ranks: no orphans left on the shared machine
        proc.communicate()
        pytest.fail("torchrun with 2 gloo ranks did not finish in 150 s")
    assert proc.returncode == 0, stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world_size"] == 2 and res["steps"] >= 1


def test_evaluate_cli_and_rankings(trained, lpr4m_mini, tmp_path, capsys):
    out, rk = tmp_path / "eval.json", tmp_path / "rank.jsonl"
    assert run_main(evaluate_main, ["--data", str(lpr4m_mini), "--weights", trained["weights"],
                                    "--aggregation", "all", "--gallery", "both", "--frames", "3",
                                    "--save-rankings", str(rk), "--rankings-k", "5", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    n = len(Dataset(lpr4m_mini).gt_images)
    assert set(res["results"]) == {f"{g}/{a}" for g in ("live", "global") for a in ("mean", "attention", "max")}
    assert all(r["n_queries"] == n for r in res["results"].values()) and res["crops"] == "gt"
    lines = [json.loads(x) for x in rk.read_text().splitlines()]
    assert len(lines) == 6 * n and all(len(x["image_ids"]) <= 5 for x in lines)
    # recount R1 of one setting from the saved rankings
    live_mean = [x for x in lines if x["setting"] == "live/mean"]
    r1 = sum(bool(x["image_ids"]) and x["image_ids"][0] in x["gt_image_ids"] for x in live_mean) / n
    assert r1 == pytest.approx(res["results"]["live/mean"]["R1"])
    assert run_main(evaluate_main, ["--data", str(tmp_path / "nope"), "--weights", trained["weights"]]) == 2


def test_onnx_export_parity(trained, tmp_path, capsys, ort_ops):
    out = tmp_path / "export.json"
    assert run_main(export_main, ["--weights", trained["weights"], "--format", "onnx",
                                  "--output", str(tmp_path / "emb.onnx"), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["parity_min_cosine"] >= 0.9999  # against the model as trained, before its "same" pads became constant
    assert ort_ops(tmp_path / "emb.onnx")["Pad"] == 0  # ONNX Runtime fused all five of lite0's into their convs
    pt, ox = load_embedder(trained["weights"]), load_embedder(tmp_path / "emb.onnx")
    assert ox.config.input_size == pt.config.input_size and ox.config.format == "onnx"
    assert ox.fingerprint == pt.fingerprint  # same model on another backend: an index accepts both
    imgs = [np.random.default_rng(i).integers(0, 255, (50, 80, 3), dtype=np.uint8) for i in range(3)]
    assert float((pt.embed(imgs) * ox.embed(imgs)).sum(1).min()) >= 0.9999
    e = pt.embed(imgs)
    assert np.allclose(pt.quality(e), ox.quality(e), atol=1e-5)  # pooling head travels with the export
    assert run_main(export_main, ["--weights", str(tmp_path / "emb.onnx"), "--format", "onnx"]) == 2


def test_export_below_parity_is_not_written(trained, tmp_path, capsys, monkeypatch):
    """An export whose embeddings a cosine floor above 1 refuses is not written over the file at --output."""
    from retriever import exporting
    out = tmp_path / "emb.onnx"
    out.write_bytes(b"the previous export")
    monkeypatch.setitem(exporting.PARITY_MIN_COSINE, "fp32", 1.1)
    assert run_main(export_main, ["--weights", trained["weights"], "--output", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {out}: not written: fp32 export's embeddings differ")
    assert out.read_bytes() == b"the previous export" and list(tmp_path.iterdir()) == [out]


def test_half_precision_onnx_is_an_fp16_graph_with_float32_io(trained, tmp_path):
    """What a TensorRT 11 fp16 engine is built from (it has no FP16 builder flag): checked here in ONNX Runtime."""
    import onnx
    out = tmp_path / "emb16.onnx"
    assert run_main(export_main, ["--weights", trained["weights"], "--precision", "fp16", "--output", str(out),
                                  "--out", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["parity_min_cosine"] >= 0.999
    graph = onnx.load(str(out)).graph
    float32, float16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert graph.input[0].type.tensor_type.elem_type == float32 == graph.output[0].type.tensor_type.elem_type
    conv_weights = {n.input[1] for n in graph.node if n.op_type == "Conv"}
    assert conv_weights and {i.data_type for i in graph.initializer if i.name in conv_weights} == {float16}
    pt, half = load_embedder(trained["weights"]), load_embedder(out)
    assert half.config.extra["precision"] == "fp16" and half.fingerprint == pt.fingerprint
    imgs = [np.random.default_rng(i).integers(0, 255, (50, 80, 3), dtype=np.uint8) for i in range(3)]
    assert float((pt.embed(imgs) * half.embed(imgs)).sum(1).min()) >= 0.999


@pytest.mark.gpu
def test_cuda_training_with_amp(lpr4m_mini, tmp_path):
    """The gpu preset's path: plain ``--device cuda`` and autocast through the attention pool (both broke on an
    H200 before: torch 2.11's set_device refused "cuda", index_add refused half scores with float32 weights)."""
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU (CUDA not available)")
    out = tmp_path / "r.json"
    assert run_main(train_main, ["--data", str(lpr4m_mini), "--preset", "gpu", *TINY, "--epochs", "1", "--amp",
                                 "--device", "cuda", "--no-pretrained", "--runs-dir", str(tmp_path),
                                 "--out", str(out)]) == 0
    emb = load_embedder(json.loads(out.read_text())["weights"], device="cuda")
    img = np.random.default_rng(0).integers(0, 255, (50, 80, 3), dtype=np.uint8)
    assert np.isfinite(emb.embed([img])).all()


@pytest.mark.gpu
def test_tensorrt_engine(trained, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU (CUDA not available)")
    pytest.importorskip("tensorrt", reason="TensorRT not installed")
    assert run_main(export_main, ["--weights", trained["weights"], "--format", "engine",
                                  "--output", str(tmp_path / "emb.engine")]) == 0
    eng, pt = load_embedder(tmp_path / "emb.engine", device="cuda"), load_embedder(trained["weights"])
    imgs = [np.random.default_rng(i).integers(0, 255, (50, 80, 3), dtype=np.uint8) for i in range(3)]
    assert float((pt.embed(imgs) * eng.embed(imgs)).sum(1).min()) >= 0.999


def test_train_bad_input(tmp_path):
    assert run_main(train_main, ["--data", str(tmp_path / "missing")]) == 2
    assert run_main(train_main, ["--resume", str(tmp_path)]) == 2


@pytest.mark.parametrize("main, argv", [
    (train_main, ["--lr", "nan"]), (train_main, ["--temperature", "0"]), (train_main, ["--cache-views", "-1"]),
    (train_main, ["--image-views", "0"]), (train_main, ["--log-every", "0"]), (train_main, ["--device", "bogus"]),
    (evaluate_main, ["--frames", "0"]), (evaluate_main, ["--limit", "0"]), (evaluate_main, ["--limit", "-1"]),
    (evaluate_main, ["--rankings-k", "0"]), (evaluate_main, ["--batch-size", "0"]),
    (evaluate_main, ["--device", "bogus"]),
    (evaluate_main, ["--frozen-backbone", "efficientnet_lite0", "--input-size", "0"]),
    (evaluate_main, ["--weights", "w.safetensors", "--frozen-backbone", "efficientnet_lite0"]),
    (bench_main, ["--repeats", "0"]), (bench_main, ["--gallery-size", "0"]), (bench_main, ["--dim", "-3"]),
    (bench_main, ["--threads", "-1"]),
    (export_main, ["--weights", "w.safetensors", "--opset", "3"]),
    (export_main, ["--weights", "w.safetensors", "--opset", "99"]),
])
def test_bad_flags_are_usage_errors(main, argv, capsys):
    """argparse refuses them before any work (exit 2): none may train, evaluate or export with a silent meaning."""
    with pytest.raises(SystemExit) as e:
        run_main(main, (["--data", "unused"] if main is evaluate_main else []) + argv)
    assert e.value.code == 2 and "error: argument" in capsys.readouterr().err


def test_bench_refuses_a_folder_as_output_before_benchmarking(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("retriever.benchmark.bench_ranking", lambda *a, **k: pytest.fail("benchmarked first"))
    with pytest.raises(SystemExit) as e:  # argparse's output_file check, before any work
        bench_main(["--skip-embed", "--csv", str(tmp_path)])
    assert e.value.code == 2 and "argument --csv: is a folder" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["/../../x/ESCAPED", "a/b"])
def test_unsafe_run_name_is_refused(lpr4m_mini, tmp_path, capsys, name):
    runs = tmp_path / "sub" / "runs"
    with pytest.raises(SystemExit) as e:  # by argparse, before any work
        run_main(train_main, ["--data", str(lpr4m_mini), *TINY, "--epochs", "1", "--freeze-stages", "6",
                              "--limit", "12", "--val-data", "none", "--runs-dir", str(runs), "--name", name])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "unsafe run name" in err and len(err.strip().splitlines()) == 1
    assert not runs.exists() and not list(tmp_path.rglob("ESCAPED"))  # refused before anything is written


def test_gpu_device_without_gpu_is_one_line(trained, lpr4m_mini, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for main, argv in ((train_main, ["--data", str(lpr4m_mini), *TINY]),
                       (evaluate_main, ["--data", str(lpr4m_mini), "--weights", trained["weights"]])):
        for device in ("cuda", "0", "cuda:1"):
            assert run_main(main, argv + ["--device", device]) == 2
            err = capsys.readouterr().err
            assert "--device" in err and len(err.strip().splitlines()) == 1


def test_diverging_training_stops_without_saving_weights(lpr4m_mini, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert run_main(train_main, ["--data", str(lpr4m_mini), *TINY, "--epochs", "3", "--freeze-stages", "6",
                                 "--limit", "12", "--val-data", "none", "--runs-dir", str(runs), "--lr", "1e30"]) == 2
    assert "lower --lr" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not list(runs.rglob("*.safetensors"))


@pytest.mark.parametrize("views", [["--freeze-stages", "6"],  # on-the-fly views
                                   ["--preset", "cpu", "--cache-views", "1", "--image-views", "1"]])
def test_unreadable_training_images_are_skipped_and_counted(lpr4m_mini, tmp_path, capsys, views):
    data = tmp_path / "data"
    shutil.copytree(lpr4m_mini, data)
    pairs = load_pairs(Dataset(data))
    pairs[0].image_path.write_bytes(b"not a jpeg")
    frame = pairs[1].frame_paths[0]
    frame.write_bytes(frame.read_bytes()[:200])  # truncated
    common = ["--data", str(data), *TINY, *views, "--epochs", "1", "--val-data", "none", "--max-minutes", "0",
              "--runs-dir", str(tmp_path / "runs")]
    res = _train(common, tmp_path, capsys)
    assert res["problems"]["by_kind"] == {"unreadable_image": 2} and Path(res["weights"]).is_file()
    assert json.loads((Path(res["run_dir"]) / "metrics.json").read_text())["problems"]["total"] == 2
    assert run_main(train_main, common + ["--strict"]) == 2
    assert str(pairs[0].image_path) in capsys.readouterr().err.strip().splitlines()[-1]
