#!/usr/bin/env bash
# bench/run.sh: veilgate against direct loopback, measured with vgbench (bench/README.md).
#
#   bench/run.sh          blind tunnels: throughput up/down, connrate, latency, idle
#   bench/run.sh mitm     TLS: handshakes (cold and warm), TLS throughput, idle TLS tunnels and
#                         the ClientHello the origin sees: direct vs blind tunnel vs MITM
#
# Everything runs on 127.0.0.1 / ::1 on free ports; every process started here is stopped on
# exit; every step has a time limit. Knobs (environment, defaults in brackets):
#   VEILGATE_BIN [../target/release/veilgate]   VG_RUNS [3]   VG_OUT [bench/results/STAMP-MODE]
#   VEILGATE_BIN_B [unset]                       blind tunnels: a second build, run in turn with
#                                                the first in every run (direct, A, B); the table
#                                                adds B / A, each ratio taken inside a run
#   VG_CONNS [4] VG_SECS [5]                     throughput tunnels and seconds
#   VG_CR_CONC [50] VG_CR_TOTAL [2000]           connrate workers and tunnels
#   VG_LAT_N [5000]                              latency round trips
#   VG_IDLE_N [1000] VG_IDLE_HOLD [3]            idle tunnels and seconds held
#   VG_HS_N [200] VG_COLD [3]                    mitm: handshakes per run; fresh veilgate
#                                                processes per mode and run for cold handshakes
#   VG_TLS_SECS [3] VG_TLS_IDLE_N [300]          mitm: TLS throughput seconds, idle TLS tunnels
#   VG_CLIENT_SUITES [TLS 1.3 suites, AES-128 first]  mitm: the handshake client's cipher-suite
#                                                offer, so its ClientHello differs from the one
#                                                veilgate (also rustls) sends; "" = rustls' own
#   VG_SKIP_BUILD [unset]                        1 = use the vgbench binary already built
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
MODE=${1:-tunnel}
case $MODE in tunnel | mitm) ;; *) echo "usage: $0 [mitm]" >&2; exit 2 ;; esac

VEILGATE_BIN=${VEILGATE_BIN:-$ROOT/target/release/veilgate}
VG_RUNS=${VG_RUNS:-3}
VG_CONNS=${VG_CONNS:-4}
VG_SECS=${VG_SECS:-5}
VG_CR_CONC=${VG_CR_CONC:-50}
VG_CR_TOTAL=${VG_CR_TOTAL:-2000}
VG_LAT_N=${VG_LAT_N:-5000}
VG_IDLE_N=${VG_IDLE_N:-1000}
VG_IDLE_HOLD=${VG_IDLE_HOLD:-3}
VG_HS_N=${VG_HS_N:-200}
VG_COLD=${VG_COLD:-3}
VG_TLS_SECS=${VG_TLS_SECS:-3}
VG_TLS_IDLE_N=${VG_TLS_IDLE_N:-300}
VG_CLIENT_SUITES=${VG_CLIENT_SUITES-TLS13_AES_128_GCM_SHA256,TLS13_CHACHA20_POLY1305_SHA256,TLS13_AES_256_GCM_SHA384}
VG_OUT=${VG_OUT:-$HERE/results/$(date +%Y%m%d-%H%M%S)-$MODE}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR_BENCH:-$HERE/target}
VG=$CARGO_TARGET_DIR/release/vgbench

STARTED=() # every PID started here, for the exit trap
TMP=""
# log, die, stop_pid, wait_port, http_ok
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"

