#!/usr/bin/env bash
# Run ON the GPU machine, as the device tool's command, with carry: [".whl"]:
#   bash benchmarks/device/run_gpu_bench.sh                   # the main figures (about 200 s)
#   bash benchmarks/device/run_gpu_bench.sh STEP...           # chosen steps (names below)
#   bash benchmarks/device/run_gpu_bench.sh issue17           # issue 17's measurements, one call (at most 560 s: timeout_s 600)
# Each step runs as its own process under its own time limit, so a failure or a timeout in
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
run() {
  case $1 in
    # Against the naive loops, this side at the default batch size, then alone at others.
    scoring) step scoring 120 --skip-captions --sweep-score-batch-sizes 64,512,1024 --decode-processes 15 ;;
    captioning) step captioning 170 --skip-scoring --sweep-caption-batch-sizes 256,512 ;;
    # Decode+resize alone, in threads and in 1 and 16 processes (the pipeline's decode tasks are processes).
    decoding) step decoding 90 --decode-only --decode-processes 16 ;;
    # What the fused (SDPA) vision attention buys: the scorer with transformers' eager attention.
    scoring_eager) step scoring_eager 90 --skip-captions --skip-naive --eager-attention --sweep-score-batch-sizes 512 ;;
    # What pinned staging of the uint8 batch buys: the plain pageable copy.
    scoring_pageable) step scoring_pageable 90 --skip-captions --skip-naive --pageable --sweep-score-batch-sizes 512 ;;
    # Trials: torch.compile on the scorer; a static KV cache, which transformers compiles.
    scoring_compiled) step scoring_compiled 150 --skip-captions --skip-naive --compile --sweep-score-batch-sizes 512 ;;
    captioning_static) step captioning_static 170 --skip-scoring --skip-naive --cache static --captions 1024 --warmup 3 ;;
    captioning_static_512) step captioning_static_512 170 --skip-scoring --skip-naive --cache static --caption-batch-size 512 --captions 2048 ;;
    # What Grad-CAM evidence costs the score stage at full size: --evidence none, flagged (10%), all.
    evidence) local started=$SECONDS
      timeout 150 python3 -m benchmarks.evidence_bench --device cuda --full --batch-size 256 --batches 5 --json > "$OUT/evidence.json" 2> "$OUT/evidence.log"
      echo "== evidence rc=$? in $((SECONDS - started)) s"; tail -c 1200 "$OUT/evidence.log"; cat "$OUT/evidence.json"; echo ;;
    # Issue 17: the stage classes as the job runs them, decode cpu and gpu (nvJPEG), without Ray;
    # the device JPEG decode alone (480x360 -> 384); 15 decode processes for the CPU path's batches.
    # At the job's default batch sizes on a GPU (256 and 256).
    stages) step stages 180 --stages-only --decode-devices cpu,gpu --decode-processes 15 --jpeg-backend torchvision \
      --score-batch-size 256 --caption-batch-size 256 --stage-pairs 8192 --stage-captions 1536 ;;
    # Pixel and score drift of nvJPEG + torch resize against Pillow: fp32 scores, then bf16 on the GPU,
    # at BLIP-base's full width and depth; and torchvision's CPU decoder (libjpeg-turbo) against Pillow.
    drift) local started=$SECONDS
      # nvJPEG, scored in bf16 on the GPU (and the CPU path in fp32 on the CPU for the total); then the
      # CPU torchvision decoder's pixels only.
      for run in "cuda bf16 cuda --mid-width 768 --mid-depth 12" "cpu fp32 cpu --skip-mid"; do set -- $run
        timeout 45 python3 -m benchmarks.decode_drift --backend torchvision --device "$1" --precision "$2" --score-device "$3" \
          "${@:4}" --json > "$OUT/drift_$1_$2.json" 2> "$OUT/drift_$1_$2.log"
        echo "== drift $run rc=$?"; tail -c 600 "$OUT/drift_$1_$2.log"; cat "$OUT/drift_$1_$2.json"; echo
      done; echo "== drift in $((SECONDS - started)) s" ;;
    # The decoder's tests with torchvision and CUDA present (their GPU branch runs only there).
    # (tests/conftest.py needs moto, which is not there: these tests use none of its fixtures)
    jpeg_tests) timeout 40 python3 -m pytest -q --noconftest -p no:cacheprovider tests/blip_ops/test_jpeg_device.py 2>&1 \
      | tail -15 | tee "$OUT/jpeg_tests.txt" ;;
    # The naive loops beside, in the same call, without the batch-size sweeps.
    scoring_naive) step scoring 90 --skip-captions --decode-processes 15 ;;
    captioning_naive) step captioning 120 --skip-scoring --caption-batch-size 256 --captions 1536 --naive-captions 512 ;;
    issue17) for one in jpeg_tests stages drift scoring_naive captioning_naive; do run "$one"; done ;;  # 40+180+90+90+120 s at most
    *) echo "unknown step $1" >&2; return 2 ;;
  esac
}
for name in "${@:-scoring captioning}"; do
  for one in $name; do run "$one"; done
done
