"""The benchmarks: one script per question, each ``measure``-ing data and ``render``-ing it
through :mod:`bench.report`; shared measurement helpers in :mod:`bench.common`.

Run from the repository root as ``.venv/bin/python bench/<script>.py`` (the editable
install puts the repository on ``sys.path``) or ``python -m bench.<script>``.
"""
