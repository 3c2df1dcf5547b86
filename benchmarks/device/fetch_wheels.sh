#!/usr/bin/env bash
# Run here (not on the GPU machine) before the first device call: the GPU machine cannot reach
# PyPI, and its image has transformers 5.17 while this project is tested on 5.23. Downloads the
# two wheels it lacks into .whl/ (ignored by git; carried with `carry: [".whl"]`, about 13 MB).
# Everything else gpu_bench imports is in that image (torch, tokenizers, safetensors,
# huggingface_hub, pyarrow, pillow, numpy: /work/.library/device/KINDS.md).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl transformers==5.23.0 regex==2026.11.19
ls -l .whl
