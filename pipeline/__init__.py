"""Clip in, products out: the gallery index (faiss), the streaming recogniser, end-to-end evaluation and bench.

Scripts (``python pipeline/index.py``, ``run.py``, ``evaluate.py``, ``bench.py``, ``make_demo.py``) are thin; the
logic lives in the modules ``pipeline.gallery``, ``pipeline.backends``, ``pipeline.recognize``,
``pipeline.segments`` and ``pipeline.report``.
"""
