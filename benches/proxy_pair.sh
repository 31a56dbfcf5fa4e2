#!/usr/bin/env bash
# The sidecar and HAProxy side by side, for more rounds of one measure than
# benches/proxy.sh gives: the same set-up reduced to the two proxies (core PROXY_CPU, one
# worker each), two lean HTTP/1.1 upstreams (`proxy_load http`) and two h2c ones
# (`sidemesh demo-backend`, :8082), all on core LOAD_CPU, and, alternating:
#
#   benches/proxy_pair.sh            # MODE=lat: proxy_load rate --rate 2000 --seconds 4
#                                    # --connections 32; p50/p99/p99.9 per round
#   MODE=lat2 benches/proxy_pair.sh  # the same over h2c (--h2), as proxy.sh's h2_2k rows
#   MODE=conn benches/proxy_pair.sh  # wrk -t1 -c20 -d4s -H 'Connection: close'; conn/s, the
#                                    # proxy's core utilisation and CPU ms per 1,000 connections
#                                    # (SEGS=1: and TCP segments per connection, nstat)
#   MODE=ka benches/proxy_pair.sh    # the same with keep-alive: requests/s, and per 1,000
#                                    # requests
#   MODE=tcp benches/proxy_pair.sh   # proxy_load bulk --seconds 4 --streams 1 (STREAMS=) to
#                                    # two sinks through a `protocol: tcp` port; MB/s, the
#                                    # proxy's core utilisation and CPU s per GB
#
# conn and tcp also print the CPU time of the load side (the load generator's, from bash's
# `time`, and the upstreams' and sinks', from /proc/PID/stat; the softirq work done in
# their context is in it) per 1,000 connections or per GB: what the load core, which
# saturates first in those two figures, spends on each. Per process, so other work on a
# shared machine stays out of it (the core's /proc/stat line under-counted in this VM).
#   ROUNDS=6 NET=127.94 NS=pair2 BIN=/path/to/sidemesh LOAD=/path/to/proxy_load benches/proxy_pair.sh
#
# Needs: haproxy, wrk, python3, curl. Output in bench-results/proxy_pair/.
set -euo pipefail
OUT=${OUT:-bench-results/proxy_pair}
. "$(dirname "$0")/lib.sh"
bench_init proxy_pair haproxy wrk python3 curl taskset
BIN=$(bench_binary "${BIN:-}")
# LOAD: a proxy_load binary to use instead of building one.
if [ -z "${LOAD:-}" ]; then
  cargo build --release --quiet -p sidemesh-bench --bin proxy_load
  LOAD=$PWD/target/release/proxy_load
fi
MODE=${MODE:-lat}
ROUNDS=${ROUNDS:-3}
NET=${NET:-127.93}
# NS: the services' namespace, from which the sidecar's outbound listener addresses derive;
# two runs at once need different ones (and NETs).
NS=${NS:-pair}
U1=$NET.0.11 U2=$NET.0.12

bench_state $NS $U1 $U2 >"$OUT/state.yaml"
{
  haproxy_head
  haproxy_h1 $NET.0.2:8080 $U1:8080 $U2:8080
  haproxy_h2 $NET.0.2:8081 $U1:8082 $U2:8082
  haproxy_tcp sink $NET.0.2:9000 $U1:9000 $U2:9000
} >"$OUT/haproxy.cfg"

UP_PIDS=()
for u in $U1 $U2; do
  bench_spawn_on "$LOAD_CPU" "$LOAD" http --listen $u:8080 --name $u
  UP_PIDS+=("${PIDS[-1]}")
  bench_spawn_on "$LOAD_CPU" "$BIN" demo-backend --listen $u:8082 --name $u
  bench_spawn_on "$LOAD_CPU" "$LOAD" sink --listen $u:9000
  UP_PIDS+=("${PIDS[-1]}")
done
bench_spawn_on "$LOAD_CPU" "$BIN" discover --state "$OUT/state.yaml" --listen $NET.0.1:7070
wait_port $NET.0.1 7070
URL=http://$NET.0.1:7070/v1/sidecars/$NS/client/sidemesh-proxy
bench_spawn_on "$PROXY_CPU" env RUST_LOG=warn "$BIN" --worker-threads 1 proxy \
  --admin $NET.0.20:15000 --inbound-address $NET.0.20 --discover-url "$URL"
