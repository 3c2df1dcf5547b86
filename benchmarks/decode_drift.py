"""``--decode-device gpu``'s pixels and scores against the CPU path's (Pillow decode and resize).

    python -m benchmarks.decode_drift                           # here: the Pillow stand-in backend on the CPU
    python -m benchmarks.decode_drift --backend torchvision --device cuda   # on a GPU machine: nvJPEG

Photo-like JPEGs (``benchmarks.samples.photo``: gradients, shapes, sensor-like noise,
quality 90; 480x360 by default, as the GPU goal states, and a few 1600x1200 ones) are decoded and
resized both ways to BLIP ITM's 384 px and BLIP-2's 224 px. Reported: mean and largest absolute
pixel difference (0..255 levels); then both pixel sets are scored in fp32 with the same
random-weight checkpoints (the tiny test model redrawn at unit gain, and the BLIP-base layout at
half width and depth), and the mean and largest ITC and ITM differences reported. The device path
is opt-in while the largest score difference is above the bf16 noise measured on the H200
(0.0034, BENCHMARKS.md).

On the CPU with ``--backend pil`` the decode is Pillow's own (libjpeg-turbo), so what is measured
is the resize alone (torch's antialiased bicubic against Pillow's); torchvision's CPU decoder is
libjpeg-turbo too. nvJPEG's decode differs more (no fancy chroma upsampling): that needs the GPU.
Random weights say how far scores move for a given pixel change in a network of this shape, not
what a trained checkpoint does; the real checkpoints are not available here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BF16_NOISE = 0.0034  # largest bf16-vs-fp32 score difference on the H200 (BENCHMARKS.md)


def images(count: int, large: int, seed: int = 0) -> list[bytes]:
    from benchmarks.samples import photo

    return [photo(480, 360, seed + i) for i in range(count)] + [photo(1600, 1200, seed + 1000 + i) for i in range(large)]


def pixel_pairs(blobs: list[bytes], resize, backend: str, device: str) -> tuple[np.ndarray, np.ndarray]:
    """(CPU path, device path) uint8 ``(n, 3, h, w)`` arrays."""
    from blip_ops.images import decode_rgb
    from blip_ops.jpeg_device import DeviceJpegDecoder, sniff_jpeg

    cpu = np.stack([resize.resize(decode_rgb(b)) for b in blobs])
    decoded = DeviceJpegDecoder(resize, device, backend).decode(blobs, [sniff_jpeg(b) for b in blobs])
    if any(decoded.errors) or decoded.on_device != len(blobs):
        raise RuntimeError(f"device decoder refused rows: {decoded.errors}")
    return cpu, decoded.pixels.cpu().numpy()


def pixel_drift(cpu: np.ndarray, device: np.ndarray) -> dict:
    difference = np.abs(cpu.astype(np.int16) - device.astype(np.int16))
    return {
        "mean_abs_levels": round(float(difference.mean()), 4),
        "max_abs_levels": int(difference.max()),
        "share_over_2_levels": round(float((difference > 2).mean()), 5),
    }


def score_drift(checkpoint: str, blobs: list[bytes], backend: str, device: str, texts: list[str],
                score_device: str = "cpu", precision: str = "fp32") -> dict:
    """Scores of the device path's pixels against the CPU path's, both at ``precision`` on
    ``score_device``; with a half precision, also the CPU path in fp32 on the CPU against the device
    path in ``precision`` (all a GPU run changes at once)."""
    from blip_ops.scorer import BlipScorer

    scorer = BlipScorer.from_pretrained(checkpoint, device=score_device, precision=precision)
    cpu, dev = pixel_pairs(blobs, scorer.images.resizer, backend, device)
    itc_a, itm_a, _ = scorer.score(cpu, texts)
    itc_b, itm_b, _ = scorer.score(dev, texts)
    itc, itm = np.abs(itc_a - itc_b), np.abs(itm_a - itm_b)
    largest = float(max(itc.max(), itm.max()))
    extra = {}
    if scorer.precision != "fp32" or score_device != "cpu":
        reference = BlipScorer.from_pretrained(checkpoint, device="cpu", precision="fp32")
        itc_r, itm_r, _ = reference.score(cpu, texts)
        extra = {"vs_fp32_cpu_path_itc_max_abs": float(f"{np.abs(itc_b - itc_r).max():.3g}"),
                 "vs_fp32_cpu_path_itm_max_abs": float(f"{np.abs(itm_b - itm_r).max():.3g}"),
                 "same_precision_cpu_pixels_vs_fp32_itc_max_abs": float(f"{np.abs(itc_a - itc_r).max():.3g}"),
                 "same_precision_cpu_pixels_vs_fp32_itm_max_abs": float(f"{np.abs(itm_a - itm_r).max():.3g}")}
    return extra | {
        "precision": scorer.precision, "score_device": score_device,
        "pixels": pixel_drift(cpu, dev),
        "itc_mean_abs": float(f"{itc.mean():.3g}"), "itc_max_abs": float(f"{itc.max():.3g}"),
        "itm_mean_abs": float(f"{itm.mean():.3g}"), "itm_max_abs": float(f"{itm.max():.3g}"),
        "itc_spread": round(float(itc_a.std()), 4), "itm_spread": round(float(itm_a.std()), 4),
        "below_bf16_noise": largest < BF16_NOISE,
    }


def _unit_gain(directory: Path) -> Path:
    """Redrawn at unit gain, as the tiny test model is: at the default init (std 0.02) a random BLIP's
    scores hardly depend on the image (a spread of 0.001 over these photos), so no drift could show."""
    from transformers import BlipForImageTextRetrieval

    from blip_ops.tiny import _redraw_at_unit_gain

    model = BlipForImageTextRetrieval.from_pretrained(directory).eval()
    _redraw_at_unit_gain(model, seed=0)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="480x360 photos")
    parser.add_argument("--large", type=int, default=4, help="1600x1200 photos")
    parser.add_argument("--backend", default="pil", choices=("pil", "torchvision"))
    parser.add_argument("--device", default="cpu", help="where the device path decodes (cuda on a GPU machine)")
    parser.add_argument("--skip-mid", action="store_true", help="only the tiny checkpoint (the mid one takes a minute here)")
    parser.add_argument("--score-device", default="cpu", help="where the scores are computed (cuda for bf16 on a GPU)")
    parser.add_argument("--precision", default="fp32", help="fp32 | bf16 | fp16 | auto for the scores")
    parser.add_argument("--mid-width", type=int, default=384, help="the BLIP-base-layout checkpoint's width (768: BLIP-base)")
    parser.add_argument("--mid-depth", type=int, default=6, help="its depth (12: BLIP-base)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from blip_ops.preprocess import Resize
    from blip_ops.tiny import build_bench_itm, build_tiny_itm

    started = time.perf_counter()
    blobs = images(args.images, args.large)
    texts = [f"a photo of {i} coloured discs on a gradient" for i in range(len(blobs))]
    result = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "backend": args.backend, "device": args.device, "images": {"480x360": args.images, "1600x1200": args.large},
        "pixels_384": pixel_drift(*pixel_pairs(blobs, Resize(384, 384, 3), args.backend, args.device)),
        "pixels_224": pixel_drift(*pixel_pairs(blobs, Resize(224, 224, 3), args.backend, args.device)),
    }
    with tempfile.TemporaryDirectory() as tmp:
        scoring = {"score_device": args.score_device, "precision": args.precision}
        result["scores_tiny"] = score_drift(str(build_tiny_itm(Path(tmp) / "tiny")), blobs, args.backend, args.device, texts, **scoring)
        if not args.skip_mid:
            # BLIP-base layout at 384 px (by default half its width and depth)
            mid = _unit_gain(build_bench_itm(Path(tmp) / "mid", width=args.mid_width, depth=args.mid_depth))
            result["scores_mid"] = score_drift(str(mid), blobs, args.backend, args.device, texts, **scoring)
            result["mid"] = {"width": args.mid_width, "depth": args.mid_depth}
    result["bf16_noise"] = BF16_NOISE
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=None if args.json else 2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
