#!/usr/bin/env bash
# Run every GPU path once, end to end, on a small LPR4M-style dataset, and compare with the CPU where both exist.
#
#   scripts/gpu_check.sh DATA OUT [PYTHON]     (PYTHON defaults to .venv/bin/python)
#
# DATA: an LPR4M root (e.g. `python -m lpr4m synth DATA --preset test`). OUT: a new folder for the logs, the JSON
# results and a summary (OUT/summary.txt). Each step's exit status is printed; the script goes on after a failure
# and exits 1 if any step failed. Steps whose optional packages are missing (TensorRT, ONNX Runtime's CUDA build,
# faiss-gpu) report that and are not counted as failures. ONLY="det ret" runs only the steps of those stages (det,
# ret, pipe, pytest), for a machine that lacks another stage's packages.
set -u
if [ $# -lt 2 ]; then
    echo "usage: scripts/gpu_check.sh DATA OUT [PYTHON]" >&2
    exit 2
fi
DATA=$1
OUT=$2
PY=${3:-.venv/bin/python}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0
export PYTHONUNBUFFERED=1

wanted() {  # wanted STEP_NAME: is the step's stage (the part before the first _) in ONLY, or ONLY unset
    [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" ${1%%_*} "* ]]
}

step() {  # step NAME EXPECTED_RC CMD... : stdout -> OUT/NAME.json, stderr -> OUT/NAME.log
    local name=$1 want=$2
    shift 2
    if ! wanted "$name"; then
        echo "$name: not run (ONLY=$ONLY)" | tee -a "$SUMMARY"
        return
    fi
    local t0 t1 rc
    t0=$(date +%s.%N)
    "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"
    rc=$?
    t1=$(date +%s.%N)
    local secs
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    local verdict=ok
    if [ "$rc" != "$want" ]; then verdict=FAILED; FAILED=1; fi
    echo "$name: rc=$rc (expected $want) ${secs}s $verdict" | tee -a "$SUMMARY"
    if [ "$verdict" = FAILED ]; then tail -n 15 "$OUT/$name.log" | tee -a "$SUMMARY"; fi
}

"$PY" - <<'EOF' | tee -a "$SUMMARY"
import importlib.util, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0)
      if torch.cuda.is_available() else "NONE")
import onnxruntime as ort
print("onnxruntime", ort.__version__, ort.get_available_providers())
for name in ("tensorrt", "faiss"):
    print(name, "present" if importlib.util.find_spec(name) else "missing")
EOF

# Detector: GPU training (gpu preset, shortened; our Lite0 trunk too), evaluation on the GPU, the CPU and ONNX
# Runtime, an interrupted run resumed, speed, TensorRT export.
step det_train 0 "$PY" detector/train.py --data "$DATA" --preset gpu --epochs "${DET_EPOCHS:-30}" --batch 32 \
    --runs-dir "$OUT/runs/detector" --name gpu
DET=$(ls -t "$OUT"/runs/detector/*/weights/detector.safetensors 2>/dev/null | head -n 1)
DET=${DET:-weights/detector.safetensors}
if [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then  # ultralytics DDP, our trunk
    step det_train_ddp 0 "$PY" detector/train.py --data "$DATA" --preset gpu --model yolo11-lite0.yaml --epochs 2 \
        --batch 32 --device 0,1 --runs-dir "$OUT/runs/detector-ddp" --name ddp
fi
# our ImageNet-pretrained EfficientNet-Lite0 trunk (the bundled detector's model) under autocast on one GPU
step det_train_lite0 0 "$PY" detector/train.py --data "$DATA" --preset gpu --model yolo11-lite0.yaml \
    --epochs "${DET_LITE0_EPOCHS:-5}" --batch 32 --runs-dir "$OUT/runs/detector-lite0" --name lite0
LITE0=$(ls -t "$OUT"/runs/detector-lite0/*/weights/detector.safetensors 2>/dev/null | head -n 1)
step det_eval_lite0 0 "$PY" detector/evaluate.py --data "$DATA" --weights "${LITE0:-weights/detector.safetensors}" \
    --device 0
