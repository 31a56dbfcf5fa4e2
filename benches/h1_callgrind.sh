#!/usr/bin/env bash
# Instructions per HTTP/1.1 request and per new client connection of the sidecar, counted by
# callgrind: repeatable while other builds load the machine, unlike wall-clock rates.
#
#   benches/h1_callgrind.sh                       # builds and measures target/release/sidemesh
#   BIN=/tmp/sidemesh-old benches/h1_callgrind.sh # measures another binary (before/after)
#   KA=20000 CONNS=2000 benches/h1_callgrind.sh   # request and connection counts
#   NET=127.84 benches/h1_callgrind.sh            # addresses in 127.84.0.0/16 (default 127.83)
#   MODE=cpu benches/h1_callgrind.sh              # no valgrind: CPU seconds of the sidecar
#                                                 # per 100k requests, from /proc/PID/stat,
#                                                 # and its peak RSS
#
# Set-up as benches/proxy.sh: discover on a state file, two demo backends, one sidecar
# (`--worker-threads 1`, outbound listener, round robin, no retries), here run under
# `valgrind --tool=callgrind` with instrumentation off until warmed up. Then:
# - keep-alive: `h2load --h1 -c50 -n$KA` (50 connections, one request in flight each);
# - new connections: $CONNS connections, 20 at a time, one `Connection: close` request each.
# Each phase is one callgrind dump; instructions / requests is the figure (the sidecar's
# whole process: runtime, kernel-call wrappers, timers included; the kernel itself not).
# Needs: valgrind, h2load (nghttp2-client), wrk, python3, curl. Output in
# bench-results/h1_callgrind/.
set -euo pipefail
OUT=${OUT:-bench-results/h1_callgrind}
. "$(dirname "$0")/lib.sh"
bench_init h1_callgrind valgrind callgrind_control h2load wrk python3 curl
BIN=$(bench_binary "${BIN:-}")
KA=${KA:-20000}
CONNS=${CONNS:-2000}
# The loopback /16 it uses (another script may be using another one at the same time).
NET=${NET:-127.83}

U1=$NET.0.11 U2=$NET.0.12
# wait_port would take someone else's listener for ours: start only on free addresses.
for hp in $U1/8080 $U2/8080 $NET.0.1/7070 $NET.0.20/15000; do
  if (exec 3<>/dev/tcp/"${hp%/*}"/"${hp#*/}") 2>/dev/null; then
    echo "h1_callgrind: ${hp%/*}:${hp#*/} is in use; pick another NET" >&2
    exit 1
  fi
done
bench_spawn "$BIN" demo-backend --listen $U1:8080 --name u1
bench_spawn "$BIN" demo-backend --listen $U2:8080 --name u2
cat >"$OUT/state.yaml" <<EOF
services:
  - {namespace: bench, name: client, use_services: [{service: up, balancer: {policy: round_robin}, retry: {attempts: 0}}]}
  - {namespace: bench, name: up, ports: [{port: 8080, protocol: http1}], instances: [{name: u1, address: $U1}, {name: u2, address: $U2}]}
EOF
bench_spawn "$BIN" discover --state "$OUT/state.yaml" --listen $NET.0.1:7070
wait_port $NET.0.1 7070
rm -f "$OUT"/callgrind.out.*
VALGRIND=(valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT/callgrind.out.%p")
[ "${MODE:-}" = cpu ] && VALGRIND=()
# `env` and valgrind exec what they run: the PID is the sidecar's.
bench_spawn env RUST_LOG=warn "${VALGRIND[@]}" "$BIN" --worker-threads 1 proxy \
  --admin $NET.0.20:15000 --inbound-address $NET.0.20 \
  --discover-url http://$NET.0.1:7070/v1/sidecars/bench/client/sidemesh-proxy
SIDECAR=${PIDS[-1]}
wait_url http://$NET.0.20:15000/ready
SM=$(curl -s http://$NET.0.1:7070/v1/sidecars/bench/client/sidemesh-proxy |
  python3 -c "import json,sys; print([s['address'] for s in json.load(sys.stdin)['outbound'] if s['name']=='up'][0])")
wait_port "$SM" 8080

if [ "${MODE:-}" = cpu ]; then
  # CPU seconds (user + system) of the sidecar per 100k requests, wrk as in benches/proxy.sh.
  DUR=${DUR:-5}
  CLK=$(getconf CLK_TCK)
  ticks() { awk '{print $14+$15}' "/proc/$SIDECAR/stat"; }
  for kind in keepalive close; do
    hdr=() c=50
    [ $kind = close ] && { hdr=(-H 'Connection: close'); c=20; }
    t0=$(ticks)
    w=$(wrk -t1 -c$c -d"${DUR}s" "${hdr[@]}" "http://$SM:8080/")
    t1=$(ticks)
    total=$(awk '/requests in/ {print $1}' <<<"$w")
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$w")
    python3 -c "print('$kind: $total requests, $rps req/s, %.3f CPU s per 100k' % (($t1-$t0)/$CLK/$total*1e5))"
  done
  grep -E "VmHWM|RssAnon" "/proc/$SIDECAR/status" | tr -s ' \t' ' '
  exit 0
fi

conns() { # N: N connections, 20 at a time, one request each with Connection: close
  python3 - "$SM" "$1" <<'EOF'
import asyncio, sys
host, n = sys.argv[1], int(sys.argv[2])
req = b"GET / HTTP/1.1\r\nHost: up\r\nConnection: close\r\n\r\n"
left = n
async def worker():
    global left
    while left > 0:
        left -= 1
        r, w = await asyncio.open_connection(host, 8080)
        w.write(req)
        data = await r.read()
        assert data.startswith(b"HTTP/1.1 200"), data[:80]
        w.close()
async def main():
    await asyncio.gather(*(worker() for _ in range(20)))
asyncio.run(main())
EOF
}

# Warm up (pools, lazily resolved metrics, buffers), then count.
h2load --h1 -c50 -n2000 "http://$SM:8080/" >/dev/null
conns 200
callgrind_control -i on "$SIDECAR" >/dev/null
h2load --h1 -c50 -n"$KA" "http://$SM:8080/" | grep -E "^requests:"
callgrind_control -d keepalive "$SIDECAR" >/dev/null
conns "$CONNS"
callgrind_control -d conns "$SIDECAR" >/dev/null
callgrind_control -i off "$SIDECAR" >/dev/null

total() { # the instruction count of dump number $1 (1: keep-alive, 2: connections)
  awk '/^(summary|totals):/ {print $2; exit}' "$OUT/callgrind.out.$SIDECAR.$1"
}
python3 - "$(total 1)" "$KA" "$(total 2)" "$CONNS" <<'EOF'
import sys
ka, n, cn, c = (int(x) for x in sys.argv[1:])
print(f"keep-alive: {ka} instructions for {n} requests = {ka / n:.0f} per request")
print(f"new connections: {cn} instructions for {c} connections = {cn / c:.0f} per connection (one request each)")
EOF
