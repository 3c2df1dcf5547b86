"""The job around the models: config, preflight and the one orchestrator, with one room per concern.

- top level: the contracts every room shares (``config``, ``schema``, ``storage``), the checks
  before anything loads (``preflight``) and ``run.run_job``, the only module that imports all rooms;
- ``dataflow/``: the Ray Data graph and the model actors;
- ``commit/``: exactly-once output (work units, pieces, staging, commit);
- ``review/``: what people read after a run (report, run artifacts, HTML views, calibration).

No room imports ``run`` or ``preflight`` at run time; ``blip_ops`` below them never imports Ray.
"""