TB_PID="" # the test running now
cleanup() {
  local p
  if [ -n "$TB_PID" ]; then stop_pid "$TB_PID"; fi
  for p in "${STARTED[@]}"; do stop_pid "$p"; done
  [ -n "$TMP" ] && rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------ build and set up

if [ -z "${VG_SKIP_BUILD:-}" ] || [ ! -x "$VG" ]; then
  log "building vgbench (release, low priority)"
  (cd "$HERE" && nice -n 19 cargo build --release --quiet) || die "vgbench build failed"
fi
[ -x "$VEILGATE_BIN" ] || die "no veilgate binary at $VEILGATE_BIN (run 'cargo build --release' in $ROOT, or set VEILGATE_BIN)"

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
mkdir -p "$VG_OUT"
TMP=$(mktemp -d /tmp/vgbench-run.XXXXXX)
# A private copy: a rebuild during the run cannot swap the binary between restarts.
cp "$VEILGATE_BIN" "$TMP/veilgate"
VEILGATE=$TMP/veilgate
VEILGATE_BIN_B=${VEILGATE_BIN_B:-}
if [ -n "$VEILGATE_BIN_B" ]; then
  [ "$MODE" = tunnel ] || die "VEILGATE_BIN_B compares blind tunnels only"
  [ -x "$VEILGATE_BIN_B" ] || die "no veilgate binary at $VEILGATE_BIN_B"
  cp "$VEILGATE_BIN_B" "$TMP/veilgate-B"
fi
# Servers stop by themselves even if this script is killed with -9.
SERVER_MAX_SECS=$((600 + VG_RUNS * 900))

{
  echo "date: $(date -Is)"
  echo "mode: $MODE"
  echo "veilgate: $("$VEILGATE" --version 2>&1 | head -1) ($VEILGATE_BIN, sha256 $(sha256sum "$VEILGATE_BIN" | cut -c1-12))"
  if [ -n "$VEILGATE_BIN_B" ]; then
    echo "veilgate-B: $("$TMP/veilgate-B" --version 2>&1 | head -1) ($VEILGATE_BIN_B, sha256 $(sha256sum "$VEILGATE_BIN_B" | cut -c1-12))"
  fi
  echo "commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo ' (src modified)')"
  echo "machine: $(uname -srm), $(nproc) cores"
  if [ "$MODE" = mitm ]; then
    echo "settings: VG_RUNS=$VG_RUNS VG_CONNS=$VG_CONNS VG_TLS_SECS=$VG_TLS_SECS VG_HS_N=$VG_HS_N VG_COLD=$VG_COLD VG_TLS_IDLE_N=$VG_TLS_IDLE_N VG_IDLE_HOLD=$VG_IDLE_HOLD VG_CLIENT_SUITES=$VG_CLIENT_SUITES"
  else
    echo "settings: VG_RUNS=$VG_RUNS VG_CONNS=$VG_CONNS VG_SECS=$VG_SECS VG_CR_CONC=$VG_CR_CONC VG_CR_TOTAL=$VG_CR_TOTAL VG_LAT_N=$VG_LAT_N VG_IDLE_N=$VG_IDLE_N VG_IDLE_HOLD=$VG_IDLE_HOLD"
  fi
  echo "VEILGATE_LOG=${VEILGATE_LOG:-(unset: info)}"
} >"$VG_OUT/env.txt"
log "results in $VG_OUT"

VG_PID=""
PROXY=""
start_veilgate() { # start_veilgate CONFIG [BINARY]: sets VG_PID and PROXY
  local p_proxy p_admin _ bin=${2:-$VEILGATE}
  read -r p_proxy p_admin < <("$VG" free-ports --count 2)
  "$bin" run --config "$1" --listen "127.0.0.1:$p_proxy" --admin-listen "127.0.0.1:$p_admin" >>"$VG_OUT/veilgate.log" 2>&1 &
  VG_PID=$!
  STARTED+=("$VG_PID")
  PROXY=127.0.0.1:$p_proxy
  for _ in $(seq 150); do
    if http_ok "$p_admin" /readyz; then return 0; fi
    kill -0 "$VG_PID" 2>/dev/null || die "veilgate exited at start: $(tail -3 "$VG_OUT/veilgate.log")"
    sleep 0.1
  done
  die "veilgate not ready within 15 s: $(tail -3 "$VG_OUT/veilgate.log")"
}

tb() { # tb FILE LABEL TEST LIMIT_S ARGS...: one bounded vgbench call, its JSON line to FILE
  local file=$1 label=$2 test=$3 lim=$4 rc=0
  shift 4
  # In the background and waited for, so a signal to this script is handled at once.
  timeout -k 5 "$lim" "$VG" "$test" --label "$label" "$@" >>"$file" 2> >(tee -a "$VG_OUT/human.log" >&2) &
  TB_PID=$!
  wait "$TB_PID" || rc=$?
  TB_PID=""
  if [ $rc -ne 0 ]; then
    log "$label $test exited $rc"
    echo "{\"tool\":\"vgbench\",\"test\":\"$test\",\"label\":\"$label\",\"error\":\"exit $rc\"}" >>"$file"
  fi
}

# ------------------------------------------------------------------ blind tunnels

run_tunnel() {
  local p_sink p_source p_echo serve_pid cfg r f label
  read -r p_sink p_source p_echo < <("$VG" free-ports --count 3)
  "$VG" serve --sink "127.0.0.1:$p_sink" --source "127.0.0.1:$p_source" --echo "127.0.0.1:$p_echo" \
    --max-secs "$SERVER_MAX_SECS" 2>>"$VG_OUT/human.log" &
  serve_pid=$!
  STARTED+=("$serve_pid")
  if ! { wait_port "$p_sink" "$serve_pid" && wait_port "$p_source" "$serve_pid" && wait_port "$p_echo" "$serve_pid"; }; then
    die "vgbench serve did not start"
  fi
  cfg=$TMP/veilgate.toml
  cat >"$cfg" <<EOF
# veilgate as a plain blind tunnel: the loopback targets reachable, no limit binding.
[server]
drain_timeout = "2s"

[policy]
deny_private = false
allowed_ports = [$p_sink, $p_source, $p_echo]
EOF
  for r in $(seq "$VG_RUNS"); do
    f=$VG_OUT/run$r.jsonl
    local labels=(direct veilgate)
    if [ -n "$VEILGATE_BIN_B" ]; then
      # Alternate which build goes first, so neither always runs on a warmer machine.
      if [ $((r % 2)) = 1 ]; then labels=(direct veilgate veilgate-B); else labels=(direct veilgate-B veilgate); fi
    fi
    for label in "${labels[@]}"; do
      log "run $r/$VG_RUNS: $label"
      local via=(--proxy none)
      if [ "$label" = veilgate ]; then start_veilgate "$cfg"; fi
      if [ "$label" = veilgate-B ]; then start_veilgate "$cfg" "$TMP/veilgate-B"; fi
      if [ "$label" != direct ]; then via=(--proxy "$PROXY" --pid "$VG_PID"); fi
      # A fresh process: idle first, for a clean RSS baseline; then bulk, connrate, latency.
      tb "$f" "$label" idle 180 "${via[@]}" --target "127.0.0.1:$p_echo" --count "$VG_IDLE_N" --hold "$VG_IDLE_HOLD"
      tb "$f" "$label" throughput $((VG_SECS + 60)) "${via[@]}" --target "127.0.0.1:$p_sink" --dir up --conns "$VG_CONNS" --secs "$VG_SECS"
      tb "$f" "$label" throughput $((VG_SECS + 60)) "${via[@]}" --target "127.0.0.1:$p_source" --dir down --conns "$VG_CONNS" --secs "$VG_SECS"
      tb "$f" "$label" connrate 150 "${via[@]}" --target "127.0.0.1:$p_echo" --conns "$VG_CR_CONC" --total "$VG_CR_TOTAL" --max-secs 120
      tb "$f" "$label" latency 150 "${via[@]}" --target "127.0.0.1:$p_echo" --count "$VG_LAT_N" --max-secs 120
      if [ "$label" != direct ]; then stop_pid "$VG_PID"; fi
    done
  done
  stop_pid "$serve_pid"
}

# ------------------------------------------------------------------ TLS: direct, tunnel, MITM

run_mitm() {
  local p_tls origin_pid cfg r f mode hellos n0 origin_ca vg_ca target ca
  read -r p_tls < <("$VG" free-ports --count 1)
  "$VEILGATE" ca init --dir "$TMP/vgca" >>"$VG_OUT/veilgate.log" 2>&1 || die "veilgate ca init failed: $(tail -3 "$VG_OUT/veilgate.log")"
  vg_ca=$TMP/vgca/veilgate-ca.pem
  # veilgate resolves localhost to ::1 first, then 127.0.0.1: serve both when ::1 exists.
  local listen=(--listen "127.0.0.1:$p_tls")
  if grep -qs ' lo$' /proc/net/if_inet6; then listen+=(--listen "[::1]:$p_tls"); fi
  "$VG" tls-origin "${listen[@]}" --pki-dir "$TMP/pki" --max-secs "$SERVER_MAX_SECS" 2>>"$VG_OUT/human.log" &
  origin_pid=$!
  STARTED+=("$origin_pid")
  wait_port "$p_tls" "$origin_pid" || die "vgbench tls-origin did not start: $(tail -3 "$VG_OUT/human.log")"
  origin_ca=$TMP/pki/origin-ca.pem
  hellos=$TMP/pki/clienthellos.jsonl
  cp "$origin_ca" "$VG_OUT/origin-ca.pem"
  cfg=$TMP/veilgate-mitm.toml
  cat >"$cfg" <<EOF
# CONNECT localhost:$p_tls is intercepted; CONNECT 127.0.0.1:$p_tls (the same origin) is a blind tunnel.
[server]
drain_timeout = "2s"

[policy]
deny_private = false
allowed_ports = [$p_tls]

[[routes]]
hosts = ["localhost"]
mode = "mitm"

[mitm]
ca_cert = "$TMP/vgca/veilgate-ca.pem"
ca_key = "$TMP/vgca/veilgate-ca.key"
upstream_roots = "$origin_ca"
EOF
  # Only the handshake runs use the client's own offer; the throughput runs keep rustls'
  # default, so every leg of a tunnel or MITM connection negotiates the same cipher.
  local suites=()
  if [ -n "$VG_CLIENT_SUITES" ]; then suites=(--cipher-suites "$VG_CLIENT_SUITES"); fi
  for r in $(seq "$VG_RUNS"); do
    f=$VG_OUT/run$r.jsonl
    log "run $r/$VG_RUNS: direct"
    local direct=(--proxy none --target "localhost:$p_tls" --ca "$origin_ca")
    n0=$(wc -l <"$hellos")
    tb "$f" direct tls-handshake 150 "${direct[@]}" "${suites[@]}" --count "$VG_HS_N" --max-secs 120
    [ "$r" = 1 ] && tb "$f" direct tls-hellos 30 --file "$hellos" --skip "$n0"
    tb "$f" direct tls-throughput $((VG_TLS_SECS + 60)) "${direct[@]}" --dir up --conns "$VG_CONNS" --secs "$VG_TLS_SECS"
    tb "$f" direct tls-throughput $((VG_TLS_SECS + 60)) "${direct[@]}" --dir down --conns "$VG_CONNS" --secs "$VG_TLS_SECS"
    for mode in tunnel mitm; do
      log "run $r/$VG_RUNS: $mode"
      if [ "$mode" = tunnel ]; then target=127.0.0.1:$p_tls; ca=$origin_ca; else target=localhost:$p_tls; ca=$vg_ca; fi
      start_veilgate "$cfg"
      local via=(--proxy "$PROXY" --pid "$VG_PID" --target "$target" --ca "$ca" --origin-ca "$origin_ca")
      n0=$(wc -l <"$hellos")
      # The first handshake through this fresh process is a cold one.
      tb "$f" "$mode" tls-handshake 150 "${via[@]}" "${suites[@]}" --count "$VG_HS_N" --max-secs 120
      [ "$r" = 1 ] && tb "$f" "$mode" tls-hellos 30 --file "$hellos" --skip "$n0"
      tb "$f" "$mode" tls-idle 180 "${via[@]}" --count "$VG_TLS_IDLE_N" --hold "$VG_IDLE_HOLD"
      tb "$f" "$mode" tls-throughput $((VG_TLS_SECS + 60)) "${via[@]}" --dir up --conns "$VG_CONNS" --secs "$VG_TLS_SECS"
      tb "$f" "$mode" tls-throughput $((VG_TLS_SECS + 60)) "${via[@]}" --dir down --conns "$VG_CONNS" --secs "$VG_TLS_SECS"
      stop_pid "$VG_PID"
      for _ in $(seq 2 "$VG_COLD"); do
        start_veilgate "$cfg"
        via=(--proxy "$PROXY" --pid "$VG_PID" --target "$target" --ca "$ca" --origin-ca "$origin_ca")
        tb "$f" "$mode-cold" tls-handshake 60 "${via[@]}" "${suites[@]}" --count 2 --max-secs 30
        stop_pid "$VG_PID"
      done
    done
  done
  cp "$hellos" "$VG_OUT/clienthellos.jsonl"
  stop_pid "$origin_pid"
}

if [ "$MODE" = mitm ]; then run_mitm; else run_tunnel; fi

log "done"
{
  sed 's/^/    /' "$VG_OUT/env.txt"
  echo
  if [ "$MODE" = mitm ]; then "$VG" table --mitm "$VG_OUT"/run*.jsonl; else "$VG" table "$VG_OUT"/run*.jsonl; fi
} | tee "$VG_OUT/summary.md"
