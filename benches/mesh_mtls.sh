#!/usr/bin/env bash
# The whole mesh path, client -> outbound sidecar -> inbound sidecar -> app, with the
# sidecar hop in three ways: plaintext HTTP/1.1 keep-alive (`--mesh-tls disabled`), mutual
# TLS HTTP/1.1 keep-alive (`proxy --mesh-h2 false`), and mutual TLS with HTTP/1.1 carried
# over one HTTP/2 connection (`--mesh-h2 true`, the default); plus the app alone (direct). Everything is a
# separate process of the release binary (discover, the demo backend, two sidecars with one
# worker thread each) on loopback; wrk drives HTTP/1.1 keep-alive. As in proxy.sh, both
# sidecars are pinned to core PROXY_CPU (0), the app and wrk share core LOAD_CPU (1). Variants are
# interleaved round by round; prints a markdown table of medians.
#
#   benches/mesh_mtls.sh                  # ROUNDS=3 DUR=8 CONNS=32 by default
#   ROUNDS=5 DUR=10 CONNS=64 benches/mesh_mtls.sh
#
# BIN=path/to/sidemesh skips the release build (e.g. to try the script on a debug build).
# Needs: wrk, curl, python3, taskset. Raw results go to bench-results/mesh_mtls/ (gitignored).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

ROUNDS=${ROUNDS:-3}
DUR=${DUR:-8}
CONNS=${CONNS:-32}
OUT=${OUT:-bench-results/mesh_mtls}
bench_init mesh_mtls.sh wrk curl python3 taskset
BIN=$(bench_binary "${BIN:-}")

APP=127.77.0.2 API=127.77.0.3 WEB=127.77.0.4 DISC=127.77.0.5
cat >"$OUT/state.yaml" <<EOF
services:
  - {namespace: bench, name: api, ports: [{port: 8080, port_outer: 18080, protocol: http1}],
     instances: [{address: $APP, meshed: true}]}
  - {namespace: bench, name: web, use_services: [{service: api}]}
EOF

# run VARIANT: starts the mesh for VARIANT, runs wrk, stops it; appends to $OUT/raw.tsv.
run() {
  local variant=$1 tls=permissive h2=(--mesh-h2 false) target
  case $variant in
    plain) tls=disabled ;;
    h2) h2=(--mesh-h2 true) ;;
  esac
  rm -rf "$OUT/data"
  bench_spawn "$BIN" discover --state "$OUT/state.yaml" --listen $DISC:7070 --data-dir "$OUT/data" \
    --mesh-tls $tls
  bench_spawn taskset -c "$LOAD_CPU" "$BIN" --worker-threads 1 demo-backend --listen $APP:8080 --name api
  wait_url http://$DISC:7070/readyz
  bench_spawn taskset -c "$PROXY_CPU" env RUST_LOG=warn "$BIN" --worker-threads 1 proxy --admin $API:15000 \
    --inbound-address $APP --app-address $APP \
    --discover-url http://$DISC:7070/v1/sidecars/bench/api/sidemesh-proxy
  bench_spawn taskset -c "$PROXY_CPU" env RUST_LOG=warn "$BIN" --worker-threads 1 proxy --admin $WEB:15000 \
    --inbound-address $WEB "${h2[@]}" \
    --discover-url http://$DISC:7070/v1/sidecars/bench/web/sidemesh-proxy
  wait_url http://$API:15000/ready
  wait_url http://$WEB:15000/ready
  if [ "$tls" != disabled ]; then
    for admin in $API $WEB; do
      for _ in $(seq 200); do
        curl -s http://$admin:15000/metrics | grep -q '^sidemesh_proxy_tls_certificate_expiry_timestamp_seconds [1-9]' && break
        sleep 0.1
      done
    done
  fi
  target=$(curl -s http://$DISC:7070/v1/sidecars/bench/web/sidemesh-proxy |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["outbound"][0]["address"])')
  [ "$variant" = direct ] && target=$APP
  curl -sf "http://$target:8080/" >/dev/null || { echo "mesh_mtls.sh: $variant: no answer" >&2; exit 1; }
  taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${DUR}s" --latency "http://$target:8080/" >"$OUT/wrk-$variant-$round.txt"
  local tls_out
  tls_out=$(curl -s http://$WEB:15000/metrics |
    awk '/^sidemesh_proxy_tls_connections_total\{direction="outbound"\}/ {print $2}')
  python3 - "$OUT/wrk-$variant-$round.txt" "$variant" "${tls_out:-0}" >>"$OUT/raw.tsv" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
def pct(p):
    m = re.search(r"\s%s%%\s+([\d.]+)(us|ms|s)" % p, text)
    v, u = float(m.group(1)), m.group(2)
    return v / 1000 if u == "us" else v * 1000 if u == "s" else v
errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
print("\t".join([sys.argv[2], "%.0f" % rps, "%.2f" % pct(50), "%.2f" % pct(99),
                 errors.group(1) if errors else "0", sys.argv[3]]))
PY
  bench_cleanup
  sleep 0.5
}

: >"$OUT/raw.tsv"
for round in $(seq "$ROUNDS"); do
  for v in direct plain tls h2; do
    run "$v"
  done
done

python3 - "$OUT/raw.tsv" <<'PY'
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().splitlines() if l]
by = {}
for v, rps, p50, p99, errs, conns in rows:
    by.setdefault(v, []).append((float(rps), float(p50), float(p99), int(errs), float(conns)))
base = statistics.median(r[0] for r in by["plain"])
print("| sidecar hop | req/s (median) | vs plaintext h1 | p50 ms | p99 ms | non-2xx | TLS conns out |")
print("|---|---|---|---|---|---|---|")
names = {"direct": "none (wrk -> app)", "plain": "plaintext HTTP/1.1 keep-alive",
         "tls": "mutual TLS, HTTP/1.1 keep-alive", "h2": "mutual TLS, HTTP/1.1 over one HTTP/2 (--mesh-h2, default)"}
for v in ["direct", "plain", "tls", "h2"]:
    rs = by[v]
    m = statistics.median(r[0] for r in rs)
    print("| %s | %.0f | %.2fx | %.2f | %.2f | %d | %d |" % (
        names[v], m, m / base, statistics.median(r[1] for r in rs),
        statistics.median(r[2] for r in rs), sum(r[3] for r in rs), max(r[4] for r in rs)))
PY
