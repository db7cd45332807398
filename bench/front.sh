#!/usr/bin/env bash
# bench/front.sh: the client's leg (issue 13). One release veilgate with a plaintext and a TLS
# listener; the same loads over the plaintext listener, over TLS to the proxy (HTTP/1.1 CONNECT,
# one TLS connection per tunnel) and over HTTP/2 CONNECT (one stream per tunnel), in turn,
# VG_RUNS times with the order turning each run:
#   - throughput up and down, VG_CONNS tunnels for VG_SECS s (and 1 tunnel: one stream's share);
#   - tunnels/s, VG_CR_CONC workers (tls: a new TLS connection per tunnel, sessions resumed;
#     h2: a new stream on one kept connection per worker);
#   - VG_IDLE_N idle tunnels: the proxy's RSS per tunnel (h2: 100 streams per connection).
# Prints one JSON line per measurement into $VG_OUT/runs.jsonl and a table of medians.
#
#   bench/front.sh      needs target/release/veilgate and bench/target/release/vgbench
#
# Knobs: VEILGATE_BIN VGBENCH VG_RUNS [3] VG_CONNS [4] VG_SECS [5] VG_CR_CONC [50]
#        VG_CR_TOTAL [3000] VG_IDLE_N [1000] VG_IDLE_HOLD [3]
# Loopback only; a throwaway certificate for localhost; every process started here is stopped.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
VEILGATE_BIN=${VEILGATE_BIN:-$ROOT/target/release/veilgate}
VGBENCH=${VGBENCH:-$HERE/target/release/vgbench}
VG_RUNS=${VG_RUNS:-3}
VG_CONNS=${VG_CONNS:-4}
VG_SECS=${VG_SECS:-5}
VG_CR_CONC=${VG_CR_CONC:-50}
VG_CR_TOTAL=${VG_CR_TOTAL:-3000}
VG_IDLE_N=${VG_IDLE_N:-1000}
VG_IDLE_HOLD=${VG_IDLE_HOLD:-3}
VG_OUT=${VG_OUT:-$HERE/results/$(date +%Y%m%d-%H%M%S)-front}
STARTED=()
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
cleanup() { local p; for p in "${STARTED[@]}"; do stop_pid "$p"; done; }
trap cleanup EXIT
mkdir -p "$VG_OUT"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/vg-front.XXXXXX")

# A throwaway CA and a leaf for localhost (rustls, as a client, refuses a CA certificate used
# as the server's own).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=vgbench CA" \
  -keyout "$TMP/ca.key" -out "$TMP/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
  -keyout "$TMP/proxy.key" -out "$TMP/proxy.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n' >"$TMP/leaf.ext"
openssl x509 -req -in "$TMP/proxy.csr" -CA "$TMP/ca.pem" -CAkey "$TMP/ca.key" -CAcreateserial -days 2 \
  -extfile "$TMP/leaf.ext" -out "$TMP/proxy.pem" 2>/dev/null
chmod 600 "$TMP/proxy.key"
read -r -a P < <("$VGBENCH" free-ports --count 6)
SINK=127.0.0.1:${P[0]} SOURCE=127.0.0.1:${P[1]} ECHO=127.0.0.1:${P[2]}
PLAIN=127.0.0.1:${P[3]} TLS=127.0.0.1:${P[4]} ADMIN=127.0.0.1:${P[5]}
"$VGBENCH" serve --sink "$SINK" --source "$SOURCE" --echo "$ECHO" --max-secs 3600 >/dev/null 2>&1 & STARTED+=($!)
cat >"$TMP/veilgate.toml" <<CONF
[server]
listen = ["$PLAIN"]
tls_listen = ["$TLS"]
tls_cert = "$TMP/proxy.pem"
tls_key = "$TMP/proxy.key"
admin_listen = "$ADMIN"
[policy]
deny_private = false
allowed_ports = [${P[0]}, ${P[1]}, ${P[2]}]
[limits]
max_tunnels = 100000
[limits.per_client]
max_tunnels = 100000
CONF
front_args() { # front
  case $1 in
    plain) echo "--proxy $PLAIN --front plain" ;;
    *) echo "--proxy $TLS --front $1 --proxy-ca $TMP/ca.pem" ;;
  esac
}
OUT=$VG_OUT/runs.jsonl
start_veilgate() { # a fresh process per leg, so each idle figure starts from a fresh heap
  VEILGATE_LOG=warn "$VEILGATE_BIN" run -c "$TMP/veilgate.toml" >"$TMP/veilgate.log" 2>&1 & VG=$!; STARTED+=($VG)
  wait_port "${P[4]}" "$VG" || die "veilgate did not start: $(tail -5 "$TMP/veilgate.log")"
}
one() { # front run
  local f=$1 run=$2 a
  start_veilgate
  a=$(front_args "$f")
  # shellcheck disable=SC2086
  {
    "$VGBENCH" front-throughput $a --target "$SINK" --dir up --conns "$VG_CONNS" --secs "$VG_SECS" --pid "$VG" --label "$f run $run"
    "$VGBENCH" front-throughput $a --target "$SOURCE" --dir down --conns "$VG_CONNS" --secs "$VG_SECS" --pid "$VG" --label "$f run $run"
    "$VGBENCH" front-throughput $a --target "$SINK" --dir up --conns 1 --secs "$VG_SECS" --pid "$VG" --label "$f run $run"
    "$VGBENCH" front-throughput $a --target "$SOURCE" --dir down --conns 1 --secs "$VG_SECS" --pid "$VG" --label "$f run $run"
    "$VGBENCH" front-connrate $a --target "$ECHO" --conns "$VG_CR_CONC" --total "$VG_CR_TOTAL" --pid "$VG" --label "$f run $run"
    "$VGBENCH" front-idle $a --target "$ECHO" --count "$VG_IDLE_N" --hold "$VG_IDLE_HOLD" --pid "$VG" --label "$f run $run"
  } | sed "s/^{/{\"run\":$run,/" >>"$OUT"
  stop_pid "$VG"
}
log "plain $PLAIN, tls $TLS; load average $(cut -d' ' -f1-3 /proc/loadavg)"
FRONTS=(plain tls h2)
for run in $(seq "$VG_RUNS"); do
  for i in 0 1 2; do one "${FRONTS[$(((i + run) % 3))]}" "$run"; done
done
log "load average $(cut -d' ' -f1-3 /proc/loadavg); results in $OUT"
python3 "$HERE/front_table.py" "$OUT"
