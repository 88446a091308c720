#!/usr/bin/env bash
# One-command set-up: makes .venv and installs the project with every dependency. Safe to re-run.
# ./setup.sh --gpu adds the GPU extras (onnxruntime-gpu, faiss-gpu, TensorRT) on a machine with an NVIDIA GPU.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
OPENCV=opencv-python-headless==4.12.0.88

[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
# torch first, by exact pin: these two wheels are served from the local disk on the dev/CI machines.
"${PIP[@]}" install -q torch==2.14.1 torchvision==0.29.1
"${PIP[@]}" install -q -e ".[dev]"
# --gpu, or a re-run where the GPU extras are installed: the line above put the CPU builds back over them
if [ "${1:-}" = "--gpu" ] || "${PIP[@]}" show -q onnxruntime-gpu >/dev/null 2>&1; then
  "${PIP[@]}" install -q -e ".[dev,gpu]"
  # onnxruntime-gpu and faiss-gpu write the same modules as the CPU builds beside them: keep only the GPU ones
  "${PIP[@]}" uninstall -q -y onnxruntime faiss-cpu
  "${PIP[@]}" install -q --force-reinstall --no-deps $(grep -Eo "(onnxruntime-gpu|faiss-gpu-[a-z0-9]+)==[^ ]+" setup.cfg)
fi
# ultralytics pulls opencv-python, img2dataset/albumentations pull opencv-python-headless: both write cv2/.
# Keep exactly one (headless, what img2dataset asks for); ultralytics only needs the cv2 module.
if "${PIP[@]}" show -q opencv-python >/dev/null 2>&1; then
  "${PIP[@]}" uninstall -q -y opencv-python opencv-python-headless
  "${PIP[@]}" install -q --no-deps "$OPENCV"
fi
# Import check through the project's own adapters (detector.yolo sets ultralytics' offline settings first).
.venv/bin/python -c "import cv2, torch, faiss, onnxruntime, timm, av, pycocotools, lpr4m, retriever, pipeline
from detector import yolo
print('set-up OK: cv2', cv2.__version__, '| torch', torch.__version__, '| ultralytics', yolo.version())"
