"""Reuse across runs and once-per-unique-thing within a run: earlier outputs as sources, and the
keyed plan's passes (hash, bucket, plan, distribute, assemble) over files in the run's staging.

Plain pyarrow: never imports Ray (``dataflow.dedup`` schedules these passes as tasks). May import the
top-level ``config``, ``keys``, ``schema`` and ``storage``, and ``commit`` to read committed outputs.
"""
