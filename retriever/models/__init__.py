"""Embedding models: the backbone registry and the shared encoder + projection + pooling head."""
from retriever.models.registry import (BackboneUnavailable, create_embedder, is_registered, list_backbones,
                                       register_backbone)
from retriever.models.embedding import EmbeddingModel, QualityPool, Trunk

__all__ = ["BackboneUnavailable", "EmbeddingModel", "QualityPool", "Trunk", "create_embedder", "is_registered",
           "list_backbones", "register_backbone"]
