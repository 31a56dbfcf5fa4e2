#!/usr/bin/env bash
# DNS shim benchmark: `sidemesh dns` against dnsmasq and unbound, measured with dnsperf.
#
# - Each server under test is pinned to core 1 (`taskset -c 1`), dnsperf to core 0.
# - Everything stays on loopback (127.0.0.6x, ports > 1024). A dnsmasq "authority" on
#   127.0.0.61 answers every name under `fwd.bench.` (TTL 3600) and refuses the rest; all
#   three servers forward to it and to nothing else (no /etc/resolv.conf upstreams).
# - Workloads: `local` (the mesh names of $SERVICES services, 4 forms each, answered
#   locally by all three: the shim from its config, dnsmasq from a hosts file, unbound
#   from local-data) and `cached` ($FWD_NAMES forwarded names, warmed once, then served
#   from each server's cache).
# - Rounds are interleaved: round 1 runs every workload on every server, then round 2...
#   The summary takes the median q/s of the rounds; RSS is read from /proc after the runs.
#
# Usage: benches/dns.sh   (env: ROUNDS=3 DURATION=10 SERVICES=100 FWD_NAMES=1000 CLIENTS=4
#                          OUTSTANDING=100, SIDEMESH=path/to/binary to skip the build)
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
SERVICES=${SERVICES:-100}
FWD_NAMES=${FWD_NAMES:-1000}
CLIENTS=${CLIENTS:-4}
OUTSTANDING=${OUTSTANDING:-100}

