"""Failure and recovery on real runs: a driver killed with SIGKILL, a model actor's process killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blip_ops.samples import sample_catalog
from pipelines.config import build_config
from pipelines.run import run_job

ROOT = Path(__file__).resolve().parents[2]


def _processes(match) -> list[int]:
    """PIDs whose command line or environment satisfies ``match`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (entry / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if match(cmdline, environ):
            found.append(int(entry.name))
    return found


def _kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# Ray Data names each pool's actor class after its operator, the steps fused into it included:
# MapWorker(MapBatches(ScoreStage)->MapBatches(flag_batch)...) (Ray 2.60, pinned).
SCORING_ACTOR_CLASS = "MapWorker(MapBatches(ScoreStage)"


def _scoring_actors(ray, state: str = "ALIVE") -> dict[str, dict]:
    """This driver's scoring actors by actor id, from Ray's own actor table.

    Only this job's actors, on this test session's Ray: never another suite's processes that
    happen to run an actor of the same name. (``ray.util.state.list_actors`` needs the
    dashboard, which ``ray_session`` does not start; the GCS table behind it does not. Ray is
    pinned to 2.60.x.)
    """
    from ray._private.state import actors

    job = ray.get_runtime_context().get_job_id()
    return {
        actor_id: actor
        for actor_id, actor in actors().items()
        if actor["JobID"] == job and actor["ActorClassName"].startswith(SCORING_ACTOR_CLASS)
        and (state is None or actor["State"] == state) and actor.get("Pid")
    }


@pytest.fixture(scope="module")
def many_rows(tmp_path_factory):
    """96 rows in 3 files of 4 row groups each, all with unique ids."""
    records = sample_catalog(96, seed=7)
    for index, record in enumerate(records):
        record["id"] = f"row-{index:03d}"
        record.pop("expected", None)
    catalog = tmp_path_factory.mktemp("many") / "catalog"
    catalog.mkdir()
    for index in range(3):
        table = pa.Table.from_pylist(records[index * 32:(index + 1) * 32])
        pq.write_table(table, catalog / f"part-{index}.parquet", row_group_size=8)
    return catalog, records


def _ids(output: Path) -> list[str]:
    return pq.read_table(output, columns=["id"]).column("id").to_pylist()


def _staged_pieces(output: Path) -> list[Path]:
    return list(output.glob("_staging-*/u*.parquet"))


def _score_in_process(command: list[str], capsys) -> subprocess.CompletedProcess:
    """``command`` (``python -m jobs.score ...``) run as ``jobs.score.main``: exit code, stdout, stderr."""
    from jobs import score

    assert command[1:3] == ["-m", "jobs.score"]
    capsys.readouterr()
    code = score.main(command[3:])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(command, code, out.out, out.err)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds Ray's worker processes through /proc")
def test_driver_killed_mid_run_with_reuse_resumes_without_rescoring_or_duplicates(ray_session, tiny_itm, many_rows, tmp_path,
                                                                                  capsys):
    catalog, records = many_rows
    # An earlier committed output holding the first file's rows: the run reuses those and computes the rest.
    source = tmp_path / "earlier"
    run_job(build_config({"input": str(catalog / "part-0.parquet"), "output": str(source), "itm_model": tiny_itm,
                          "caption_model": "none", "device": "cpu"}))
    output = tmp_path / "out"
    command = [
        sys.executable, "-m", "jobs.score", "--input", str(catalog), "--output", str(output),
        "--itm-model", tiny_itm, "--caption-model", "none", "--reuse", str(source),
        "--decode-batch-size", "4", "--score-batch-size", "4", "--json", "--device", "cpu",
    ]
    marker = uuid.uuid4().hex
    env = dict(os.environ, HF_HUB_OFFLINE="1", BLIP_TEST_RUN=marker)
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not _staged_pieces(output) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGKILL)  # the driver, with no chance to clean up
        first.wait(timeout=30)
    finally:
        # The local Ray that driver started would otherwise live on: kill everything it spawned.
        time.sleep(1)
        _kill_all(_processes(lambda cmd, environ: f"BLIP_TEST_RUN={marker}" in environ))
    assert not (output / "_SUCCESS").exists(), "the first run finished before it could be killed; test inconclusive"
    durable = {p.name: p.stat().st_mtime_ns for p in _staged_pieces(output)}
    assert durable
    staged_rows = {row["id"]: row["scored_at"] for piece in _staged_pieces(output)
                   for row in pq.read_table(piece, columns=["id", "scored_at"]).to_pylist()}

    # The reruns in this process, on the session's Ray: only the killed driver needs a process of
    # its own (each rerun as a subprocess cost a Python start and a Ray start, 20-40 s loaded).
    second = _score_in_process(command, capsys)
    assert second.returncode == 0, second.stdout + second.stderr
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["outcome"] == "committed"
    assert summary["resumed_rows"] == sum(int(name.split("-n")[1][:6]) for name in durable) < len(records)

    ids = _ids(output)
    assert sorted(ids) == sorted(r["id"] for r in records)  # every row exactly once
    # Durable pieces were never computed again: the commit merged their rows as they were staged
    # (pipelines.commit.merge rewrites pieces into files of --target-file-mb; rows keep their values).
    table = pq.read_table(output, columns=["id", "run_id", "scores_from_run", "scored_at"])
    committed_at = dict(zip(table.column("id").to_pylist(), table.column("scored_at").to_pylist()))
    assert staged_rows and all(committed_at[key] == at for key, at in staged_rows.items())
    assert set(table.column("run_id").to_pylist()) == {summary["run_id"]}
    earlier = json.loads((source / "_SUCCESS").read_text())["run_id"]
    from_run = dict(zip(table.column("id").to_pylist(), table.column("scores_from_run").to_pylist()))
    assert all(from_run[r["id"]] in (earlier, None) for r in records[:32])  # the first file: all reused
    assert all(from_run[r["id"]] in (summary["run_id"], None) for r in records[32:])
    assert not list(output.glob("_staging-*"))

    third = _score_in_process(command, capsys)
    assert third.returncode == 0 and json.loads(third.stdout.strip().splitlines()[-1])["outcome"] == "already_committed"
    # The reuse sources are part of the run's identity: without them it is another run.
    fourth = _score_in_process([c for c in command if c not in ("--reuse", str(source))], capsys)
    assert fourth.returncode == 2 and "another input or configuration" in fourth.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds Ray's worker processes through /proc")
def test_scoring_actor_killed_mid_run_is_restarted_and_nothing_is_lost(ray_session, tiny_itm, many_rows, tmp_path,
                                                                        monkeypatch):
    from pipelines.dataflow import stages

    catalog, records = many_rows
    output = tmp_path / "out"
    config = build_config({
        "input": str(catalog), "output": str(output), "itm_model": tiny_itm, "caption_model": "none",
        "decode_batch_size": 4, "score_batch_size": 4,
    })
    killed: dict[str, int] = {}
    marker = str(tmp_path / "scorer-killed")
    patience_s = 300  # a bound for a broken test only: on a loaded machine, seconds pass, not minutes

    class ScoreStage(stages.ScoreStage):  # the job's stage, its name kept (the killer finds actors by it)
        """Holds every batch until the scorer has been killed once (a file marks it): on a tiny model
        the actor scores all 96 rows in about a second, so on a busy machine the run could end
        before the killer saw the actor at all. Its restarted successor finds the mark and scores."""

        def __call__(self, *args, **kwargs):
            deadline = time.monotonic() + patience_s
            while not os.path.exists(marker) and time.monotonic() < deadline:
                time.sleep(0.05)
            return super().__call__(*args, **kwargs)

    monkeypatch.setattr(stages, "ScoreStage", ScoreStage)  # pickled by value for Ray's workers

    def kill_scorer_once():
        # The actor is ALIVE once its __init__ (the model load) is done; its rows wait for the kill.
        deadline = time.monotonic() + patience_s
        while time.monotonic() < deadline:
            for actor_id, actor in _scoring_actors(ray_session).items():
                _kill_all([int(actor["Pid"])])  # that one process, found by its actor id
                killed[actor_id] = int(actor["Pid"])
                open(marker, "w").close()
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_scorer_once, daemon=True)
    killer.start()
    summary = run_job(config)
    killer.join(timeout=5)
    assert killed, "no scoring actor was seen mid-run; test inconclusive"
    (actor_id,) = killed
    assert _scoring_actors(ray_session, state=None)[actor_id]["NumRestarts"] >= 1  # Ray restarted that actor
    assert summary.outcome == "committed" and summary.rows_written == len(records)
    assert sorted(_ids(output)) == sorted(r["id"] for r in records)
    assert pq.read_table(output, columns=["status"]).column("status").to_pylist().count("ok") == summary.scored
