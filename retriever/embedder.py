"""``load_embedder(weights)``: an Embedder whose backend (PyTorch, ONNX Runtime, TensorRT) follows the suffix.

Every backend reads preprocessing from the config JSON beside the weights, so a model trained at 224 px
letterboxed is never fed 256 px squashed by accident.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from lpr4m.cli import onnx_providers, onnx_session, torch_device
from lpr4m.errors import BadInput
from lpr4m.io import sha256_file
from retriever.aggregate import l2_normalise
from retriever.config import EmbedderConfig, config_path_for
from retriever.preprocess import to_batch

logger = logging.getLogger(__name__)

SUFFIXES = (".safetensors", ".onnx", ".engine")


# -- checkpoints ---------------------------------------------------------------------------------------------
def save_checkpoint(model, config: EmbedderConfig, path) -> EmbedderConfig:
    """Write ``path`` (.safetensors state dict) and its config JSON (with the file's sha256)."""
    from safetensors.torch import save_file
    from lpr4m.io import atomic_path
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"backbone": config.backbone, "embed_dim": str(config.embed_dim)})
    config.sha256 = sha256_file(path)
    config.format = "safetensors"
    config.save(config_path_for(path))
    return config


def read_config(weights, verify: bool = True) -> EmbedderConfig:
    weights = Path(weights)
    if not weights.is_file():
        raise BadInput(weights, "weights file not found")
    cfg_path = config_path_for(weights)
    if not cfg_path.is_file():
        raise BadInput(cfg_path, f"config JSON for {weights.name} not found (expected next to the weights)")
    config = EmbedderConfig.load(cfg_path)
    if verify and config.sha256 and sha256_file(weights) != config.sha256:
        raise BadInput(weights, f"sha256 differs from the one recorded in {cfg_path.name}: weights and config "
                                f"do not belong together")
    return config


def build_model(config: EmbedderConfig, weights=None, pretrained: bool = False):
    """The torch EmbeddingModel for ``config``, with the weights of a .safetensors file when given."""
    from retriever.models import create_embedder
    model, _ = create_embedder(config.backbone, pretrained=pretrained, embed_dim=config.embed_dim,
                               pool_hidden=config.pool_hidden)
    if weights is not None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError) as e:
            raise BadInput(weights, f"not a readable safetensors file ({e})") from None
        own = model.state_dict()
        for key, tensor in state.items():  # load_state_dict would raise a multi-line "size mismatch" RuntimeError
            if key in own and tuple(tensor.shape) != tuple(own[key].shape):
                raise BadInput(weights, f"tensor {key!r} has shape {tuple(tensor.shape)} but the config "
                                        f"{config_path_for(weights).name} (embed_dim {config.embed_dim}) needs "
                                        f"{tuple(own[key].shape)}: weights and config do not belong together")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise BadInput(weights, f"weights do not fit backbone {config.backbone!r}: "
                                    f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


# -- backends --------------------------------------------------------------------------------------------------
class TorchBackend:
    def __init__(self, model, device: str = "cpu"):
        import torch
        self.torch = torch
        self.device = torch.device(torch_device(device))
        self.model = model.to(self.device).eval()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model(self.torch.from_numpy(batch).to(self.device)).float().cpu().numpy()


class OnnxBackend:
    def __init__(self, path, device: str = "cpu"):
        import onnxruntime as ort
        providers = onnx_providers(device)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        # no busy-waiting between ops: the pipeline decodes video in a thread beside the model (CPU, 2 cores)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = onnx_session(path, so, providers)
        except Exception as e:  # onnxruntime raises its own exception types for corrupt models
            raise BadInput(path, f"ONNX Runtime cannot load this model ({type(e).__name__}: {str(e)[:200]})") \
                from None
        self.input_name = self.session.get_inputs()[0].name
        self.providers = self.session.get_providers()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]


