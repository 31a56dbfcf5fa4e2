#!/usr/bin/env bash
# The test command the README gives: installs what the tests need, then runs every test
# (unit, integration, end-to-end). Safe to run again; installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# System tools the tests drive: dig (DNS end-to-end), promtool (metrics format), curl.
need=()
command -v dig >/dev/null 2>&1 || need+=(bind9-dnsutils)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
if [ "${#need[@]}" -gt 0 ]; then
  echo "test.sh: installing ${need[*]}" >&2
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# The end-to-end tests under tests/ run the built binary; cargo builds it for them.
cargo build --workspace --bins --quiet
cargo test --workspace --all-targets "$@"
