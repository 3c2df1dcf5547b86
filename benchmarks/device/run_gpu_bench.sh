#!/usr/bin/env bash
# Run ON the GPU machine, as the device tool's command (a 540 s timeout leaves time to rerun):
#   bash benchmarks/device/run_gpu_bench.sh          with carry: [".whl"]
# Scoring and captioning run as two processes, so a failure or the time limit in the second
# still returns the first's figures. Everything lands in $OUT (JSON plus the full logs).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-bench-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, transformers, PIL, pyarrow; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); print('transformers', transformers.__version__, 'pillow', PIL.__version__, 'pyarrow', pyarrow.__version__)"
} 2>&1 | tee "$OUT/environment.txt"
timeout 240 python3 -m benchmarks.gpu_bench --skip-captions --json > "$OUT/scoring.json" 2> "$OUT/scoring.log"
echo "scoring rc=$?"; tail -c 1500 "$OUT/scoring.log"; cat "$OUT/scoring.json"
timeout 240 python3 -m benchmarks.gpu_bench --skip-scoring --json > "$OUT/captioning.json" 2> "$OUT/captioning.log"
echo "captioning rc=$?"; tail -c 1500 "$OUT/captioning.log"; cat "$OUT/captioning.json"
