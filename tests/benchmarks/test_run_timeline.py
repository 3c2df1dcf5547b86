"""The run timeline's milestones, from a synthetic Ray timeline (a real run would shut down the
test session's Ray: benchmarks.run_timeline is run by hand, BENCHMARKS.md)."""

from benchmarks.run_timeline import _milestones


def _span(name, start, duration, t0=1000.0):
    return {"ph": "X", "name": name, "ts": (t0 + start) * 1e6, "dur": duration * 1e6}


def test_milestones_find_the_scoring_actor_and_its_batches():
    events = [
        _span("__init__", 4.7, 0.01),  # Ray Data's own actors construct in milliseconds
        _span("__init__", 6.0, 3.5),  # the scoring actor
        _span("submit", 9.6, 7.5),
        _span("submit", 17.1, 7.4),
        _span("ray.data._internal.execution.operators.map_operator._map_task", 7.0, 0.2),
        {"ph": "i", "name": "marker", "ts": 1005e6},
    ]
    m = _milestones(events, 1000.0)
    assert (m["actor_init_start_s"], m["actor_init_s"]) == (6.0, 3.5)
    assert m["batches"] == 2 and m["batch_s"] == [7.5, 7.4]
    assert m["first_batch_start_s"] == 9.6 and m["last_batch_end_s"] == 24.5
    assert m["actor_ready_to_first_batch_s"] == 0.1


def test_a_run_with_no_model_batch_has_no_batch_milestones():
    assert _milestones([_span("_identities", 3.0, 0.1)], 1000.0) == {"batches": 0, "batch_s": []}
