#!/usr/bin/env bash
# Run E-3SFC on a local Flower deployment: SuperLink + N SuperNodes (+ their SuperExecs)
# as processes on this machine, TLS and SuperNode authentication on, then stop them all.
#
#   scripts/deploy-local.sh [--num-supernodes 3] [--insecure] [KEY=VALUE ...]
#   scripts/deploy-local.sh num-rounds=5 local-epochs=2
#   scripts/deploy-local.sh --help
#
# A thin wrapper around `python -m e3sfc_launch.deploy` (the `e3sfc-deploy` command):
# it uses the project's .venv when there is one (or $PYTHON). Relative output-dir and
# data-root resolve against the directory you run it from; certificates, the private
# FLWR_HOME and process logs go to .flwr-home/deploy (see --workdir).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then
        python="$root/.venv/bin/python"
    else
        python="$(command -v python3)"
    fi
fi
exec "$python" -m e3sfc_launch.deploy "$@"
