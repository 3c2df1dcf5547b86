#!/usr/bin/env bash
# Run ON the GPU machine, as the device tool's command (about 470 s at most; a 540 s timeout is enough):
#   bash benchmarks/device/run_gpu_bench.sh          with carry: [".whl"]
# Each workload runs as its own process under its own time limit, so a failure or a timeout in
# one still returns the others' figures. Everything lands in $OUT (JSON plus the full logs).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-bench-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, transformers, PIL, pyarrow; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); print('transformers', transformers.__version__, 'pillow', PIL.__version__, 'pyarrow', pyarrow.__version__)"
} 2>&1 | tee "$OUT/environment.txt"

step() {  # name, seconds, gpu_bench arguments...
  local name=$1 limit=$2; shift 2
  local started=$SECONDS
  timeout "$limit" python3 -m benchmarks.gpu_bench --json "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"
  echo "== $name rc=$? in $((SECONDS - started)) s: $*"; tail -c 1200 "$OUT/$name.log"; cat "$OUT/$name.json"; echo
}
# Scoring against the naive loop at batch 256, then this side alone at other batch sizes.
step scoring 120 --skip-captions --sweep-score-batch-sizes 64,512,1024
# Captioning (dynamic KV cache) against naive generate at batch 128, then this side at 256 and 512.
step captioning 170 --skip-scoring --sweep-caption-batch-sizes 256,512
# The open question: does a static KV cache with torch.compile (transformers compiles the
# decoding step when the cache is static) pay off? Same batch size as the dynamic run above.
step captioning_static 170 --skip-scoring --skip-naive --cache static --captions 1024 --warmup 3