step det_eval_gpu 0 "$PY" detector/evaluate.py --data "$DATA" --weights "$DET" --device 0
step det_eval_cpu 0 "$PY" detector/evaluate.py --data "$DATA" --weights "$DET" --device cpu
step det_onnx 0 "$PY" detector/export.py --weights "$DET" --format onnx
# auto: ONNX Runtime's CUDA provider where onnxruntime-gpu is installed, else its CPU (--device 0 is refused there)
step det_eval_onnx 0 "$PY" detector/evaluate.py --data "$DATA" --weights "${DET%.safetensors}.onnx" --device auto
# an interrupted GPU run (SIGINT after DET_KILL_S seconds) resumes where it stopped
if wanted det_resume; then
    timeout -s INT "${DET_KILL_S:-40}" "$PY" detector/train.py --data "$DATA" --preset gpu \
        --epochs "${DET_CUT_EPOCHS:-20}" --batch 32 --runs-dir "$OUT/runs/detector-resume" --name cut \
        > "$OUT/det_cut.log" 2>&1
    echo "det_cut: rc=$? (interrupted on purpose after ${DET_KILL_S:-40}s)" | tee -a "$SUMMARY"
    CUT=$(ls -td "$OUT"/runs/detector-resume/*/ 2>/dev/null | head -n 1)
    step det_resume 0 "$PY" detector/train.py --data "$DATA" --resume "${CUT:-missing-run}"
fi
step det_bench_gpu 0 "$PY" detector/bench.py --weights "$DET" --device 0 --threads 8 --runs 20
if "$PY" -c "import tensorrt" 2>/dev/null; then
    step det_engine 0 "$PY" detector/export.py --weights "$DET" --format engine
    step det_eval_engine 0 "$PY" detector/evaluate.py --data "$DATA" --weights "${DET%.safetensors}.engine" --device 0
    step det_engine_int8 0 "$PY" detector/export.py --weights "$DET" --format engine --precision int8 \
        --calib-data "$DATA" --output "$OUT/detector-int8.engine"
    step det_eval_engine_int8 0 "$PY" detector/evaluate.py --data "$DATA" --weights "$OUT/detector-int8.engine" \
        --device 0
else
    step det_engine_refused 2 "$PY" detector/export.py --weights "$DET" --format engine
fi

# Retriever: GPU training with mixed precision (gpu preset, shortened), evaluation on GPU and CPU.
step ret_train 0 "$PY" retriever/train.py --data "$DATA" --preset gpu --no-pretrained --epochs "${RET_EPOCHS:-3}" \
    --batch-size "${RET_BATCH:-8}" --amp --device cuda --runs-dir "$OUT/runs/retriever" --name gpu
RET=$(ls -t "$OUT"/runs/retriever/*/weights/last.safetensors 2>/dev/null | head -n 1)
RET=${RET:-weights/retriever.safetensors}
step ret_eval_gpu 0 "$PY" retriever/evaluate.py --data "$DATA" --weights "$RET" --device cuda
step ret_eval_cpu 0 "$PY" retriever/evaluate.py --data "$DATA" --weights "$RET" --device cpu
if "$PY" -c "import tensorrt" 2>/dev/null; then  # fp16 engine (parity-checked against PyTorch by the export)
    step ret_engine 0 "$PY" retriever/export.py --weights "$RET" --format engine --output "$OUT/retriever.engine"
    step ret_eval_engine 0 "$PY" retriever/evaluate.py --data "$DATA" --weights "$OUT/retriever.engine" --device cuda
fi

# Pipeline: the bundled demo on GPU and CPU (same answer expected), and end-to-end evaluation on GPU.
if "$PY" -c "import av" 2>/dev/null; then  # decoding an mp4 needs PyAV; the frame-folder evaluation does not
    step pipe_run_gpu 0 "$PY" pipeline/run.py --clip demo/clips/demo-1.mp4 --device cuda --json -
    step pipe_run_cpu 0 "$PY" pipeline/run.py --clip demo/clips/demo-1.mp4 --device cpu --json -
else
    echo "pipe_run: not run (PyAV missing)" | tee -a "$SUMMARY"
fi
step pipe_eval_gpu 0 "$PY" pipeline/evaluate.py --data "$DATA" --device cuda
step pipe_eval_cpu 0 "$PY" pipeline/evaluate.py --data "$DATA" --device cpu

# The tests marked gpu (TensorRT engines, faiss on the GPU); they skip with a reason where a package is missing.
if [ -z "${NO_PYTEST:-}" ]; then
    step pytest_gpu 0 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests
    tail -n 8 "$OUT/pytest_gpu.json" >> "$SUMMARY"
fi
# The figures to compare: the same weights' AP (R1 ...) on the GPU, the CPU and ONNX Runtime.
for f in "$OUT"/det_eval_*.json "$OUT"/ret_eval_*.json "$OUT"/pipe_eval_*.json; do
    [ -s "$f" ] && "$PY" -c 'import json, sys; d = json.load(open(sys.argv[1]))
for name, m in (d["results"].items() if "results" in d else [("", d.get("metrics", d))]):
    print(sys.argv[1].rsplit("/", 1)[-1], name, {k: round(v, 4) for k, v in m.items() if isinstance(v, float)})' "$f" \
        | tee -a "$SUMMARY"
done
exit $FAILED
