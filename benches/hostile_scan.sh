#!/usr/bin/env bash
# A/B of the sidecar's HTTP/1 hot path against a base build: what the request-framing scan
# (proxy/src/hostile.rs) and the allocation-free balancer filter cost. Two sidecar binaries
# take turns, one at a time, pinned to one core with one worker, in front of the same
# upstream; wrk drives HTTP/1.1 keep-alive GETs and 4 KiB POSTs. Prints req/s and CPU
# seconds per 100k requests for each, median over the rounds.
#
#   BASE=/path/to/base/sidemesh benches/hostile_scan.sh      # ROUNDS=3 DUR=5 by default
#
# BASE is a release build of the commit to compare with (e.g. main, built from
# `git archive main`); the other side is this tree's release build, or NEW=/path/to/sidemesh.
# Needs wrk, curl, taskset, python3.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

ROUNDS=${ROUNDS:-3}
DUR=${DUR:-5}
OUT=${OUT:-bench-results/hostile_scan}
: "${BASE:?set BASE to the base sidemesh binary}"
bench_init hostile_scan.sh wrk curl taskset python3
NEW=$(bench_binary "${NEW:-}")

U=127.78.0.11
bench_spawn taskset -c "$LOAD_CPU" "$NEW" demo-backend --listen $U:8080 --name up
cat >"$OUT/state.yaml" <<EOF
services:
  - namespace: bench
    name: client
    use_services:
      - {service: up, retry: {attempts: 0}}
  - namespace: bench
    name: up
    ports: [{port: 8080, protocol: http1}]
    instances: [{name: u1, address: $U}]
EOF
bench_spawn taskset -c "$LOAD_CPU" "$NEW" discover --state "$OUT/state.yaml" --listen 127.78.0.1:7070
wait_port $U 8080
wait_port 127.78.0.1 7070
SVC=$(curl -s http://127.78.0.1:7070/v1/sidecars/bench/client/sidemesh-proxy |
  python3 -c "import json,sys; print(json.load(sys.stdin)['outbound'][0]['address'])")

cat >"$OUT/post.lua" <<'EOF'
wrk.method = "POST"
wrk.body = string.rep("x", 4096)
wrk.headers["Content-Type"] = "application/octet-stream"
EOF

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# run BIN KIND: starts a sidecar from BIN, runs wrk, prints "rps cpu_s_per_100k", stops it.
run() {
  local bin=$1 kind=$2 pid t0 t1 out rps reqs
  taskset -c "$PROXY_CPU" env RUST_LOG=warn "$bin" --worker-threads 1 proxy --admin 127.78.0.20:15000 \
    --inbound-address 127.78.0.20 \
    --discover-url http://127.78.0.1:7070/v1/sidecars/bench/client/sidemesh-proxy >>"$OUT/procs.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do curl -sf http://127.78.0.20:15000/ready >/dev/null && break; sleep 0.1; done
  wait_port "$SVC" 8080
  t0=$(cpu_ticks $pid)
  if [ "$kind" = post ]; then
    out=$(taskset -c "$LOAD_CPU" wrk -t1 -c50 -d"${DUR}s" -s "$OUT/post.lua" "http://$SVC:8080/")
  else
    out=$(taskset -c "$LOAD_CPU" wrk -t1 -c50 -d"${DUR}s" "http://$SVC:8080/")
  fi
  t1=$(cpu_ticks $pid)
  kill $pid; wait $pid 2>/dev/null || true
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  reqs=$(echo "$out" | awk '/requests in/ {print $1}')
  python3 -c "import sys; r,q,t=float(sys.argv[1]),float(sys.argv[2]),float(sys.argv[3]); print(f'{r:.0f} {t/100*100000/q:.3f}')" "$rps" "$reqs" "$((t1 - t0))"
}

: >"$OUT/results.txt"
for round in $(seq "$ROUNDS"); do
  for kind in get post; do
    # Alternate which side goes first, so drift over the run does not favour one.
    sides="base new"; [ $((round % 2)) = 0 ] && sides="new base"
    for side in $sides; do
      bin=$BASE; [ $side = new ] && bin=$NEW
      echo "$round $kind $side $(run "$bin" $kind)" | tee -a "$OUT/results.txt"
    done
  done
done
python3 - "$OUT/results.txt" <<'EOF'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
print("| load | side | req/s | CPU s per 100k |")
print("|---|---|---|---|")
for kind in ("get", "post"):
    for side in ("base", "new"):
        rs = [(float(r[3]), float(r[4])) for r in rows if r[1] == kind and r[2] == side]
        print(f"| {kind} | {side} | {statistics.median(x for x, _ in rs):.0f} | {statistics.median(y for _, y in rs):.3f} |")
EOF
