"""cpu_bench --defaults reads the job's steady rate from its progress lines."""

from benchmarks.cpu_bench import steady_rate

STDERR = """\
2026-12-01 10:00:00 progress: 0/1000 rows scored (0%), 0.0 rows/s
2026-12-01 10:00:05 progress: 0/1000 rows scored (0%), 0.0 rows/s
2026-12-01 10:00:10 progress: 64/1000 rows scored (6%), 6.4 rows/s
2026-12-01 10:00:20 progress: 128/1000 rows scored (13%), 6.4 rows/s
2026-12-01 10:01:10 progress: 1000/1000 rows scored (100%), 14.3 rows/s
2026-12-01 10:01:11 done: 1000 rows scored in 1m11s (14.1 rows/s)
"""


def test_steady_rate_starts_at_the_first_scored_rows():
    steady = steady_rate(STDERR)
    assert steady == {"first_rows_after_s": 10.0, "rows": 936, "seconds": 60.0, "pairs_per_s": 15.6}
    assert steady_rate("2026-12-01 10:00:00 progress: 0/10 rows scored (0%), 0.0 rows/s\n") is None


def test_the_catalog_repeats_pairs_unless_distinct(tmp_path):
    # The default catalog's repetition is what dedup collapses; --distinct must leave it nothing.
    import pyarrow.parquet as pq

    from benchmarks.cpu_bench import write_catalog

    def pairs(directory):
        table = pq.read_table(directory)
        return len(set(zip(table.column("image").to_pylist(), table.column("text").to_pylist())))

    assert pairs(write_catalog(tmp_path / "a", 200, rows_per_group=32)) <= 48
    assert pairs(write_catalog(tmp_path / "b", 200, rows_per_group=32, distinct=True)) == 200
