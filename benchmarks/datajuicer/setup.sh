#!/usr/bin/env bash
# Data-Juicer's own virtual environment, for the third side of benchmarks/cpu_bench.py.
#
#   bash benchmarks/datajuicer/setup.sh            # creates .venv-datajuicer at the repository root
#   bash benchmarks/datajuicer/setup.sh PATH       # or at PATH
#
# Its own venv because py-data-juicer's dependencies (datasets, streamlit, uv, pinned dill and
# multiprocess...) have no place in the project's. torch, transformers and the libraries that
# decide the numbers (tokenizers, safetensors, Pillow, numpy) are pinned to the project's own
# versions through constraints.txt, so both sides run the same kernels on the same checkpoint;
# torch is the 2.13.0 CPU build, never a CUDA one. Data-Juicer installs missing modules at run
# time through uv (its LazyLoader): torch and transformers are installed here so it never does,
# and so are two modules it imports without declaring them (aiohttp; ray, reached when its
# executor is imported).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${1:-$root/.venv-datajuicer}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3

started=$(date +%s)
"$python" -m venv "$venv"
"$venv/bin/pip" install -q -c "$root/constraints.txt" \
    torch==2.13.0 transformers aiohttp ray py-data-juicer==1.6.1
"$venv/bin/python" - <<'PY'
import torch, transformers, data_juicer
from data_juicer.ops.filter.image_text_matching_filter import ImageTextMatchingFilter  # noqa: F401
from data_juicer.core import DefaultExecutor  # noqa: F401  (imports ray: it must be here already)
assert torch.version.cuda is None, f"a CUDA torch was installed: {torch.__version__}"
print(f"data_juicer {data_juicer.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
echo "installed in $(( $(date +%s) - started )) s, $(du -sh "$venv" | cut -f1): $venv/bin/python"
