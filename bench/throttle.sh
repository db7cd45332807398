#!/usr/bin/env bash
# bench/throttle.sh: throttling many clients at once (issue 16), measured with
# ../shared/tunnelbench `throttle`; bench/README.md "Throttling at scale" says what each figure is.
#
#   bench/throttle.sh                                   current build (target/release/veilgate)
#   VEILGATE_BIN=old/veilgate VEILGATE_BIN_B=new/veilgate bench/throttle.sh
#                                                       two builds, interleaved A B A B
#
# Per round, for each case in TH_CASES, each build runs on a fresh veilgate process:
#   down, up          TH_CLIENTS clients (127.0.1.2...) x TH_CONNS tunnels, TH_LIMIT B/s each way
#   big-down, big-up  TH_BIG_CLIENTS clients x TH_BIG_CONNS tunnels at TH_BIG_LIMIT B/s
#   free-down, free-up  as down/up with no limit configured: the unthrottled cost, for scale
#   single            (not in the default list) one client at TH_SINGLE_LIMIT with each of
#                     TH_SINGLE_CONNS tunnels, down and up: issue "Governor layer"'s figures
#   squid             as down, through Squid delay pools class 2 (once per round, if installed)
#   connrate          tunnels/s from TH_CR_CLIENTS addresses, no limits vs every limit
#                     configured (caps, rate, bandwidth; none binding), TH_CR_PAIRS pairs a round,
#                     each pair's order alternating (none/all, all/none) against drift
# Loopback only, free ports; every process started here is stopped by PID on exit (also on
# error); every step has a time limit. Knobs (environment, defaults in brackets):
#   VEILGATE_BIN [target/release/veilgate, built here]  VEILGATE_BIN_B [unset]: second build
#   TH_LABEL_A [veilgate, or A with B] TH_LABEL_B [B]   TH_RUNS [3] rounds   TH_SECS [10]
#   TH_CLIENTS [100] TH_CONNS [200] TH_LIMIT [1048576]
#   TH_BIG_CLIENTS [1000] TH_BIG_CONNS [2 per client if descriptors allow, else 1]
#   TH_BIG_LIMIT [262144]  TH_SINGLE_LIMIT [4194304] TH_SINGLE_CONNS ["1 4 16"]
#   TH_CR_CLIENTS [1000] TH_CR_CONC [50] TH_CR_TOTAL [20000] TH_CR_PAIRS [2] per round
#   TH_CASES [down up big-down big-up free-down free-up squid connrate]
#   TH_OUT [bench/results/STAMP-throttle]  TH_SKIP_BUILD [unset]: 1 = use the binaries built
#   SQUID_BIN [/usr/sbin/squid]  TB_SRC [../shared/tunnelbench]
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
TB_SRC=${TB_SRC:-$(cd "$ROOT/.." && pwd)/shared/tunnelbench}
TB_TARGET=${TB_TARGET:-$ROOT/target/tunnelbench} # outside the read-only shared folder
TB=$TB_TARGET/release/tunnelbench
VG=$HERE/target/release/vgbench

BUILD_VEILGATE=""
if [ -z "${VEILGATE_BIN:-}" ]; then BUILD_VEILGATE=1; fi
VEILGATE_BIN=${VEILGATE_BIN:-$ROOT/target/release/veilgate}
VEILGATE_BIN_B=${VEILGATE_BIN_B:-}
if [ -n "$VEILGATE_BIN_B" ]; then TH_LABEL_A=${TH_LABEL_A:-A}; else TH_LABEL_A=${TH_LABEL_A:-veilgate}; fi
TH_LABEL_B=${TH_LABEL_B:-B}
TH_RUNS=${TH_RUNS:-3}
TH_SECS=${TH_SECS:-10}
TH_CLIENTS=${TH_CLIENTS:-100}
TH_CONNS=${TH_CONNS:-200}
TH_LIMIT=${TH_LIMIT:-1048576}
TH_BIG_CLIENTS=${TH_BIG_CLIENTS:-1000}
TH_BIG_LIMIT=${TH_BIG_LIMIT:-262144}
TH_BIG_CONNS=${TH_BIG_CONNS:-}
TH_SINGLE_LIMIT=${TH_SINGLE_LIMIT:-4194304}
TH_SINGLE_CONNS=${TH_SINGLE_CONNS:-1 4 16}
TH_CR_CLIENTS=${TH_CR_CLIENTS:-1000}
TH_CR_CONC=${TH_CR_CONC:-50}
TH_CR_TOTAL=${TH_CR_TOTAL:-20000}
TH_CR_PAIRS=${TH_CR_PAIRS:-2}
TH_CASES=${TH_CASES:-down up big-down big-up free-down free-up squid connrate}
SQUID_BIN=${SQUID_BIN:-/usr/sbin/squid}
TH_OUT=${TH_OUT:-$HERE/results/$(date +%Y%m%d-%H%M%S)-throttle}

