#!/usr/bin/env bash
# bench/cluster.sh: what admission in Redis costs per tunnel. One veilgate (release build) with
# [cluster] backend = "local", then the same limits with backend = "redis", in turn, VG_RUNS
# times; vgbench connrate through each (CONNECT, 200, one byte echoed, close), 50 clients
# (127.0.1.2-51) so no per-client cap binds. Limits: a global cap, a per-client cap and a
# per-client new-tunnel rate, all far above the load, so Redis runs both scripts (global
# lease, then the client's) for every tunnel. Also Redis' own command counts per tunnel.
#
#   bench/cluster.sh      needs redis-server and target/release/veilgate and vgbench
#
# Knobs: VEILGATE_BIN [target/release/veilgate]  VGBENCH [bench/target/release/vgbench]
#        VG_RUNS [3]  VG_CR_CONC [50]  VG_CR_TOTAL [3000]
#        VEILGATE_BIN_BASE [unset]: a build without [cluster] (e.g. main before it), run in turn
#        with the same limits, so the local backend's cost can be compared with it
# Loopback only; every process started here is stopped on exit.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VEILGATE_BIN=${VEILGATE_BIN:-$ROOT/target/release/veilgate}
VGBENCH=${VGBENCH:-$ROOT/bench/target/release/vgbench}
VG_RUNS=${VG_RUNS:-3}
VG_CR_CONC=${VG_CR_CONC:-50}
VG_CR_TOTAL=${VG_CR_TOTAL:-3000}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/vg-cluster-bench.XXXXXX")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

read -r -a PORTS < <("$VGBENCH" free-ports --count 4)
P_ECHO=${PORTS[0]} P_REDIS=${PORTS[1]} P_VG=${PORTS[2]} P_ADMIN=${PORTS[3]}
"$VGBENCH" serve --echo "127.0.0.1:$P_ECHO" --max-secs 1800 >/dev/null 2>&1 & PIDS+=($!)
redis-server --port "$P_REDIS" --bind 127.0.0.1 --save '' --appendonly no --daemonize no --loglevel warning >"$TMP/redis.log" 2>&1 & PIDS+=($!)
for _ in $(seq 100); do redis-cli -p "$P_REDIS" ping >/dev/null 2>&1 && break; sleep 0.05; done
BIND=$(seq -s, -f '127.0.1.%g' 2 51)

config() { # backend (local | redis | base)
  [ "$1" = base ] && { config local | sed '/^\[cluster\]/,$d'; return; }
  cat <<CONF
[limits]
max_tunnels = 100000
[limits.per_client]
max_tunnels = 10000
new_tunnels_per_second = 100000
[policy]
deny_private = false
allowed_ports = [$P_ECHO]
[cluster]
backend = "$1"
redis_url = "redis://127.0.0.1:$P_REDIS/0"
CONF
}

one() { # backend run
  config "$1" >"$TMP/$1.toml"
  local bin=$VEILGATE_BIN
  [ "$1" = base ] && bin=$VEILGATE_BIN_BASE
  "$bin" run -c "$TMP/$1.toml" --listen "127.0.0.1:$P_VG" --admin-listen "127.0.0.1:$P_ADMIN" >"$TMP/$1.log" 2>&1 &
  local vg=$!
  for _ in $(seq 100); do
    curl -fs "127.0.0.1:$P_ADMIN/metrics" 2>/dev/null | grep -q "$( [ "$1" = redis ] && echo 'veilgate_cluster_mode{mode="redis"} 1' || echo build_info)" && break
    sleep 0.05
  done
  redis-cli -p "$P_REDIS" config resetstat >/dev/null
  "$VGBENCH" connrate --proxy "127.0.0.1:$P_VG" --target "127.0.0.1:$P_ECHO" --conns "$VG_CR_CONC" \
    --total "$VG_CR_TOTAL" --pid "$vg" --bind "$BIND" --label "$1" >"$TMP/$1-$2.json"
  sleep 0.5 # the last releases
  local decisions
  decisions=$(curl -fs "127.0.0.1:$P_ADMIN/metrics" | awk '
    /^veilgate_cluster_decision_duration_seconds_sum/ { s = $2 } /^veilgate_cluster_decision_duration_seconds_count/ { n = $2 }
    END { if (n > 0) printf "decision_mean_us=%.0f", s / n * 1e6 }')
  # Redis counts the commands a script runs too: EVALSHA is one round trip, the rest is inside.
  local stats
  stats=$(redis-cli -p "$P_REDIS" info commandstats | tr -d '\r' | awk -F'[=,:]' '
    /^cmdstat_/ { all += $3; if ($1 == "cmdstat_evalsha") ev = $3; if ($1 == "cmdstat_zrem") zr = $3 }
    END { printf "evalsha=%d zrem=%d all_commands=%d", ev, zr, all }')
  echo "$1 run $2: $(cat "$TMP/$1-$2.json") $stats $decisions"
  kill "$vg"; wait "$vg" 2>/dev/null || true
}

LEGS=(local redis)
[ -n "${VEILGATE_BIN_BASE:-}" ] && LEGS+=(base)
for run in $(seq "$VG_RUNS"); do
  # The order turns every run, so no leg always follows the same one.
  for i in "${!LEGS[@]}"; do one "${LEGS[$(((i + run) % ${#LEGS[@]}))]}" "$run"; done
done
