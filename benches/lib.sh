# Shared set-up of the benchmark driver scripts; sourced (`. benches/lib.sh`), not run.
# It owns what every driver repeats: the cores (PROXY_CPU, LOAD_CPU), the output directory,
# the tool check, the binary to measure, the processes started (killed on exit) and the
# waits for a listener.
#
#   bench_init NAME TOOL...   cd to the repository root, make $OUT absolute (creating it),
#                             and stop with "NAME: TOOL is missing" when a tool is not found
#   bench_binary [PATH]       print PATH, or build the release binary and print its path
#   bench_spawn CMD...        start CMD in the background (output to $OUT/procs.log) and
#                             remember its PID (the last is ${PIDS[-1]}); `bench_cleanup`
#                             (also run on exit) kills them
#   bench_spawn_on CPU CMD... the same, CMD pinned to core CPU (taskset execs it: the PID
#                             is CMD's own)
#   wait_port HOST PORT       until HOST:PORT accepts a connection, at most 10 s
#   wait_url URL              until URL answers 2xx, at most 20 s
#   bench_state NS U1 U2 [USE...]
#                             the start of the sidecar benches' state file (see below)
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
bench_spawn_on() {
  local cpu=$1
  shift
  bench_spawn taskset -c "$cpu" "$@"
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

# bench_state NS U1 U2 [USE...]: the start of the state file the drivers give discover, in
# namespace NS: a service `client` that uses `up` (HTTP/1.1, :8080), `up2` (h2c, :8081 to
# the instances' :8082) and `sink` (TCP, :9000), round robin and without retries for HTTP,
# plus the `use_services` entries USE (YAML flow mappings); then those three services, each
# with the instances U1 and U2. The caller appends the services USE names.
bench_state() {
  local ns=$1 u1=$2 u2=$3 use
  shift 3
  cat <<EOF
services:
  - namespace: $ns
    name: client
    use_services:
      - {service: up, balancer: {policy: round_robin}, retry: {attempts: 0}}
      - {service: up2, balancer: {policy: round_robin}, retry: {attempts: 0}}
      - {service: sink, balancer: {policy: round_robin}}
EOF
  for use in "$@"; do echo "      - $use"; done
  cat <<EOF
  - namespace: $ns
    name: up
    ports: [{port: 8080, protocol: http1}]
    instances: [{name: u1, address: $u1}, {name: u2, address: $u2}]
  - namespace: $ns
    name: up2
    ports: [{port: 8081, target_port: 8082, protocol: http2}]
    instances: [{name: u1, address: $u1}, {name: u2, address: $u2}]
  - namespace: $ns
    name: sink
    ports: [{port: 9000, protocol: tcp}]
    instances: [{name: s1, address: $u1}, {name: s2, address: $u2}]
EOF
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
