#!/usr/bin/env bash
# Builds the cargo-fuzz target of the DISCOVER_URL contract (discover/api/fuzz, target
# `snapshot`: bytes into Snapshot::from_json) with the nightly toolchain.
#
#   scripts/fuzz-build.sh          build only
#   scripts/fuzz-build.sh SECONDS  build, then fuzz for SECONDS (new inputs land in
#                                  discover/api/fuzz/corpus/snapshot, crashes in artifacts/)
set -euo pipefail
cd "$(dirname "$0")/.."

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz-build.sh: the nightly toolchain is missing (rustup toolchain install nightly)" >&2
  exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz-build.sh: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi

cd discover/api/fuzz
cargo +nightly fuzz build snapshot

if [ "$#" -gt 0 ]; then
  seconds="$1"
  mkdir -p corpus/snapshot
  cargo +nightly fuzz run snapshot corpus/snapshot seeds -- \
    -max_total_time="$seconds" -dict=snapshot.dict -max_len=65536 -timeout=10 -rss_limit_mb=2048
fi
