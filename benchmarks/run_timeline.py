"""Where one ``jobs.score`` run's wall time goes, from Ray's own timeline of its tasks and actors.

    python -m benchmarks.run_timeline -- --input CATALOG --output OUT --itm-model CKPT \\
        --caption-model none --device cpu          # any jobs.score arguments after --

Runs ``jobs.score``'s ``main`` in this process (the CLI's own code, its own local Ray), with
``ray.timeline()`` saved just before Ray shuts down, and prints one JSON object of milestones in
seconds from the start: Ray connected, the keyed plan's passes, the scoring actor's constructor
(start and end), each model batch (``submit`` calls on the actor), the run's end and Ray's
shutdown. What lies between two milestones is then plain to read: for example the wait between
the actor being ready and its first batch, which a stage held back by Ray Data's resource budget
once made 1.9 s long (BENCHMARKS.md). Saving the timeline itself takes about a second, before the
shutdown; it is not counted in ``shutdown_s``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time


def _milestones(events: list[dict], t0: float) -> dict:
    spans = sorted(
        (e["ts"] / 1e6 - t0, e["dur"] / 1e6, e["name"]) for e in events if e.get("ph") == "X" and "dur" in e
    )
    batches = [(round(s, 2), round(d, 2)) for s, d, name in spans if name == "submit"]
    # The scoring actor's constructor is the longest __init__ (Ray Data's own actors construct in ms).
    inits = [(s, d) for s, d, name in spans if name == "__init__"]
    actor = max(inits, key=lambda x: x[1]) if inits else None
    out = {"batches": len(batches), "batch_s": [d for _, d in batches]}
    if actor:
        out["actor_init_start_s"], out["actor_init_s"] = round(actor[0], 2), round(actor[1], 2)
    if batches:
        out["first_batch_start_s"] = batches[0][0]
        out["last_batch_end_s"] = round(batches[-1][0] + batches[-1][1], 2)
        if actor:
            out["actor_ready_to_first_batch_s"] = round(batches[0][0] - (actor[0] + actor[1]), 2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeline", help="where to save Ray's timeline (default: a temporary file)")
    parser.add_argument("job", nargs=argparse.REMAINDER, help="jobs.score arguments, after --")
    args = parser.parse_args(argv)
    job = args.job[1:] if args.job[:1] == ["--"] else args.job
    t0 = time.time()
    stamps: dict[str, float] = {}

    def stamp(name: str) -> None:
        stamps[name] = round(time.time() - t0, 2)

    import ray

    import jobs.score
    import pipelines.dataflow.dedup as dedup
    import pipelines.dataflow.runtime as runtime

    stamp("imports_done_s")
    for module, name in ((runtime, "connect"), (dedup, "plan_and_compute"), (dedup, "_compute"), (dedup, "assemble_and_write")):
        original = getattr(module, name)

        @functools.wraps(original)
        def timed(*a, _original=original, _name=name, **k):
            stamp(f"{_name}_start_s")
            try:
                return _original(*a, **k)
            finally:
                stamp(f"{_name}_end_s")

        setattr(module, name, timed)
    timeline = args.timeline or os.path.join(tempfile.mkdtemp(prefix="blip-timeline-"), "timeline.json")
    saved = {}
    shutdown = ray.shutdown

    def save_then_shutdown(*a, **k):
        if ray.is_initialized() and not saved:
            ray.timeline(filename=timeline)
            saved["done"] = True
        started = time.time()
        shutdown(*a, **k)
        stamps.setdefault("shutdown_s", round(time.time() - started, 2))

    ray.shutdown = save_then_shutdown
    code = jobs.score.main(job)
    stamp("main_returned_s")
    save_then_shutdown()
    result = dict(stamps, exit_code=code, timeline=timeline)
    if saved:
        with open(timeline) as f:
            result.update(_milestones(json.load(f), t0))
    print(json.dumps(result, sort_keys=True))  # the last line, after the job's own summary
    return code


if __name__ == "__main__":
    sys.exit(main())