need=()
command -v dnsperf >/dev/null 2>&1 || need+=(dnsperf)
command -v dnsmasq >/dev/null 2>&1 || need+=(dnsmasq)
command -v unbound >/dev/null 2>&1 || need+=(unbound)
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
if [ "${#need[@]}" -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
DNSMASQ=$(command -v dnsmasq || echo /usr/sbin/dnsmasq)
UNBOUND=$(command -v unbound || echo /usr/sbin/unbound)

# SIDEMESH=path skips the build (to measure a given binary).
if [ -z "${SIDEMESH:-}" ]; then
  cargo build --release --bin sidemesh --quiet
  SIDEMESH=target/release/sidemesh
fi

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

AUTH=127.0.0.61; AUTH_PORT=15361
SHIM=127.0.0.62; SHIM_PORT=15362
MASQ=127.0.0.63; MASQ_PORT=15363
UNB=127.0.0.64;  UNB_PORT=15364

# --- the names -----------------------------------------------------------------------
addr_of() { echo "127.1.$(( ($1 + 10) / 250 )).$(( ($1 + 10) % 250 + 1 ))"; }
{
  echo '{"version": 1, "identity": {"namespace": "web", "service": "front", "plugin": "bench"},'
  echo ' "dns": {"upstreams": ["'$AUTH:$AUTH_PORT'"], "ttl_seconds": 5},'
  echo ' "outbound": ['
  for i in $(seq 0 $((SERVICES - 1))); do
    sep=","; [ "$i" = $((SERVICES - 1)) ] && sep=""
    echo "  {\"name\": \"svc$i\", \"namespace\": \"shop\", \"address\": \"$(addr_of "$i")\", \"ports\": [{\"port\": 8080}],"
    echo "   \"dns_names\": [\"svc$i\", \"svc$i.shop\", \"svc$i.shop.svc\", \"svc$i.shop.svc.cluster.local\"]}$sep"
  done
  echo ']}'
} > "$work/sidecar.json"
: > "$work/hosts"; : > "$work/local.txt"; : > "$work/unbound-local.conf"
for i in $(seq 0 $((SERVICES - 1))); do
  a=$(addr_of "$i")
  echo "$a svc$i svc$i.shop svc$i.shop.svc svc$i.shop.svc.cluster.local" >> "$work/hosts"
  for n in "svc$i" "svc$i.shop" "svc$i.shop.svc" "svc$i.shop.svc.cluster.local"; do
    echo "$n A" >> "$work/local.txt"
    echo "  local-data: \"$n. 5 IN A $a\"" >> "$work/unbound-local.conf"
  done
done
: > "$work/cached.txt"
for i in $(seq 0 $((FWD_NAMES - 1))); do echo "h$i.fwd.bench A" >> "$work/cached.txt"; done

# --- the servers ---------------------------------------------------------------------
# The authority: answers *.fwd.bench, nothing else, never forwards.
taskset -c 0 "$DNSMASQ" --keep-in-foreground --no-resolv --no-hosts --no-poll --pid-file= \
  --bind-interfaces --listen-address=$AUTH --port=$AUTH_PORT --user=root \
  --address=/fwd.bench/192.0.2.7 --local-ttl=3600 --log-facility=/dev/null &
pids+=($!)

taskset -c 1 "$SIDEMESH" --worker-threads 1 dns --listen $SHIM:$SHIM_PORT \
  --config "$work/sidecar.json" --upstream $AUTH:$AUTH_PORT --cache-size 10000 \
  > "$work/shim.out" 2> "$work/shim.err" &
SHIM_PID=$!; pids+=($SHIM_PID)

taskset -c 1 "$DNSMASQ" --keep-in-foreground --no-resolv --no-hosts --no-poll --pid-file= \
  --bind-interfaces --listen-address=$MASQ --port=$MASQ_PORT --user=root \
  --addn-hosts="$work/hosts" --local-ttl=5 --server=$AUTH#$AUTH_PORT \
  --cache-size=10000 --dns-forward-max=1000 --log-facility=/dev/null &
MASQ_PID=$!; pids+=($MASQ_PID)

cat > "$work/unbound.conf" <<EOF
server:
  interface: $UNB@$UNB_PORT
  port: $UNB_PORT
  do-daemonize: no
  num-threads: 1
  chroot: ""
  username: ""
  directory: "$work"
  pidfile: ""
  use-syslog: no
  logfile: ""
  verbosity: 0
  do-ip6: no
  access-control: 127.0.0.0/8 allow
  do-not-query-localhost: no
  module-config: "iterator"
  msg-cache-size: 32m
  rrset-cache-size: 64m
  local-zone: "bench." nodefault
  include: "$work/unbound-local.conf"
forward-zone:
  name: "."
  forward-addr: $AUTH@$AUTH_PORT
EOF
taskset -c 1 "$UNBOUND" -d -c "$work/unbound.conf" 2> "$work/unbound.err" &
UNB_PID=$!; pids+=($UNB_PID)

# Wait (bounded) until every server answers.
for target in "$SHIM $SHIM_PORT" "$MASQ $MASQ_PORT" "$UNB $UNB_PORT"; do
  set -- $target
  for _ in $(seq 1 100); do
    if dig @"$1" -p "$2" +short +time=1 +tries=1 svc0.shop A 2>/dev/null | grep -q 127.1; then continue 2; fi
    sleep 0.1
  done
  echo "server $1:$2 did not come up" >&2; cat "$work"/*.err >&2; exit 1
done

# Warm the caches: every forwarded name once through each server.
for target in "$SHIM $SHIM_PORT" "$MASQ $MASQ_PORT" "$UNB $UNB_PORT"; do
  set -- $target
  taskset -c 0 dnsperf -s "$1" -p "$2" -d "$work/cached.txt" -n 1 -q 50 > /dev/null
done

# --- the runs ------------------------------------------------------------------------
results="$work/results.tsv"
: > "$results"
run() { # server ip port workload round
  local out
  out=$(taskset -c 0 dnsperf -s "$2" -p "$3" -d "$work/$4.txt" -l "$DURATION" \
        -c "$CLIENTS" -q "$OUTSTANDING" -t 2 2>&1)
  local qps lost avg
  qps=$(echo "$out" | awk '/Queries per second:/ {print $4}')
  lost=$(echo "$out" | awk '/Queries lost:/ {print $3}')
  avg=$(echo "$out" | awk '/Average Latency/ {print $4}')
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$4" "$1" "$5" "$qps" "$lost" "$avg" | tee -a "$results"
}
echo -e "workload\tserver\tround\tqps\tlost\tavg_latency_s"
for round in $(seq 1 "$ROUNDS"); do
  for workload in local cached; do
    run sidemesh $SHIM $SHIM_PORT $workload "$round"
    run dnsmasq $MASQ $MASQ_PORT $workload "$round"
    run unbound $UNB $UNB_PORT $workload "$round"
  done
done

rss() { awk '/VmRSS/ {print $2 " kB"}' "/proc/$1/status"; }
hwm() { awk '/VmHWM/ {print $2 " kB"}' "/proc/$1/status"; }

echo
echo "## summary (median of $ROUNDS rounds, $DURATION s each, $CLIENTS clients x $OUTSTANDING outstanding)"
for workload in local cached; do
  for server in sidemesh dnsmasq unbound; do
    awk -F'\t' -v w="$workload" -v s="$server" '$1==w && $2==s {print $4, $5, $6}' "$results" \
      | sort -n | awk -v w="$workload" -v s="$server" '
        { q[NR]=$1; l+=$2; lat[NR]=$3 }
        END { m=int((NR+1)/2); printf "%-7s %-9s median %10.0f q/s  lost %d total  avg latency %s s (median run)\n", w, s, q[m], l, lat[m] }'
  done
done
echo
echo "RSS after the runs (peak): sidemesh $(rss $SHIM_PID) ($(hwm $SHIM_PID)), dnsmasq $(rss $MASQ_PID) ($(hwm $MASQ_PID)), unbound $(rss $UNB_PID) ($(hwm $UNB_PID))"
