"""What people read after a run: the run report, the artifacts written beside each commit, the
escaped HTML views shared with notebooks, and threshold calibration against human verdicts.

Reads committed output only through ``commit.output`` (``committed_files``, the manifest); never
imports Ray, and never writes anything but its own ``_``-prefixed artifacts.
"""
