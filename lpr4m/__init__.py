"""LPR4M dataset layer: ids, annotation files, download/regroup, frame sampling, synthetic LPR4M-mini.

Everything above this package (detector, retriever, pipeline) reads data only through it.
"""
from lpr4m.errors import BadInput
from lpr4m.layout import Dataset

__all__ = ["BadInput", "Dataset"]
