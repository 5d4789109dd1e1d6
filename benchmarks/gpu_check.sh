#!/usr/bin/env bash
# One prepared run for the device machine (issue 22), under 8 minutes on an H100/H200:
#   1. the CUDA tests (objective, FSDP mixed precision, decoding on CUDA = on the CPU, the static cache's CUDA graphs);
#   2. one FSDP training step of the GPU recipes' strategies on a Qwen3-VL-4B-shaped model (benchmarks/gpu_fsdp.py);
#   3. one decode of a promoted-stage-shaped checkpoint through `bard generate --device cuda` (the shipped base
#      with a stage's bard.json: block size, token ids, promoted decode setting);
#   4. benchmarks/gpu_decode.py: forward costs, and AR vs block decoding with the dynamic cache's eager forwards
#      and with the static cache's CUDA graphs (4B shapes, bf16, 1k prompt, 256 new tokens, batch 1 and 8).
# The last line is one JSON object. Usage there: bash benchmarks/gpu_check.sh   (.whl/ with transformers carried
# where the machine's is older than the project's; writes its logs to $OUT)
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
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$OUT/gpu.txt"

python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_static_kv.py tests/test_objective.py 2>&1 \
  | tail -25 | tee "$OUT/tests.txt"

python3 -m benchmarks.gpu_fsdp --shape 4b --device cuda 2>&1 | grep -v Warning | tee "$OUT/gpu_fsdp_4b.txt"

python3 - "$OUT/stage" <<'EOF' 2>&1 | grep -v Warning | tee "$OUT/stage.txt"
import sys
from pathlib import Path
from bard_core import checkpoint
from bard_core.assets import shipped_base
model, processor, meta = checkpoint.load(shipped_base())
ids = checkpoint.token_ids(processor.tokenizer, meta)
stage = {"block_size": 8, "label_shift": True, "objective": "diffusion", "recipe": "tiny",
         "token_ids": {"mask": ids.mask, "eos": ids.eos, "pad": ids.pad},
         "decode": {"mode": "dynamic", "block_size": 8, "threshold": 0.9, "label_shift": True}}
print(checkpoint.save_checkpoint(model, processor, Path(sys.argv[1]), stage))
EOF
python3 -m flows.cli generate --model "$OUT/stage" --prompt "List what is in each cell of the grid." \
  --max-new-tokens 64 --device cuda --json 2>&1 | grep -v Warning | tee "$OUT/generate.txt"
rm -rf "$OUT/stage"

python3 -m benchmarks.gpu_decode --contexts 1024,4096 --queries 1,8,32 --reps 5 --steps 4,8 --batches 1,8 2>&1 \
  | grep -v Warning | tee "$OUT/gpu_decode.txt"

python3 - "$OUT" "$start" <<'EOF'
import json, re, sys, time
from pathlib import Path
out = Path(sys.argv[1])
def last_json(name):
    for line in reversed((out / name).read_text().splitlines() if (out / name).exists() else []):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None
tests = (out / "tests.txt").read_text() if (out / "tests.txt").exists() else ""
counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", tests)}
decode = last_json("gpu_decode.txt") or {}
best = {}
for r in decode.get("end_to_end", []):
    if r["batch"] == 1 and r["cache"] == "static+graphs":
        best["ar_tok_s_b1" if r["decoder"] == "ar" else f"{r['decoder']} x_ar_b1"] = round(
            r["tok_s"] if r["decoder"] == "ar" else r["speedup"], 2)
gen = last_json("generate.txt") or {}
print(json.dumps({"gpu": (out / "gpu.txt").read_text().splitlines()[0] if (out / "gpu.txt").exists() else None,
                  "tests": counts, "fsdp_step": last_json("gpu_fsdp_4b.txt") is not None,
                  "stage_decode": {k: gen.get(k) for k in ("decoder", "tokens", "nfe", "tok_s")} if gen else None,
                  "static_graphs_b1": best, "seconds": int(time.time()) - int(sys.argv[2])}))
EOF
