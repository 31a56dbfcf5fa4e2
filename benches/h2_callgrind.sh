#!/usr/bin/env bash
# Cost per h2c request of the sidecar (and of HAProxy doing the same job), in the shape of
# benches/proxy.sh's h2c row (h2load -c10 -m32, an outbound `protocol: http2` port in front
# of two h2c demo backends, one worker): counted the ways that hold while other builds
# load the machine.
#
#   benches/h2_callgrind.sh                       # builds and measures target/release/sidemesh
#   BIN=/tmp/sidemesh-old benches/h2_callgrind.sh # measures another binary (before/after)
#   N=20000 benches/h2_callgrind.sh               # requests counted (after 4,000 of warm-up)
#   NET=127.85 benches/h2_callgrind.sh            # addresses in 127.85.0.0/16 (the default)
#   MODE=cpu benches/h2_callgrind.sh              # no valgrind: CPU seconds (user + system,
#                                                 # /proc/PID/stat) per 100k requests, and
#                                                 # read/write calls (/proc/PID/io) per request
#   MODE=strace benches/h2_callgrind.sh           # syscalls per request (strace -c -f)
#   PROXY=haproxy benches/h2_callgrind.sh         # HAProxy (nbthread 1, proto h2 upstream)
#
# callgrind: user-space instructions of the whole proxy process (runtime, timers, syscall
# wrappers included; the kernel not), instrumentation on only while the N requests run.
# Needs: valgrind, h2load (nghttp2-client), python3, curl; strace for MODE=strace; haproxy
# for PROXY=haproxy. Output in bench-results/h2_callgrind/.
set -euo pipefail
OUT=${OUT:-bench-results/h2_callgrind}
. "$(dirname "$0")/lib.sh"
MODE=${MODE:-callgrind}
PROXY=${PROXY:-sidemesh}
tools=(h2load python3 curl)
case $MODE in callgrind) tools+=(valgrind callgrind_control) ;; strace) tools+=(strace) ;; esac
[ "$PROXY" = haproxy ] && tools+=(haproxy)
bench_init h2_callgrind "${tools[@]}"
BIN=$(bench_binary "${BIN:-}")
N=${N:-20000}
NET=${NET:-127.85}

U1=$NET.0.11 U2=$NET.0.12
for hp in $U1/8080 $U2/8080 $NET.0.1/7070 $NET.0.20/15000 $NET.0.2/8081; do
  if (exec 3<>/dev/tcp/"${hp%/*}"/"${hp#*/}") 2>/dev/null; then
    echo "h2_callgrind: ${hp%/*}:${hp#*/} is in use; pick another NET" >&2
    exit 1
  fi
done
on_load() { taskset -c "$LOAD_CPU" "$@"; }
bench_spawn taskset -c "$LOAD_CPU" "$BIN" demo-backend --listen $U1:8080 --name u1
bench_spawn taskset -c "$LOAD_CPU" "$BIN" demo-backend --listen $U2:8080 --name u2
wait_port $U1 8080
wait_port $U2 8080

WRAP=()
if [ "$MODE" = callgrind ]; then
  WRAP=(valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT/callgrind.out.%p")
  rm -f "$OUT"/callgrind.out.*
fi
if [ "$PROXY" = haproxy ]; then
  { haproxy_head; haproxy_h2 $NET.0.2:8081 $U1:8080 $U2:8080; } >"$OUT/haproxy.cfg"
  bench_spawn taskset -c "$PROXY_CPU" "${WRAP[@]}" haproxy -db -f "$OUT/haproxy.cfg"
  ADDR=$NET.0.2
  wait_port "$ADDR" 8081
else
  cat >"$OUT/state.yaml" <<EOT
services:
  - {namespace: bench, name: client, use_services: [{service: up2, balancer: {policy: round_robin}, retry: {attempts: 0}}]}
  - {namespace: bench, name: up2, ports: [{port: 8081, target_port: 8080, protocol: http2}], instances: [{name: u1, address: $U1}, {name: u2, address: $U2}]}
EOT
  bench_spawn taskset -c "$LOAD_CPU" "$BIN" discover --state "$OUT/state.yaml" --listen $NET.0.1:7070
  wait_port $NET.0.1 7070
  # taskset, env and valgrind exec what they run: the PID is the sidecar's.
  bench_spawn taskset -c "$PROXY_CPU" env RUST_LOG=warn "${WRAP[@]}" "$BIN" --worker-threads 1 proxy \
    --admin $NET.0.20:15000 --inbound-address $NET.0.20 \
    --discover-url http://$NET.0.1:7070/v1/sidecars/bench/client/sidemesh-proxy
  wait_url http://$NET.0.20:15000/ready
  ADDR=$(curl -s http://$NET.0.1:7070/v1/sidecars/bench/client/sidemesh-proxy |
    python3 -c "import json,sys; print([s['address'] for s in json.load(sys.stdin)['outbound'] if s['name']=='up2'][0])")
  wait_port "$ADDR" 8081
fi
P=${PIDS[-1]}
load() { on_load h2load -c10 -m32 -n"$1" "http://$ADDR:8081/" | grep -E "^requests:"; }

# Warm up (upstream connections, lazily resolved metrics, buffers), then count.
load 4000 >/dev/null
case $MODE in
  callgrind)
    callgrind_control -i on "$P" >/dev/null 2>&1
    load "$N"
    callgrind_control -d h2c "$P" >/dev/null 2>&1
    callgrind_control -i off "$P" >/dev/null 2>&1
    ir=$(awk '/^(summary|totals):/ {print $2; exit}' "$OUT/callgrind.out.$P.1")
    python3 -c "print(f'$PROXY h2c: {$ir} instructions for {$N} requests = {$ir / $N:.0f} per request')"
    ;;
  cpu)
    ticks() { awk '{print $14+$15}' "/proc/$P/stat"; }
    # read/write-family calls (read, write, writev: what tokio uses on sockets) without
    # strace's slowdown; /proc/PID/io does not count recv/send, HAProxy's calls: use
    # MODE=strace to compare with it.
    rw() { awk '$1=="syscr:" || $1=="syscw:" {n+=$2} END {print n}' "/proc/$P/io"; }
    sys() { awk '{print $15}' "/proc/$P/stat"; }
    t0=$(ticks) s0=$(sys) c0=$(rw)
    load "$N"
    t1=$(ticks) s1=$(sys) c1=$(rw)
    python3 -c "print('$PROXY h2c: %.3f CPU s per 100k requests (%.3f of it system), %.3f read/write calls per request' % (($t1-$t0)/$(getconf CLK_TCK)/$N*1e5, ($s1-$s0)/$(getconf CLK_TCK)/$N*1e5, ($c1-$c0)/$N))"
    ;;
  strace)
    strace -c -f -p "$P" -o "$OUT/strace.txt" &
    ST=$!
    sleep 1
    load "$N"
    kill -INT "$ST"
    wait "$ST" || true
    python3 - "$OUT/strace.txt" "$N" "$PROXY" <<'EOT'
import sys
rows, n = {}, int(sys.argv[2])
for line in open(sys.argv[1]):
    f = line.split()
    if len(f) >= 5 and f[3].isdigit():
        rows[f[-1]] = int(f[3])
total = sum(v for k, v in rows.items() if k != "total")
print(f"{sys.argv[3]} h2c: {total / n:.2f} syscalls per request: " +
      ", ".join(f"{k} {v / n:.2f}" for k, v in sorted(rows.items(), key=lambda kv: -kv[1]) if k != "total" and v / n >= 0.01))
EOT
    ;;
esac
