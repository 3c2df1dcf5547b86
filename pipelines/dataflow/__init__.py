"""The Ray Data graph: where each stage runs, the stages themselves, the Ray connection and
progress, and warm actors for notebooks.

May import Ray, ``blip_ops``, the top-level contracts and ``commit.pieces`` (the piece writer the
graph's last task calls). Never writes the output directory itself, and never commits.
"""
