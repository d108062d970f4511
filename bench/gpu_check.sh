#!/usr/bin/env bash
# GPU check (issue 13, part 7), one short prepared run (under 10 minutes on an H200):
#
#   bash bench/gpu_check.sh            # on a machine with an NVIDIA GPU, from the repository root
#
# EDSR-structured graph (B32 C256, random weights) at 500x500 x3 and 1920x1080 x2 through torch fp16/bf16
# (channels-last, CUDA graphs, torch.compile at 500x500) and onnxruntime's CUDA / TensorRT providers where the
# installed onnxruntime has them (onnxruntime-gpu). Prints the table for docs/benchmarks.md and writes it to
# $OUT/gpu_check.md when OUT is set. Needs python3 with torch (CUDA), numpy, opencv-python(-headless); pydantic
# and the rest of superres's dependencies are not needed (only models/ and tests/edsr_graph.py are imported).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
"$PYTHON" -c "import torch, numpy, cv2; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
"$PYTHON" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" || true
out_args=()
if [ -n "${OUT:-}" ]; then out_args=(--out "$OUT/gpu_check.md"); fi
timeout 560 "$PYTHON" bench/gpu_check.py "${out_args[@]}" "$@"
