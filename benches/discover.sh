#!/usr/bin/env bash
# The discover benchmark: 10,000 services, 100,000 endpoints, 2,000 long-polling clients on
# loopback; times each state change to every affected client (file edit, then registry PUT)
# and reports discover's RSS and CPU. Extra arguments go to the harness, e.g.
#   benches/discover.sh --rounds 10
# Results are recorded in docs/benchmarks.md (## discover).
set -euo pipefail
cd "$(dirname "$0")/.."
# A socket per client on each side, plus discover's own files.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
cargo build --release --quiet -p sidemesh --bin sidemesh -p sidemesh-bench --bin discover_load
for mode in file registry; do
  echo "== mode: $mode"
  target/release/discover_load --sidemesh target/release/sidemesh --mode "$mode" "$@"
done
