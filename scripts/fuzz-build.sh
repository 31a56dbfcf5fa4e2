#!/usr/bin/env bash
# Builds the cargo-fuzz targets with the nightly toolchain, and optionally runs them:
# - discover/api/fuzz: `snapshot` (bytes into Snapshot::from_json);
# - dns/fuzz: `packet` (the shim's request path), `upstream_reply` (the anti-spoofing check);
# - proxy/fuzz: `h1_request`, `h1_response`, `chunked` (HTTP/1.1 heads and body framing of
#   the lean engine), `detect` (protocol sniffing on `auto` ports), `scan` (the hyper
#   path's framing scan).
#
#   scripts/fuzz-build.sh                    build all
#   scripts/fuzz-build.sh SECONDS            build all, then fuzz each target for SECONDS
#   scripts/fuzz-build.sh SECONDS proxy      only the targets of one crate (discover, dns, proxy)
#
# Each run starts from the target's seeds (`<crate>/fuzz/seeds[/<target>]`); new inputs land
# in `<crate>/fuzz/corpus/<target>`, crashes in `<crate>/fuzz/artifacts/<target>` (both
# gitignored). The script stops at the first crash or failed property.
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

seconds=${1:-}
only=${2:-}
# crate directory, targets, extra libFuzzer flags
crates=(
  "discover/api|snapshot|-dict=snapshot.dict -max_len=65536"
  "dns|packet upstream_reply|-max_len=4096"
  "proxy|h1_request h1_response chunked detect scan|-max_len=8192"
)
for entry in "${crates[@]}"; do
  IFS='|' read -r dir targets flags <<<"$entry"
  name=${dir%%/*}
  [ -z "$only" ] || [ "$only" = "$name" ] || continue
  (
    cd "$dir/fuzz"
    for t in $targets; do
      cargo +nightly fuzz build "$t"
    done
    [ -n "$seconds" ] || exit 0
    for t in $targets; do
      seeds=seeds/$t
      [ -d "$seeds" ] || seeds=seeds
      mkdir -p "corpus/$t"
      echo "fuzz-build.sh: $dir $t for ${seconds}s" >&2
      # shellcheck disable=SC2086
      cargo +nightly fuzz run "$t" "corpus/$t" "$seeds" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 $flags
    done
  )
done