STARTED=() # every PID started here, for the exit trap
TMP=""
TB_PID=""  # the measuring client running now
# log, die, stop_pid, wait_port, http_ok
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
is_uint() { [[ $1 =~ ^[0-9]+$ ]] && [ "$1" -gt 0 ]; }

for v in TH_RUNS TH_SECS TH_CLIENTS TH_CONNS TH_LIMIT TH_BIG_CLIENTS TH_BIG_LIMIT TH_SINGLE_LIMIT TH_CR_CLIENTS TH_CR_CONC TH_CR_TOTAL TH_CR_PAIRS; do
  is_uint "${!v}" || die "$v must be a positive integer, not '${!v}'"
done
[ -z "$TH_BIG_CONNS" ] || is_uint "$TH_BIG_CONNS" || die "TH_BIG_CONNS must be a positive integer"
for n in $TH_SINGLE_CONNS; do is_uint "$n" || die "TH_SINGLE_CONNS: '$n' is not a positive integer"; done
for c in $TH_CASES; do
  case $c in down | up | big-down | big-up | free-down | free-up | single | squid | connrate) ;; *) die "unknown case '$c' in TH_CASES" ;; esac
done
# Client addresses are 127.0.1.2 upwards; keep well inside 127.0.0.0/8.
for v in TH_CLIENTS TH_BIG_CLIENTS TH_CR_CLIENTS; do [ "${!v}" -le 60000 ] || die "$v: at most 60000 clients"; done

