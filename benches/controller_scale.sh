#!/usr/bin/env bash
# Controller scale: 10,000 Services with 100,000 endpoints in a fake API server; times
# EndpointSlice changes until they reach a dependent sidecar's config, and records the
# controller's RSS. Results go in docs/benchmarks.md (## controller).
set -euo pipefail
cd "$(dirname "$0")/.."
# Thin LTO-free release build: the fat-LTO profile takes too long on a 2-core machine; say so
# with the figures.
export CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16
cargo build --release -p sidemesh --bin sidemesh -p sidemesh-bench --bin controller_scale
./target/release/controller_scale --sidemesh target/release/sidemesh \
  --namespaces "${NAMESPACES:-100}" --services "${SERVICES:-100}" \
  --endpoints "${ENDPOINTS:-10}" --changes "${CHANGES:-20}"
