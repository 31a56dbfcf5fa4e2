# Shared set-up of the benchmark driver scripts; sourced (`. benches/lib.sh`), not run.
# It owns what every driver repeats: the cores (PROXY_CPU, LOAD_CPU), the output directory,
# the tool check, the binary to measure, the processes started (killed on exit) and the
# waits for a listener.
#
#   bench_init NAME TOOL...   cd to the repository root, make $OUT absolute (creating it),
#                             and stop with "NAME: TOOL is missing" when a tool is not found
#   bench_binary [PATH]       print PATH, or build the release binary and print its path
#   bench_spawn CMD...        start CMD in the background (output to $OUT/procs.log) and
#                             remember its PID; `bench_cleanup` (also run on exit) kills them
#   wait_port HOST PORT       until HOST:PORT accepts a connection, at most 10 s
#   wait_url URL              until URL answers 2xx, at most 20 s
#   haproxy_head, haproxy_h1, haproxy_h2, haproxy_tcp
#                             the parts of the benches' HAProxy configs (see below)

# The cores: the sidecars under test on PROXY_CPU, the load and the apps on LOAD_CPU.
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}

bench_init() {
  BENCH_NAME=$1
  shift
  cd "$(dirname "${BASH_SOURCE[0]}")/.."
  mkdir -p "$OUT"
  OUT=$(cd "$OUT" && pwd)
  local t
  for t in "$@"; do
    command -v "$t" >/dev/null || { echo "$BENCH_NAME: $t is missing" >&2; exit 1; }
  done
}

bench_binary() {
  if [ -n "${1:-}" ]; then
    echo "$1"
  else
    cargo build --release --quiet --bin sidemesh >&2
    echo "$PWD/target/release/sidemesh"
  fi
}

PIDS=()
bench_spawn() {
  "$@" >>"$OUT/procs.log" 2>&1 &
  PIDS+=($!)
}
bench_cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  PIDS=()
}
trap bench_cleanup EXIT

wait_port() {
  for _ in $(seq 100); do (exec 3<>/dev/tcp/"$1"/"$2") 2>/dev/null && return 0; sleep 0.1; done
  echo "$BENCH_NAME: no listener on $1:$2" >&2
  exit 1
}

wait_url() {
  for _ in $(seq 200); do curl -sf "$1" >/dev/null && return 0; sleep 0.1; done
  echo "$BENCH_NAME: $1 did not answer" >&2
  return 1
}

# haproxy_head: the global and defaults sections every bench's HAProxy config starts with
# (one thread, the same timeouts).
haproxy_head() {
  printf '%s\n' global '  nbthread 1' '  maxconn 8000' defaults '  timeout connect 1s' \
    '  timeout client 30s' '  timeout server 30s'
}

# haproxy_h2 BIND SERVER...: an h2c frontend `h2` on BIND (host:port) in front of a round-robin
# backend `up2` of h2c SERVERs (host:port).
haproxy_h2() {
  printf 'frontend h2\n  mode http\n  bind %s proto h2\n  default_backend up2\n' "$1"
  printf 'backend up2\n  mode http\n  balance roundrobin\n'
  shift
  haproxy_servers u " proto h2" "$@"
}

# haproxy_h1 BIND SERVER...: an HTTP/1.1 frontend `h1` on BIND in front of a round-robin
# backend `up` of SERVERs, its connections to them reused (`http-reuse always`).
haproxy_h1() {
  printf 'frontend h1\n  mode http\n  bind %s\n  default_backend up\n' "$1"
  printf 'backend up\n  mode http\n  balance roundrobin\n  http-reuse always\n'
  shift
  haproxy_servers u "" "$@"
}

# haproxy_tcp NAME BIND SERVER...: a raw TCP proxy NAME on BIND, round robin over SERVERs.
haproxy_tcp() {
  printf 'listen %s\n  mode tcp\n  bind %s\n  balance roundrobin\n' "$1" "$2"
  shift 2
  haproxy_servers s "" "$@"
}

# haproxy_servers PREFIX OPTIONS SERVER...: one `server <PREFIX><n> <SERVER><OPTIONS>` line each.
haproxy_servers() {
  local prefix=$1 options=$2 i=0 s
  shift 2
  for s in "$@"; do
    i=$((i + 1))
    printf '  server %s%d %s%s\n' "$prefix" "$i" "$s" "$options"
  done
}
