#!/usr/bin/env bash
# Regenerates link/symbol-order.txt: the functions a sidecar runs, most costly first, which
# release builds place side by side at the front of .text (see build.rs).
#
#   scripts/symbol-order.sh            # or SIDEMESH_BIN=path/to/sidemesh scripts/symbol-order.sh
#
# Runs two release sidecars (a client with HTTP/1.1, h2c and TCP outbound listeners, and an
# inbound sidecar in front of a demo backend) under callgrind through start, idle polling,
# a little traffic of every kind, /metrics, and SIGTERM; collects the functions that ran.
# Needs valgrind, curl, wrk, h2load (nghttp2-client), python3. Loopback only (127.67.*).
set -euo pipefail
cd "$(dirname "$0")/.."
for t in valgrind curl wrk h2load python3; do
  command -v $t >/dev/null || { echo "symbol-order.sh needs $t" >&2; exit 1; }
done
# SIDEMESH_BIN: profile this binary instead of building one (symbol names do not depend
# on the ordering, so a binary linked with an older list serves).
if [ -n "${SIDEMESH_BIN:-}" ]; then
  BIN=$(realpath "$SIDEMESH_BIN")
else
  cargo build --release --quiet --bin sidemesh
  BIN=$(realpath "${CARGO_TARGET_DIR:-target}/release/sidemesh")
fi
OUT=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; [ -n "${KEEP_OUT:-}" ] || rm -rf "$OUT"; }
trap cleanup EXIT
wait_port() { for _ in $(seq 300); do (exec 3<>/dev/tcp/"$1"/"$2") 2>/dev/null && return 0; sleep 0.1; done; echo "no listener on $1:$2" >&2; exit 1; }

U1=127.67.0.11 U2=127.67.0.12 MESHED=127.67.0.13
"$BIN" demo-backend --listen $U1:8080 --name u1 >>"$OUT/log" 2>&1 & PIDS+=($!)
"$BIN" demo-backend --listen $U2:8080 --name u2 >>"$OUT/log" 2>&1 & PIDS+=($!)
"$BIN" demo-backend --listen $MESHED:8090 --name meshed >>"$OUT/log" 2>&1 & PIDS+=($!)
python3 -c '
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 9001)); s.listen()
def echo(c):
    while data := c.recv(65536):
        c.sendall(data)
    c.close()
for _ in range(8):
    threading.Thread(target=echo, args=(s.accept()[0],), daemon=True).start()
' $U1 >>"$OUT/log" 2>&1 & PIDS+=($!)
for e in "$U1 8080" "$U2 8080" "$MESHED 8090" "$U1 9001"; do wait_port $e; done
cat >"$OUT/state.yaml" <<STATE
services:
  - namespace: prof
    name: client
    use_services:
      - {service: up, balancer: {policy: round_robin}}
      - {service: up2}
      - {service: echo}
      - {service: meshed}
  - {namespace: prof, name: up, ports: [{port: 8080, protocol: http1}], instances: [{name: u1, address: $U1}, {name: u2, address: $U2}]}
  - {namespace: prof, name: up2, ports: [{port: 8081, target_port: 8080, protocol: http2}], instances: [{name: u1, address: $U1}, {name: u2, address: $U2}]}
  - {namespace: prof, name: echo, ports: [{port: 9001, protocol: tcp}], instances: [{name: e1, address: $U1}]}
  - {namespace: prof, name: meshed, ports: [{port: 8090, port_outer: 18090, protocol: http1}], instances: [{name: m1, address: $MESHED, meshed: true}]}
STATE
"$BIN" discover --state "$OUT/state.yaml" --listen 127.67.0.1:7070 >>"$OUT/log" 2>&1 & PIDS+=($!)
wait_port 127.67.0.1 7070
URL=http://127.67.0.1:7070/v1/sidecars/prof
cg() { exec env RUST_LOG=warn valgrind --tool=callgrind --demangle=no --callgrind-out-file="$OUT/callgrind.%p" "$@"; }
cg "$BIN" --worker-threads 1 proxy --admin 127.67.0.20:15000 --inbound-address 127.67.0.20 \
  --discover-url $URL/client/sidemesh-proxy >>"$OUT/log" 2>&1 & CLIENT=$!; PIDS+=($CLIENT)
cg "$BIN" --worker-threads 1 proxy --admin 127.67.0.21:15000 --inbound-address $MESHED \
  --app-address $MESHED --discover-url $URL/meshed/sidemesh-proxy >>"$OUT/log" 2>&1 & INBOUND=$!; PIDS+=($INBOUND)
for a in 127.67.0.20 127.67.0.21; do
  for _ in $(seq 600); do curl -sf http://$a:15000/ready >/dev/null && break; sleep 0.2; done
  curl -sf http://$a:15000/ready >/dev/null || { echo "sidecar at $a never ready" >&2; cat "$OUT/log" >&2; exit 1; }
done
addr_of() { curl -s $URL/client/sidemesh-proxy | python3 -c "import json,sys; print([s['address'] for s in json.load(sys.stdin)['outbound'] if s['name']=='$1'][0])"; }
UP=$(addr_of up) UP2=$(addr_of up2) ECHO=$(addr_of echo) M=$(addr_of meshed)
sleep 3 # idle: config polls, timers
for _ in 1 2 3; do
  curl -sf http://$UP:8080/ >/dev/null
  curl -sf --http2-prior-knowledge http://$UP2:8081/ >/dev/null
  curl -sf http://$M:8090/ >/dev/null
done
curl -sf -X POST -d hello http://$UP:8080/post >/dev/null
curl -sf -H 'Transfer-Encoding: chunked' -d chunked http://$UP:8080/chunked >/dev/null
curl -sf -H 'Connection: close' http://$UP:8080/close >/dev/null
wrk -t1 -c8 -d2s http://$UP:8080/ >/dev/null
wrk -t1 -c8 -d2s -H 'Connection: close' http://$UP:8080/ >/dev/null
wrk -t1 -c8 -d2s http://$M:8090/ >/dev/null
h2load -n 2000 -c 4 -m 16 http://$UP2:8081/ >/dev/null
for _ in 1 2 3; do python3 -c '
import socket, sys
s = socket.create_connection((sys.argv[1], 9001)); s.sendall(b"x" * 100000); s.shutdown(socket.SHUT_WR)
n = 0
while d := s.recv(65536):
    n += len(d)
sys.exit(n != 100000)' "$ECHO"; done
for a in 127.67.0.20 127.67.0.21; do curl -sf http://$a:15000/metrics >/dev/null; curl -sf http://$a:15000/live >/dev/null; done
kill -TERM $CLIENT $INBOUND
wait $CLIENT $INBOUND || true
scripts/callgrind-functions.py "/$(basename "$BIN")" "$OUT"/callgrind.* >link/symbol-order.txt
echo "link/symbol-order.txt: $(wc -l <link/symbol-order.txt) functions" >&2