# -- the public object -----------------------------------------------------------------------------------------
class Embedder:
    """Images -> L2-normalised embeddings, with the preprocessing of its config."""

    def __init__(self, backend, config: EmbedderConfig, weights_path=None, pool_params: dict | None = None):
        self.backend = backend
        self.config = config
        self.weights_path = None if weights_path is None else Path(weights_path)
        self._pool = pool_params  # numpy copies of the QualityPool head, for "attention" aggregation

    @property
    def fingerprint(self) -> str:
        return self.config.fingerprint

    @property
    def dim(self) -> int:
        return self.config.embed_dim

    def embed(self, images, batch_size: int = 32) -> np.ndarray:
        """(N, D) float32, rows L2-normalised."""
        images = list(images)
        out = np.zeros((len(images), self.config.embed_dim), np.float32)
        flip = self.config.tta == "flip"
        step = max(1, batch_size // 2) if flip else batch_size  # the mirror images share the batch
        for i in range(0, len(images), step):
            batch = to_batch(images[i:i + step], self.config)
            if flip:
                n = len(batch)
                y = np.asarray(self.backend(np.concatenate([batch, batch[..., ::-1]])), np.float32)
                y = l2_normalise(y[:n]) + l2_normalise(y[n:])
            else:
                y = np.asarray(self.backend(batch), np.float32)
            out[i:i + len(y)] = y
        return l2_normalise(out)

    def quality(self, embeddings: np.ndarray) -> np.ndarray:
        """Pooling scores (N,) of frame embeddings (higher = more weight); zeros when the head is absent."""
        embeddings = np.asarray(embeddings, np.float32)
        if not self._pool:
            return np.zeros(len(embeddings), np.float32)
        p = self._pool
        h = np.maximum(embeddings @ p["fc1.weight"].T + p["fc1.bias"], 0.0)
        return (h @ p["fc2.weight"].T + p["fc2.bias"]).reshape(-1).astype(np.float32)


def pool_params_from_model(model) -> dict:
    return {k: v.detach().cpu().float().numpy() for k, v in model.pool.state_dict().items()}


def load_embedder(weights, device: str = "cpu", verify: bool = True) -> Embedder:
    """An Embedder for ``weights`` (.safetensors / .onnx / .engine, with ``<stem>.json`` beside it).

    >>> emb = load_embedder("weights/retriever.safetensors")
    >>> emb.embed([rgb]).shape            # (1, emb.config.embed_dim)
    """
    weights = Path(weights)
    suffix = weights.suffix.lower()
    if suffix not in SUFFIXES:
        raise BadInput(weights, f"unknown weights format {suffix!r}; expected one of {', '.join(SUFFIXES)}")
    config = read_config(weights, verify=verify)
    if suffix == ".safetensors":
        model = build_model(config, weights)
        return Embedder(TorchBackend(model, device), config, weights, pool_params_from_model(model))
    pool = {k: np.asarray(v, np.float32) for k, v in (config.extra.get("pool_head") or {}).items()}
    if suffix == ".onnx":
        backend = OnnxBackend(weights, device)
        check_onnx_shapes(backend.session, config, weights)
    else:
        from lpr4m.tensorrt_engine import EngineRunner
        backend = EngineRunner(weights, device)
    return Embedder(backend, config, weights, pool or None)


def check_onnx_shapes(session, config: EmbedderConfig, weights) -> None:
    """The model's input and embedding sizes must be its config's: preprocessing follows the config, so a mismatch
    would otherwise surface as an ONNX Runtime traceback on the first batch."""
    expected = {"input": [3, config.input_size, config.input_size], "output": [config.embed_dim]}
    for what, node in (("input", session.get_inputs()[0]), ("output", session.get_outputs()[0])):
        actual = list(node.shape[1:])  # after the batch axis; a symbolic (named) size accepts any
        if len(actual) != len(expected[what]) or any(isinstance(a, int) and a != e
                                                     for a, e in zip(actual, expected[what])):
            raise BadInput(weights, f"ONNX {what} shape {['N'] + actual} does not match "
                                    f"{config_path_for(weights).name} (input_size {config.input_size}, embed_dim "
                                    f"{config.embed_dim}): expected {['N'] + expected[what]}")
