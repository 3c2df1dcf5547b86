"""Exactly-once output: work units and the run key, pieces named by their row range, staging,
resume and the commit that readers rely on (``committed_files``).

Plain pyarrow: never imports Ray or Ray Data, so the protocol is testable without a cluster and
its pieces can be written from any task. May import the top-level ``config``, ``schema`` and ``storage``.
"""
