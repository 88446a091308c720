"""Retriever: the embedding network (backbone registry), clip aggregation, training, rank-k evaluation, export.

    >>> from retriever import load_embedder
    >>> emb = load_embedder("weights/retriever.safetensors")      # .onnx / .engine too
    >>> vecs = emb.embed(list_of_rgb_arrays)                       # (N, D) float32, L2-normalised
    >>> from retriever.aggregate import aggregate
    >>> clip_vec = aggregate(vecs, "mean")
"""
from retriever.config import EmbedderConfig
from retriever.embedder import Embedder, load_embedder

__all__ = ["Embedder", "EmbedderConfig", "load_embedder"]
