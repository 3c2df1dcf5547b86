"""What ``--labels`` costs the score stage: its model calls without labels, with 1,000 names (top_k 3,
5 policies of 2 prompts) and with 10,000 names; the once-per-actor label pass and its memory.

    python -m benchmarks.labels_bench                 # CPU, the CPU benchmark's mid-size checkpoint
    python -m benchmarks.labels_bench --smoke         # tiny shapes (the test)

The score stage's model work alone, in this process, on the same batch: ``none`` is
``BlipScorer.score`` (one vision pass, the ITC and ITM text passes); ``labels_1k`` and ``labels_10k``
are ``score_keeping_embeds`` plus ``Labeller.label`` on that pass's image embeddings, half the rows
declaring a category (as a catalog does), each row's prompts packed into one ITM sequence (the
default); ``labels_1k_per_row`` is one ITM call per row instead (``packed=False``); ``labels_1k_gated`` adds an ITC gate per policy (ITM only
for a tenth of the rows, ``policies[].itc_gate``); ``labels_1k_unshared`` (``--unshared``) is ``labels_1k_per_row`` with each prompt
projecting the image's cross-attention keys and values itself (``_OnceForAll`` off), to show what
sharing them saves. Rounds interleave the steps and the median is kept; CPU seconds too (on a loaded
machine they are the steadier ratio). Memory: the process's resident set before and after each
``Labeller`` is built (what an actor holds for its taxonomy). Random weights in BLIP-base's layout
at width 384, depth 6, 384 px (as ``cpu_bench``): the cost depends on shapes, not on weights; names
and prompts use the checkpoint's small vocabulary, about 10 tokens a prompt.
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

WORDS = ("red green blue yellow black white small large shoe shirt phone chair table cup car house tree dog cat "
         "circle square triangle stripes dots").split()
TITLES = ["a red circle on a white background", "blue running shoes", "a green triangle", "a black phone"]
POLICIES = [(f"policy{p}", [f"a photo of a {WORDS[p]} {WORDS[8 + p]}", f"a {WORDS[p + 1]} {WORDS[12 + p]} with stripes"])
            for p in range(5)]


def names(count: int) -> list[str]:
    out = []
    for i in range(count):
        a, b = WORDS[i % len(WORDS)], WORDS[(i // len(WORDS)) % len(WORDS)]
        out.append(f"{a} {b} {i}")
    return out


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(args) -> dict:
    import numpy as np
    import torch

    import blip_ops.labels as L
    from benchmarks.cpu_bench import machine
    from blip_ops.scorer import BlipScorer
    from blip_ops.tiny import build_bench_itm

    width, depth, image_size = (64, 2, 64) if args.smoke else (args.width, args.depth, 384)
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = build_bench_itm(directory, width=width, depth=depth, image_size=image_size)
        scorer = BlipScorer.from_pretrained(str(checkpoint), device="cpu", chunk_workers=args.chunk_workers)
    if args.chunk_workers > 1:
        torch.set_num_threads(1)  # as ScoreStage does for an actor with that many cores
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, (args.batch_size, 3, image_size, image_size), dtype=np.uint8)
    texts = [TITLES[i % len(TITLES)] for i in range(args.batch_size)]
    memory, setup_s, labellers = {}, {}, {}
    sizes = (("1k", args.names),) if args.no_10k else (("1k", args.names), ("10k", args.names * 10))
    for label, count in sizes:
        taxonomy = names(count)
        before = rss_mb()
        labeller = L.Labeller(scorer, taxonomy, [f"a picture of {n}" for n in taxonomy], 3, POLICIES)
        memory[label] = {"rss_before_mb": round(before, 1), "rss_after_mb": round(rss_mb(), 1),
                         "text_features_mb": round(labeller.category_feats.numel() * 4 / 2**20, 2)}
        setup_s[label] = round(labeller.setup_s, 3)
        labellers[label] = (labeller, [None if i % 2 else int(rng.randint(count)) for i in range(args.batch_size)])

    def labelled(label: str):
        def step():
            _, _, _, embeds = scorer.score_keeping_embeds(images, texts)
            labeller, declared = labellers[label]
            labeller.label(embeds, declared)
        return step

    def unshared():
        L._OnceForAll.enabled = False
        try:
            labelled("1k_per_row")()
        finally:
            L._OnceForAll.enabled = True

    # An ITC gate per policy at the 90th percentile of its best prompt's ITC over the batch: about a
    # tenth of (row, policy) pairs run ITM, as a catalog where policy hits are rare would.
    _, _, _, embeds = scorer.score_keeping_embeds(images, texts)
    with torch.inference_mode():
        feats = torch.nn.functional.normalize(scorer.model.vision_proj(embeds[:, 0, :]).float(), dim=-1)
        policy_itc = (feats @ labellers["1k"][0].policy_feats.T).numpy()
    of = labellers["1k"][0].policy_of
    gates = [float(np.quantile(policy_itc[:, of == p].max(axis=1), 0.9)) for p in range(len(POLICIES))]
    taxonomy = names(args.names)
    labellers["1k_gated"] = (L.Labeller(scorer, taxonomy, [f"a picture of {n}" for n in taxonomy], 3, POLICIES, gates),
                             labellers["1k"][1])
    labellers["1k_per_row"] = (L.Labeller(scorer, taxonomy, [f"a picture of {n}" for n in taxonomy], 3, POLICIES, packed=False),
                               labellers["1k"][1])
    steps = {"none": lambda: scorer.score(images, texts), "labels_1k": labelled("1k"), "labels_1k_gated": labelled("1k_gated"),
             "labels_1k_per_row": labelled("1k_per_row")}
    if args.unshared:
        steps["labels_1k_unshared"] = unshared
    if not args.no_10k:
        steps["labels_10k"] = labelled("10k")
    load_before = [round(x, 2) for x in os.getloadavg()]
    for step in steps.values():
        step()  # warm-up
    times = {name: [] for name in steps}
    cpu_times = {name: [] for name in steps}
    for _ in range(args.batches):
        for name, step in steps.items():
            started, cpu_started = time.perf_counter(), time.process_time()
            step()
            times[name].append(time.perf_counter() - started)
            cpu_times[name].append(time.process_time() - cpu_started)
    s = {name: float(np.median(v)) for name, v in times.items()}
    cpu = {name: float(np.median(v)) for name, v in cpu_times.items()}
    return {
        "s_per_batch": {k: round(v, 4) for k, v in s.items()},
        "cpu_s_per_batch": {k: round(v, 4) for k, v in cpu.items()},
        "cost_vs_none": {k: round(v / s["none"], 3) for k, v in s.items()},
        "cpu_cost_vs_none": {k: round(v / cpu["none"], 3) for k, v in cpu.items()},
        "label_pass_s": setup_s, "memory": memory,
        "names": {"1k": args.names, "10k": None if args.no_10k else args.names * 10}, "itc_gates_1k_gated": gates, "top_k": 3, "policies": len(POLICIES), "prompts_per_policy": 2,
        "layout": {"width": width, "depth": depth, "image_size": image_size}, "batch_size": args.batch_size,
        "batches": args.batches, "chunk_workers": args.chunk_workers, "threads": torch.get_num_threads(),
        "machine": machine(), "load_average_before": load_before, "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python -m benchmarks.labels_bench"] + sys.argv[1:]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64, help="the score stage's CPU default")
    parser.add_argument("--batches", type=int, default=3, help="timed rounds (the median is reported)")
    parser.add_argument("--names", type=int, default=1000, help="the small taxonomy (the large one is 10x)")
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--chunk-workers", type=int, default=2, help="a 2-core score actor's chunks side by side")
    parser.add_argument("--unshared", action="store_true", help="also time per-row calls without shared image keys/values")
    parser.add_argument("--no-10k", action="store_true", help="leave out the 10,000-name taxonomy (its label pass is minutes)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, for the test")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = measure(args)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        for name in result["s_per_batch"]:
            print(f"{name:20s} {result['s_per_batch'][name]:8.3f} s/batch  {result['cost_vs_none'][name]:.2f}x wall, "
                  f"{result['cpu_cost_vs_none'][name]:.2f}x CPU")
        print(f"label pass (once per actor): {result['label_pass_s']}; memory {result['memory']}")
        print(f"load {result['load_average_before']} -> {result['load_average_after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
