#!/usr/bin/env bash
# One prepared run for the device machine: the CUDA tests, then one short training step of the GPU
# recipes' strategies (bf16 replica vs FSDP2 with fp32 masters) on a Qwen3-VL-4B-shaped model.
# With GPU_CHECK_ALL=1 it also measures the packed-vs-vanilla step and the decode costs (4B shapes).
# Usage there: bash benchmarks/gpu_check.sh   (expects .whl/ with transformers carried; writes to $OUT)
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_objective.py 2>&1 | tail -15 | tee "$OUT/tests.txt"
python3 -m benchmarks.gpu_fsdp --shape 4b --device cuda 2>&1 | grep -v Warning | tee "$OUT/gpu_fsdp_4b.txt"
if [ "${GPU_CHECK_ALL:-0}" = 1 ]; then
  python3 -m benchmarks.layout_memory --shape 4b --device cuda --batch 1 --image-tokens 1024 --reps 3 \
    --configs 1300:256,3000:256,3000:1024 2>&1 | grep -v Warning | tee "$OUT/layout_memory_4b.txt"
  python3 -m benchmarks.gpu_decode 2>&1 | grep -v Warning | tee "$OUT/gpu_decode.txt"
fi
