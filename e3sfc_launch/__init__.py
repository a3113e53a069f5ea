"""Command-line launchers: local simulation (``e3sfc-run``) and process management helpers."""