cleanup() {
  local p
  if [ -n "$TB_PID" ]; then stop_pid "$TB_PID"; fi
  for p in "${STARTED[@]}"; do stop_pid "$p"; done
  if [ -n "$TMP" ]; then
    [ -f "$TMP/squid/cache.log" ] && cat "$TMP/squid/cache.log" >>"$TH_OUT/squid-cache.log" 2>/dev/null
    rm -rf "$TMP"
  fi
  return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

addrs() { # addrs N: N loopback client addresses from 127.0.1.2 up, comma-separated
  local n=$1 i v out=()
  for ((i = 0; i < n; i++)); do
    v=$((258 + i))
    out+=("127.0.$((v >> 8)).$((v & 255))")
  done
  (IFS=,; echo "${out[*]}")
}

# ------------------------------------------------------------------ build and set up

command -v jq >/dev/null || die "jq is needed (apt-get install jq)"
command -v python3 >/dev/null || die "python3 is needed for the table"
if [ -z "${TH_SKIP_BUILD:-}" ] || [ ! -x "$TB" ]; then
  [ -f "$TB_SRC/Cargo.toml" ] || die "no tunnelbench at $TB_SRC (set TB_SRC)"
  log "building tunnelbench (release, low priority) into $TB_TARGET"
  (cd "$TB_SRC" && CARGO_TARGET_DIR=$TB_TARGET nice -n 19 cargo build --release --quiet) || die "tunnelbench build failed"
fi
if [ -z "${TH_SKIP_BUILD:-}" ] || [ ! -x "$VG" ]; then
  log "building vgbench (release, low priority)"
  (cd "$HERE" && CARGO_TARGET_DIR=$HERE/target nice -n 19 cargo build --release --quiet) || die "vgbench build failed"
fi
if [ -n "$BUILD_VEILGATE" ] && { [ -z "${TH_SKIP_BUILD:-}" ] || [ ! -x "$VEILGATE_BIN" ]; }; then
  log "building veilgate (release, low priority)"
  (cd "$ROOT" && nice -n 19 cargo build --release --quiet) || die "veilgate build failed"
fi
[ -x "$VEILGATE_BIN" ] || die "no veilgate binary at $VEILGATE_BIN"
if [ -n "$VEILGATE_BIN_B" ]; then [ -x "$VEILGATE_BIN_B" ] || die "no veilgate binary at $VEILGATE_BIN_B"; fi

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
# A throttled tunnel holds at most 6 descriptors in veilgate (two sockets, a pipe per bulk
# direction); keep room for listeners, logs and the runtime.
if [ -z "$TH_BIG_CONNS" ]; then
  if [ $((TH_BIG_CLIENTS * 2 * 6 + 512)) -le "$NOFILE" ]; then TH_BIG_CONNS=$((TH_BIG_CLIENTS * 2)); else TH_BIG_CONNS=$TH_BIG_CLIENTS; fi
fi
[ $((TH_BIG_CONNS * 6 + 512)) -le "$NOFILE" ] || log "warning: $TH_BIG_CONNS tunnels may need more than $NOFILE descriptors in veilgate"
[ $((TH_CONNS * 6 + 512)) -le "$NOFILE" ] || log "warning: $TH_CONNS tunnels may need more than $NOFILE descriptors in veilgate"

mkdir -p "$TH_OUT"
TMP=$(mktemp -d /tmp/vg-throttle.XXXXXX)
chmod 711 "$TMP" # Squid drops to its own user and must reach its scratch directory
# Private copies: a rebuild during the run cannot swap a binary between restarts.
BUILDS=(A)
cp "$VEILGATE_BIN" "$TMP/veilgate-A"
if [ -n "$VEILGATE_BIN_B" ]; then BUILDS=(A B); cp "$VEILGATE_BIN_B" "$TMP/veilgate-B"; fi
label_of() { case $1 in A) echo "$TH_LABEL_A" ;; B) echo "$TH_LABEL_B" ;; *) echo "$1" ;; esac; }
HAVE_SQUID=""
if [[ " $TH_CASES " == *" squid "* ]]; then
  if [ -x "$SQUID_BIN" ]; then HAVE_SQUID=1; else log "no Squid at $SQUID_BIN: skipping the squid case (apt-get install squid)"; fi
