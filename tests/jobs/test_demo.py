import pyarrow.parquet as pq

from jobs import demo


def test_demo_runs_on_tiny_models_and_says_so(ray_session, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "_cached", lambda hub_id: False)
    assert demo.main(["--workdir", str(tmp_path), "--rows", "12"]) == 0
    captured = capsys.readouterr()
    assert "RANDOM-WEIGHT" in captured.err
    # A quiet terminal: the job's lines, not Ray's or transformers' chatter (issue 13).
    for chatter in ("Loading weights", "Writing model shards", "Starting execution of Dataset", "Token authentication is enabled"):
        assert chatter not in captured.err + captured.out
    assert "read 12 rows" in captured.out and "flagged rows" in captured.out
    table = pq.read_table(tmp_path / "scored")
    assert table.num_rows == 12
    assert set(table.column("status").to_pylist()) == {"ok", "image_error", "text_error"}
