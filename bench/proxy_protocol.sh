#!/usr/bin/env bash
# bench/proxy_protocol.sh: what the PROXY protocol costs a new tunnel (issue 12), with vgbench
# connrate (CONNECT, 200, one byte echoed, close).
#
#   bench/proxy_protocol.sh                             current build (target/release/veilgate)
#   VEILGATE_BIN_OLD=old/veilgate bench/proxy_protocol.sh
#                                                       also a build without the feature
#
# Cases, each on a fresh veilgate, interleaved within a round and rotated between rounds
# against drift:
#   off        server.proxy_protocol = "off", plain CONNECTs (the accept path's one branch)
#   v2         "required" from 127.0.0.1/32, a v2 header written on its own before each
#              CONNECT (as HAProxy's send-proxy-v2), a different claimed client per tunnel
#   old-off    the VEILGATE_BIN_OLD build, plain CONNECTs (only when it is set)
# Prints tunnels/s, setup p50/p99 and the proxy's CPU-us per tunnel, median over rounds.
# Loopback only, free ports; every process started here is stopped by PID on exit; every step
# has a time limit. Knobs (environment, defaults in brackets):
#   VEILGATE_BIN [target/release/veilgate]  VEILGATE_BIN_OLD [unset]  PP_RUNS [5]
#   PP_CONC [50] PP_TOTAL [5000] workers and tunnels per case  PP_OUT [bench/results/STAMP-pp]
#   VG_BIN [target/debug/vgbench, built here as CI builds it]
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
VEILGATE_BIN=${VEILGATE_BIN:-$ROOT/target/release/veilgate}
VEILGATE_BIN_OLD=${VEILGATE_BIN_OLD:-}
PP_RUNS=${PP_RUNS:-5}
PP_CONC=${PP_CONC:-50}
PP_TOTAL=${PP_TOTAL:-5000}
PP_OUT=${PP_OUT:-$HERE/results/$(date +%Y%m%d-%H%M%S)-pp}
VG_BIN=${VG_BIN:-}

STARTED=()
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh" # log, die, stop_pid, wait_port, http_ok
cleanup() { for p in "${STARTED[@]}"; do stop_pid "$p"; done; rm -rf "${TMP:-}"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

[ -x "$VEILGATE_BIN" ] || die "no veilgate at $VEILGATE_BIN (cargo build --release)"
if [ -z "$VG_BIN" ]; then
  log "building vgbench"
  CARGO_TARGET_DIR="$ROOT/target" nice cargo build --quiet --manifest-path "$HERE/Cargo.toml"
  VG_BIN=$ROOT/target/debug/vgbench
fi
mkdir -p "$PP_OUT"
TMP=$(mktemp -d)
cp "$VEILGATE_BIN" "$TMP/veilgate-new"
CASES=(off v2)
if [ -n "$VEILGATE_BIN_OLD" ]; then cp "$VEILGATE_BIN_OLD" "$TMP/veilgate-old"; CASES+=(old-off); fi

read -r p_echo < <("$VG_BIN" free-ports --count 1)
"$VG_BIN" serve --echo "127.0.0.1:$p_echo" --max-secs 3600 2>>"$PP_OUT/human.log" &
STARTED+=("$!")
wait_port "$p_echo" "$!" || die "vgbench serve did not start"

config() { # config off|required
  local extra=""
  if [ "$1" = required ]; then extra=$'proxy_protocol = "required"\nproxy_protocol_from = ["127.0.0.1/32"]'; fi
  printf '[server]\ndrain_timeout = "2s"\n%s\n[policy]\ndeny_private = false\nallowed_ports = [%s]\n' "$extra" "$p_echo"
}
config off >"$TMP/off.toml"
config required >"$TMP/required.toml"

one() { # one CASE ROUND
  local bin=$TMP/veilgate-new cfg=$TMP/off.toml flag=() p_proxy p_admin pid attempt _
  case $1 in
    v2) cfg=$TMP/required.toml; flag=(--proxy-v2) ;;
    old-off) bin=$TMP/veilgate-old ;;
  esac
  # A free port can be taken by someone else before veilgate binds it: then try new ones.
  for attempt in 1 2 3; do
    read -r p_proxy p_admin < <("$VG_BIN" free-ports --count 2)
    "$bin" run --config "$cfg" --listen "127.0.0.1:$p_proxy" --admin-listen "127.0.0.1:$p_admin" >>"$PP_OUT/veilgate.log" 2>&1 &
    pid=$!
    STARTED+=("$pid")
    for _ in $(seq 150); do
      http_ok "$p_admin" /readyz && break
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    http_ok "$p_admin" /readyz && break
    stop_pid "$pid"
    [ "$attempt" -lt 3 ] || die "veilgate ($1) not ready: $(tail -1 "$PP_OUT/veilgate.log")"
  done
  timeout -k 5 150 "$VG_BIN" connrate --label "$1" --proxy "127.0.0.1:$p_proxy" --pid "$pid" \
    --target "127.0.0.1:$p_echo" --conns "$PP_CONC" --total "$PP_TOTAL" --max-secs 120 "${flag[@]}" \
    >>"$PP_OUT/runs.jsonl" 2>>"$PP_OUT/human.log" || log "$1 round $2: connrate failed"
  stop_pid "$pid"
}

for r in $(seq "$PP_RUNS"); do
  n=${#CASES[@]}
  for i in $(seq 0 $((n - 1))); do
    c=${CASES[$(((i + r) % n))]}
    log "round $r/$PP_RUNS: $c"
    one "$c" "$r"
  done
done

{
  echo "| case | tunnels/s | setup p50 us | setup p99 us | proxy CPU-us/tunnel | errors |"
  echo "|---|---|---|---|---|---|"
  for c in "${CASES[@]}"; do
    jq -rs --arg c "$c" '
      def med: sort | if length == 0 then null else .[(length - 1) / 2 | floor] end;
      [.[] | select(.label == $c and .test == "connrate")] as $r
      | "| \($c) | \([$r[].tunnels_per_s] | med) | \([$r[].p50_us] | med) | \([$r[].p99_us] | med) | \([$r[].proxy_cpu_us_per_tunnel] | med) | \([$r[].errors] | add) |"' \
      "$PP_OUT/runs.jsonl"
  done
} | tee "$PP_OUT/summary.md"