fi
ADDR_SMALL=$(addrs "$TH_CLIENTS")
ADDR_BIG=$(addrs "$TH_BIG_CLIENTS")
ADDR_CR=$(addrs "$TH_CR_CLIENTS")
# Servers stop by themselves even if this script is killed with -9.
SERVER_MAX_SECS=$((900 + TH_RUNS * (600 + 8 * (TH_SECS + 30) * ${#BUILDS[@]} + TH_CR_PAIRS * 300)))

{
  echo "date: $(date -Is)"
  echo "A ($TH_LABEL_A): $("$TMP/veilgate-A" --version 2>&1 | head -1) ($VEILGATE_BIN, sha256 $(sha256sum "$VEILGATE_BIN" | cut -c1-12))"
  if [ -n "$VEILGATE_BIN_B" ]; then
    echo "B ($TH_LABEL_B): $("$TMP/veilgate-B" --version 2>&1 | head -1) ($VEILGATE_BIN_B, sha256 $(sha256sum "$VEILGATE_BIN_B" | cut -c1-12))"
  fi
  echo "commit of this tree: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo ' (src modified)')"
  if [ -n "$HAVE_SQUID" ]; then echo "squid: $("$SQUID_BIN" -v | head -1)"; fi
  echo "machine: $(uname -srm), $(nproc) cores; load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "settings: TH_RUNS=$TH_RUNS TH_SECS=$TH_SECS TH_CLIENTS=$TH_CLIENTS TH_CONNS=$TH_CONNS TH_LIMIT=$TH_LIMIT TH_BIG_CLIENTS=$TH_BIG_CLIENTS TH_BIG_CONNS=$TH_BIG_CONNS TH_BIG_LIMIT=$TH_BIG_LIMIT TH_CR_CLIENTS=$TH_CR_CLIENTS TH_CR_CONC=$TH_CR_CONC TH_CR_TOTAL=$TH_CR_TOTAL TH_CR_PAIRS=$TH_CR_PAIRS"
  echo "cases: $TH_CASES"
  echo "descriptors (soft=hard): $NOFILE"
  echo "VEILGATE_LOG=${VEILGATE_LOG:-(unset: info)}"
} >"$TH_OUT/env.txt"
log "results in $TH_OUT"

read -r P_SINK P_SOURCE P_ECHO < <("$VG" free-ports --count 3)
"$TB" serve --sink "127.0.0.1:$P_SINK" --source "127.0.0.1:$P_SOURCE" --echo "127.0.0.1:$P_ECHO" \
  --max-secs "$SERVER_MAX_SECS" 2>>"$TH_OUT/human.log" &
SERVE_PID=$!
STARTED+=("$SERVE_PID")
for p in "$P_SINK" "$P_SOURCE" "$P_ECHO"; do wait_port "$p" "$SERVE_PID" || die "tunnelbench serve did not start"; done

write_config() { # write_config FILE KIND [RATE]: none | bandwidth RATE | all
  local f=$1
  cat >"$f" <<EOF
# bench/throttle.sh: the tunnelbench servers reachable on loopback; --listen and
# --admin-listen come from the command line.
[server]
drain_timeout = "1s"

[policy]
deny_private = false
allowed_ports = [$P_SINK, $P_SOURCE, $P_ECHO]
EOF
  case $2 in
    none) ;;
    bandwidth) printf '\n[limits.per_client]\nbandwidth_up = %s\nbandwidth_down = %s\n' "$3" "$3" >>"$f" ;;
    all) cat >>"$f" <<EOF

# Every kind of limit configured, none binding for connrate's 1-byte tunnels
# (at most one tunnel per client at a time, about 10 new tunnels/s per client).
[limits]
max_tunnels = 100000
bandwidth = "10 GiB/s"

[limits.per_client]
max_tunnels = 64
new_tunnels_per_second = 1000
new_tunnels_burst = 1000
bandwidth_up = "10 MiB/s"
bandwidth_down = "10 MiB/s"
EOF
      ;;
  esac
}
write_config "$TMP/small.toml" bandwidth "$TH_LIMIT"
write_config "$TMP/big.toml" bandwidth "$TH_BIG_LIMIT"
write_config "$TMP/single.toml" bandwidth "$TH_SINGLE_LIMIT"
write_config "$TMP/none.toml" none
write_config "$TMP/all.toml" all
cp "$TMP"/*.toml "$TH_OUT/"

PROXY_PID=""
PROXY=""
lines_of() { if [ -f "$1" ]; then wc -l <"$1"; else echo 0; fi; }

# A free port is free when chosen; any connect() on the box may take it as its ephemeral port
# before the proxy binds it. Such a start is retried on new ports (at most 5 tries).
start_veilgate() { # start_veilgate BUILD CONFIG: sets PROXY_PID and PROXY
  local p_proxy p_admin _ try from lg=$TH_OUT/veilgate-$1.log
  for try in 1 2 3 4 5; do
    read -r p_proxy p_admin < <("$VG" free-ports --count 2)
    from=$(($(lines_of "$lg") + 1))
    "$TMP/veilgate-$1" run --config "$2" --listen "127.0.0.1:$p_proxy" --admin-listen "127.0.0.1:$p_admin" >>"$lg" 2>&1 &
    PROXY_PID=$!
    STARTED+=("$PROXY_PID")
    PROXY=127.0.0.1:$p_proxy
    for _ in $(seq 150); do
      if http_ok "$p_admin" /readyz; then return 0; fi
      kill -0 "$PROXY_PID" 2>/dev/null || break
      sleep 0.1
    done
    kill -0 "$PROXY_PID" 2>/dev/null && die "veilgate $1 not ready within 15 s: $(tail -3 "$lg")"
    stop_pid "$PROXY_PID"
    tail -n +"$from" "$lg" | grep -q "Address already in use" || die "veilgate $1 exited at start: $(tail -3 "$lg")"
    log "veilgate $1: a chosen port was taken before it bound it (try $try), choosing new ports"
  done
  die "veilgate $1: no free ports in 5 tries"
}

start_squid() { # sets PROXY_PID and PROXY; Squid's scratch directory is $TMP/squid
  local port d=$TMP/squid try from
  for try in 1 2 3 4 5; do
    read -r port < <("$VG" free-ports --count 1)
    from=$(($(lines_of "$TH_OUT/squid.out.log") + 1))
    rm -rf "$d" && mkdir -p "$d" && chmod 777 "$d"
    sed -e "s#@PORT@#$port#g" -e "s#@SCR@#$d#g" -e "s#@RATE@#$TH_LIMIT#g" "$HERE/squid-delaypool.conf.in" >"$d/squid.conf"
    chmod 644 "$d/squid.conf"
    cp "$d/squid.conf" "$TH_OUT/squid.conf"
    "$SQUID_BIN" -N -f "$d/squid.conf" >>"$TH_OUT/squid.out.log" 2>&1 &
    PROXY_PID=$!
    STARTED+=("$PROXY_PID")
    PROXY=127.0.0.1:$port
    if wait_port "$port" "$PROXY_PID"; then return 0; fi
    stop_pid "$PROXY_PID"
    cat "$d/cache.log" >>"$TH_OUT/squid-cache.log" 2>/dev/null || true
    { cat "$d/cache.log" 2>/dev/null; tail -n +"$from" "$TH_OUT/squid.out.log"; } | grep -q "Address already in use" ||
      die "squid did not start: $(tail -3 "$TH_OUT/squid.out.log") $(tail -3 "$d/cache.log" 2>/dev/null)"
    log "squid: its port was taken before it bound it (try $try), choosing a new one"
  done
  die "squid: no free port in 5 tries"
}

acct_pids() { # the proxy and its direct children (none expected), comma-separated
  echo "$1 $(ps -o pid= --ppid "$1" 2>/dev/null || true)" | xargs | tr ' ' ','
}

ROUND=0
run_client() { # run_client CASE BUILD TIME_LIMIT TOOL ARGS...: one bounded client, one JSON line
  local case=$1 build=$2 lim=$3 tool=$4 rc=0 line raw=$TMP/last.json
  shift 4
  # In the background and waited for, so a signal to this script is handled at once.
  timeout -k 5 "$lim" "$tool" "$@" >"$raw" 2> >(tee -a "$TH_OUT/human.log" >&2) &
  TB_PID=$!
  wait "$TB_PID" || rc=$?
  TB_PID=""
  line=$(tail -n 1 "$raw")
  if [ $rc -ne 0 ] || ! jq -e 'type == "object"' <<<"$line" >/dev/null 2>&1; then
    log "$case $build: exited $rc"
    line=$(jq -cn --arg e "exit $rc: $(tail -c 300 "$raw" | tr -d '\n')" '{error: $e}')
  fi
  jq -c --arg case "$case" --arg build "$build" --arg proxy "$(label_of "$build")" --argjson round "$ROUND" \
    '. + {case: $case, build: $build, proxy_name: $proxy, round: $round}' <<<"$line" >>"$TH_OUT/results.jsonl"
}

throttle_case() { # throttle_case CASE BUILD|squid [CONNS]
  local case=$1 build=$2 dir target cfg addr conns limit=() pids lim name
  case $case in
    *down*) dir=down; target=127.0.0.1:$P_SOURCE ;;
    *) dir=up; target=127.0.0.1:$P_SINK ;;
  esac
  case $case in
    big-*) cfg=$TMP/big.toml; addr=$ADDR_BIG; conns=$TH_BIG_CONNS; limit=(--limit "$TH_BIG_LIMIT") ;;
    single-*) cfg=$TMP/single.toml; addr=127.0.1.2; conns=$3; limit=(--limit "$TH_SINGLE_LIMIT") ;;
    free-*) cfg=$TMP/none.toml; addr=$ADDR_SMALL; conns=$TH_CONNS ;;
    *) cfg=$TMP/small.toml; addr=$ADDR_SMALL; conns=$TH_CONNS; limit=(--limit "$TH_LIMIT") ;;
  esac
  if [ "$build" = squid ]; then start_squid; name=squid; else start_veilgate "$build" "$cfg"; name=$(label_of "$build"); fi
  log "round $ROUND/$TH_RUNS: $case via $name ($conns tunnels)"
  pids=$(acct_pids "$PROXY_PID")
  # Opening the tunnels (one after another) comes before the window; up waits up to 10 s for
  # the sink to confirm the bytes in flight.
  lim=$((TH_SECS + 60 + conns / 20))
  local before after
  before=$(cpu_ticks "$pids")
  run_client "$case" "$build" "$lim" "$TB" throttle --proxy "$PROXY" --target "$target" --dir "$dir" \
    --conns "$conns" --bind "$addr" --secs "$TH_SECS" "${limit[@]}" --pid "$pids" --label "$name" --op-timeout 30
  after=$(cpu_ticks "$pids")
  add_cpu_split "$before" "$after"
  stop_pid "$PROXY_PID"
}

cpu_ticks() { # cpu_ticks PIDS: "utime stime" in clock ticks, summed over the comma-separated PIDs
  local p u=0 s=0 fields
  for p in ${1//,/ }; do
    # Fields 14 and 15 of /proc/PID/stat, counted after the command name (which may hold spaces).
    fields=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | cut -d' ' -f12,13) || continue
    [ -n "$fields" ] || continue
    u=$((u + ${fields% *})) s=$((s + ${fields#* }))
  done
  echo "$u $s"
}

add_cpu_split() { # add_cpu_split "U0 S0" "U1 S1": the proxy's user and system shares of its CPU
  # in the client's run, added to the last result line (tunnelbench reports their sum only)
  local du ds out=$TH_OUT/results.jsonl
  du=$((${2% *} - ${1% *})) ds=$((${2#* } - ${1#* }))
  [ $((du + ds)) -gt 0 ] || return 0
  { head -n -1 "$out"; tail -n 1 "$out" | jq -c --argjson u "$du" --argjson s "$ds" \
    '. + {proxy_user_share: ($u / ($u + $s)), proxy_system_share: ($s / ($u + $s))}'; } >"$out.tmp" && mv "$out.tmp" "$out"
}

CR_PAIR=0
connrate_case() { # one pair per build: no limits and every limit configured, order alternating
  local build kind cfg order=(none all)
  CR_PAIR=$((CR_PAIR + 1))
  if [ $((CR_PAIR % 2)) = 0 ]; then order=(all none); fi
  for build in "${BUILDS[@]}"; do
    for kind in "${order[@]}"; do
      cfg=$TMP/$kind.toml
      start_veilgate "$build" "$cfg"
      log "round $ROUND/$TH_RUNS: connrate ($kind limits) via $(label_of "$build")"
      run_client "connrate-$kind" "$build" 200 "$VG" connrate --proxy "$PROXY" --target "127.0.0.1:$P_ECHO" \
        --conns "$TH_CR_CONC" --total "$TH_CR_TOTAL" --bind "$ADDR_CR" --max-secs 150 --pid "$PROXY_PID" \
        --label "$(label_of "$build")"
      stop_pid "$PROXY_PID"
    done
  done
}

# ------------------------------------------------------------------ the rounds

for ROUND in $(seq "$TH_RUNS"); do
  for c in $TH_CASES; do
    case $c in
      squid) if [ -n "$HAVE_SQUID" ]; then throttle_case down squid; fi ;;
      connrate) for _ in $(seq "$TH_CR_PAIRS"); do connrate_case; done ;;
      single)
        for n in $TH_SINGLE_CONNS; do
          for d in down up; do for b in "${BUILDS[@]}"; do throttle_case "single-$d/$n" "$b" "$n"; done; done
        done
        ;;
      *) for b in "${BUILDS[@]}"; do throttle_case "$c" "$b"; done ;;
    esac
  done
done
stop_pid "$SERVE_PID"
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$TH_OUT/env.txt"

log "done"
{
  sed 's/^/    /' "$TH_OUT/env.txt"
  echo
  python3 "$HERE/throttle_table.py" "$TH_OUT/results.jsonl"
} | tee "$TH_OUT/summary.md"
