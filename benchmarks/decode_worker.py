"""What one decode worker costs: its first batch (imports included), then each batch, and its peak memory.

    python -m benchmarks.decode_worker

Each case runs in a fresh Python process, as a Ray worker would: import the stage module,
decode 16 JPEGs (480x360) to uint8 at 384 px, then 10 more batches. ``pillow`` is how
decode workers run (the checkpoint's resize read from its config files, no torch);
``transformers`` loads the checkpoint's image processor through transformers first, which
is what every decode worker did before (and still does where the files do not state a plain
BLIP resize). Both produce the same pixels (tests/blip_ops/test_preprocess.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = """
import json, sys, time
started = time.perf_counter()
import pyarrow as pa
from pipelines.dataflow.stages import decode_batch
from blip_ops.samples import draw_shape
if {load_processor}:
    from blip_ops.checkpoints import load_image_processor
    load_image_processor({checkpoint!r})
batch = pa.table({{"text": ["a red square"] * 16, "image": [draw_shape("red", "square", size=(480, 360))] * 16}})
kwargs = dict(text_column="text", image_column="image", from_uri=False, score_model={checkpoint!r}, caption_model=None)
decode_batch(batch, **kwargs)
first = time.perf_counter() - started
started = time.perf_counter()
for _ in range(10):
    decode_batch(batch, **kwargs)
print(json.dumps({{
    "first_batch_s": round(first, 2),
    "ms_per_batch_of_16": round((time.perf_counter() - started) * 100, 1),
    # VmHWM, not ru_maxrss: on Linux the latter keeps the high-water mark of the process that forked this one.
    "peak_rss_mib": round(int([l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]) / 1024),
    "imports_torch": "torch" in sys.modules,
}}))
"""


def measure(checkpoint: str, load_processor: bool) -> dict:
    script = WORKER.format(checkpoint=checkpoint, load_processor=load_processor)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    from blip_ops.tiny import bench_itm_processor

    checkpoint = tempfile.mkdtemp(prefix="decode-worker-")
    bench_itm_processor(384).save_pretrained(checkpoint)
    for name, load_processor in (("pillow", False), ("transformers", True), ("pillow", False), ("transformers", True)):
        print(name, json.dumps(measure(checkpoint, load_processor)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