SM_PID=${PIDS[-1]}
bench_spawn_on "$PROXY_CPU" haproxy -db -f "$OUT/haproxy.cfg"
HA_PID=${PIDS[-1]}
wait_url http://$NET.0.20:15000/ready
wait_port $NET.0.2 8080
addr_of() {
  curl -s "$URL" | python3 -c "import json,sys; print([s['address'] for s in json.load(sys.stdin)['outbound'] if s['name']=='$1'][0])"
}
SM=$(addr_of up) SM2=$(addr_of up2) SM_SINK=$(addr_of sink)
wait_port "$SM" 8080; wait_port "$SM2" 8081; wait_port "$SM_SINK" 9000
wait_port $NET.0.2 8081; wait_port $NET.0.2 9000
for u in $U1 $U2; do wait_port $u 8080; wait_port $u 8082; wait_port $u 9000; done
STREAMS=${STREAMS:-1}
# SEGS=1 (conn, ka): also TCP segments sent per connection (ka: per request), from `nstat` (the whole host's
# count: only meaningful while nothing else uses TCP).
SEGS=${SEGS:-0}

ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
# The upstreams' and sinks' ticks together.
up_ticks() {
  local s=0 p
  for p in "${UP_PIDS[@]}"; do s=$((s + $(ticks "$p"))); done
  echo $s
}
# load CMD...: runs CMD on the load core, its output in $OUT/load.out and its CPU seconds
# (user + system) in $OUT/load.cpu.
load() {
  local TIMEFORMAT='%U %S'
  { time taskset -c "$LOAD_CPU" "$@" >"$OUT/load.out"; } 2>"$OUT/load.time"
  awk '{print $1 + $2}' "$OUT/load.time" >"$OUT/load.cpu"
}
# The load side's CPU seconds of the last run: the generator's plus the upstreams' ticks
# between $1 and $2.
load_s() { python3 -c "print($(cat "$OUT/load.cpu") + ($2 - $1) / $CLK)"; }
CLK=$(getconf CLK_TCK)
for round in $(seq "$ROUNDS"); do
  for p in sidemesh haproxy; do
    if [ $p = sidemesh ]; then pid=$SM_PID a=$SM a2=$SM2; else pid=$HA_PID a=$NET.0.2 a2=$NET.0.2; fi
    if [ "$MODE" = conn ] || [ "$MODE" = ka ]; then
      if [ "$MODE" = conn ]; then hdr=(-H 'Connection: close') rate=conn_per_s; else hdr=() rate=req_per_s; fi
      [ "$SEGS" = 1 ] && nstat -n
      t0=$(ticks "$pid") u0=$(up_ticks)
      load wrk -t1 -c20 -d4s "${hdr[@]}" "http://$a:8080/"
      t1=$(ticks "$pid") u1=$(up_ticks)
      w=$(cat "$OUT/load.out") l=$(load_s "$u0" "$u1")
      n=$(awk '/requests in/ {print $1}' <<<"$w")
      segs=""
      if [ "$SEGS" = 1 ]; then
        segs="segs_per_conn $(nstat -z TcpOutSegs | awk -v n="$n" '$1=="TcpOutSegs" {printf "%.2f", $2/n}')"
      fi
      echo "round $round $p $rate $(awk '/Requests\/sec/ {print $2}' <<<"$w")" \
        "core $(python3 -c "print(round(($t1-$t0)/$CLK/4,2))")" \
        "cpu_ms_per_1k $(python3 -c "print(round(($t1-$t0)/$CLK*1e6/$n,2))")" \
        "load_core $(python3 -c "print(round($l/4,2))")" \
        "load_ms_per_1k $(python3 -c "print(round($l*1e6/$n,2))")" $segs
    elif [ "$MODE" = tcp ]; then
      [ $p = sidemesh ] && a=$SM_SINK
      t0=$(ticks "$pid") u0=$(up_ticks)
      load "$LOAD" bulk --addr "$a:9000" --seconds 4 --streams "$STREAMS"
      t1=$(ticks "$pid") u1=$(up_ticks)
      j=$(cat "$OUT/load.out") l=$(load_s "$u0" "$u1")
      gb=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['bytes']/1e9)" "$j")
      echo "round $round $p mb_per_s $(python3 -c "import json,sys; print(json.loads(sys.argv[1])['mb_per_s'])" "$j")" \
        "core $(python3 -c "print(round(($t1-$t0)/$CLK/4,2))")" \
        "cpu_s_per_gb $(python3 -c "print(round(($t1-$t0)/$CLK/$gb,3))")" \
        "load_core $(python3 -c "print(round($l/4,2))")" \
        "load_s_per_gb $(python3 -c "print(round($l/$gb,3))")"
    elif [ "$MODE" = lat2 ]; then
      echo "round $round $p $(taskset -c "$LOAD_CPU" "$LOAD" rate --addr "$a2:8081" --rate 2000 --seconds 4 --connections 32 --h2)"
    else
      echo "round $round $p $(taskset -c "$LOAD_CPU" "$LOAD" rate --addr "$a:8080" --rate 2000 --seconds 4 --connections 32)"
    fi
  done
done | tee "$OUT/results.txt"

# Medians over the rounds, and sidemesh / HAProxy.
python3 - "$OUT/results.txt" <<'PY'
import json, re, statistics, sys
vals = {}
for line in open(sys.argv[1]):
    m = re.match(r"round \d+ (\w+) (.*)", line.strip())
    if not m:
        continue
    p, rest = m.groups()
    if rest.startswith("{"):
        kv = {k: v for k, v in json.loads(rest).items() if isinstance(v, (int, float))}
    else:
        it = rest.split()
        kv = {it[i]: float(it[i + 1]) for i in range(0, len(it) - 1, 2)}
    for k, v in kv.items():
        vals.setdefault(k, {}).setdefault(p, []).append(v)
print("median of rounds: metric sidemesh haproxy ratio")
for k, per in vals.items():
    if "sidemesh" in per and "haproxy" in per:
        a, b = statistics.median(per["sidemesh"]), statistics.median(per["haproxy"])
        print(k, a, b, round(a / b, 2) if b else "-")
PY
