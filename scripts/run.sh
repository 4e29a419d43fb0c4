#!/usr/bin/env bash
# Builds legate and runs it; with no arguments on its built-in config (http://127.0.0.1:8080).
# Any arguments go to legate, e.g. scripts/run.sh -c conf/front-door.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec cargo run --release --quiet -- "$@"
