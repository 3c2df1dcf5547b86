"""What Grad-CAM evidence costs the score stage: pairs/s with ``--evidence none``, ``flagged`` and ``all``.

    python -m benchmarks.evidence_bench                    # CPU, BLIP-base layout at width 384, depth 6
    python -m benchmarks.evidence_bench --device cuda --full --batch-size 256   # the GPU machine, BLIP-base

The score stage's model calls alone, in this process, on the same batches: ``none`` is
``BlipScorer.score`` (one vision pass, the ITM and ITC text passes); ``flagged`` is
``score_explained`` explaining the lowest-ITM tenth of each batch (a 10% flag rate, known only
after the ITM pass); ``flagged_itc`` the rows below the batch's 10% ITC quantile, a row-wise
threshold as ``ScoreStage`` passes it (known before ITM, but spread over the chunks); ``all``
explains every row as ``--evidence all`` asks (``Wanted.from_itc``: every chunk's ITM pass records
its graph in fp32); ``all_after_itm`` every row, known only after ITM (a 100% ITM flag rate);
``flagged_full_pass`` and ``all_full_pass`` are flagged and all the way they ran before
2026-12-01, a full text-encoder pass per explained row, timed in the same rounds.
``vision_pass`` times the vision encoder alone: what a separate evidence
stage, which cannot be shipped the image embeddings, would have to run again. Random-weight checkpoints in BLIP-base's layout: the cost depends on
shapes, not on weights. Decoding and Ray are left out: evidence does not change them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TITLES = [
    "a red circle on a white background", "blue running shoes with white laces", "a green triangle",
    "yellow leather handbag with a gold buckle and a long strap", "black phone", "a small wooden chair and a table",
]


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(args) -> dict:
    import numpy as np
    import torch

    from benchmarks.cpu_bench import machine
    from blip_ops.evidence import GradCam

    try:
        from blip_ops.evidence import Wanted
    except ImportError:  # a tree from before Wanted (2026-12-01), for before/after figures: it ignores from_itc
        def Wanted(rule, from_itc=None):  # noqa: N802
            return rule
    from blip_ops.scorer import BlipScorer
    from blip_ops.tiny import build_bench_itm

    if args.smoke:
        width, depth, image_size = 64, 2, 64
    elif args.full:
        width, depth, image_size = 768, 12, 384
    else:
        width, depth, image_size = args.width, args.depth, 384
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = build_bench_itm(directory, width=width, depth=depth, image_size=image_size)
        scorer = BlipScorer.from_pretrained(str(checkpoint), device=args.device, precision=args.precision)
    gradcam = GradCam(scorer.model, scorer.tokenizer)
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, (args.batch_size, 3, image_size, image_size), dtype=np.uint8)
    texts = [TITLES[i % len(TITLES)] for i in range(args.batch_size)]

    def lowest_tenth(itc, itm):
        wanted = np.zeros(len(itm), dtype=bool)
        wanted[np.argsort(itm, kind="stable")[: max(1, round(0.1 * len(itm)))]] = True
        return wanted

    def vision_only():
        # What a separate evidence stage would have to run again (it cannot be shipped the embeddings).
        with torch.inference_mode():
            pixels = scorer.images.to_device_pixel_values(images, args.device)
            scorer.model.vision_model(pixel_values=pixels)

    # A threshold at the tenth-lowest ITC (random weights give near-equal ITC per title, so ties
    # can take the share above a tenth: the JSON says how many rows it picked).
    batch_itc = scorer.score(images, texts)[0]
    itc_tenth = float(np.sort(batch_itc)[max(1, round(0.1 * len(batch_itc))) - 1])

    def below_itc_tenth(itc, itm=None):
        return itc <= itc_tenth

    def every(itc, itm=None):
        return np.ones(len(itc), dtype=bool)

    evidence_s = {}

    def explained(name, wanted):
        def step():
            evidence_s.setdefault(name, []).append(scorer.score_explained(images, texts, wanted, gradcam).evidence_s)
        return step

    steps = {
        "vision_pass": vision_only,
        "none": lambda: scorer.score(images, texts),
        "flagged": explained("flagged", lowest_tenth),
        "flagged_itc": explained("flagged_itc", Wanted(below_itc_tenth, below_itc_tenth)),
        "all": explained("all", Wanted(every, every)),
        "all_after_itm": explained("all_after_itm", every),
    }
    if hasattr(scorer, "reuses_layers"):
        # The path before 2026-12-01 in the same rounds, so before/after share the load: evidence
        # runs its own full text-encoder pass (what half precision still does).
        def full_pass(name, wanted):
            step = explained(name, wanted)

            def run():
                scorer.reuses_layers = lambda gradcam: False
                try:
                    step()
                finally:
                    del scorer.reuses_layers
            return run

        steps["flagged_full_pass"] = full_pass("flagged_full_pass", lowest_tenth)
        steps["all_full_pass"] = full_pass("all_full_pass", Wanted(every, every))
    if args.steps:
        steps = {name: steps[name] for name in ["none"] + [n for n in args.steps.split(",") if n != "none"]}
    load_before = [round(x, 2) for x in os.getloadavg()]
    result = {"pairs_per_s": {}, "s_per_batch": {}}
    for step in steps.values():
        step()  # warm-up
    # Rounds interleave the policies and the median is kept: on a shared machine the load
    # drifts, and timing each policy in its own stretch would charge the drift to one of them.
    # CPU seconds (all of this process's threads) too: on a loaded machine waiting for a core
    # inflates wall time but not CPU time, so the CPU-time ratios are the steadier cost figure.
    times = {name: [] for name in steps}
    cpu_times = {name: [] for name in steps}
    for _ in range(args.batches):
        for name, step in steps.items():
            _sync(args.device)
            started, cpu_started = time.perf_counter(), time.process_time()
            step()
            _sync(args.device)
            times[name].append(time.perf_counter() - started)
            cpu_times[name].append(time.process_time() - cpu_started)
    result["cpu_s_per_batch"] = {}
    for name in steps:
        seconds = float(np.median(times[name]))
        result["s_per_batch"][name] = round(seconds, 4)
        result["pairs_per_s"][name] = round(args.batch_size / seconds, 1)
        result["cpu_s_per_batch"][name] = round(float(np.median(cpu_times[name])), 4)
    none, cpu_none = result["s_per_batch"]["none"], result["cpu_s_per_batch"]["none"]
    result["cost_vs_none"] = {name: round(s / none, 3) for name, s in result["s_per_batch"].items()}
    result["cpu_cost_vs_none"] = {name: round(s / cpu_none, 3) for name, s in result["cpu_s_per_batch"].items()}
    result["pairs_per_s"].pop("vision_pass", None)
    # Seconds score_explained counted as evidence (the timed rounds; a recorded chunk's backward only).
    result["flagged_itc_rows"] = int(below_itc_tenth(batch_itc).sum())
    result["evidence_s_per_batch"] = {name: round(float(np.median(s[1:])), 4) for name, s in evidence_s.items()}
    result.update(
        layout={"width": width, "depth": depth, "image_size": image_size, "explained_layer": gradcam.layer},
        device=args.device, precision=scorer.precision, batch_size=args.batch_size, batches=args.batches,
        threads=torch.get_num_threads(), machine=machine(), load_average_before=load_before,
        load_average_after=[round(x, 2) for x in os.getloadavg()],
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), command=" ".join(["python -m benchmarks.evidence_bench"] + sys.argv[1:]),
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto", help="scoring precision (evidence is fp32 regardless)")
    parser.add_argument("--batch-size", type=int, default=64, help="the score stage's default: 64 on the CPU, 256 on a GPU")
    parser.add_argument("--batches", type=int, default=5, help="timed rounds (the median is reported)")
    parser.add_argument("--width", type=int, default=384, help="hidden size of both towers (BLIP-base: 768)")
    parser.add_argument("--depth", type=int, default=6, help="layers in each tower (BLIP-base: 12)")
    parser.add_argument("--full", action="store_true", help="BLIP-base itself: width 768, depth 12, 384 px")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, for the test")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--steps", default=None, help="comma-separated subset of the steps (none is always timed)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = measure(args)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        for name in result["pairs_per_s"]:
            print(f"{name:13s} {result['pairs_per_s'][name]:9.1f} pairs/s  ({result['cost_vs_none'][name]:.2f}x the time of none)")
        if "vision_pass" in result["cost_vs_none"]:
            print(f"the vision pass alone: {result['cost_vs_none']['vision_pass']:.2f}x the time of none")
        print("CPU time vs none: " + ", ".join(f"{k} {v:.2f}x" for k, v in result["cpu_cost_vs_none"].items()))
        print(f"layout {result['layout']}, {result['device']} {result['precision']}, batch {args.batch_size}, "
              f"{result['threads']} threads, load {result['load_average_before']} -> {result['load_average_after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
