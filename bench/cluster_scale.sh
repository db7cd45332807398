#!/usr/bin/env bash
# bench/cluster_scale.sh: several veilgate instances behind one HAProxy, sharing their limits in
# Redis. Two parts, VG_RUNS times each, the order of 1 and 3 instances turning every run:
#
#  scale  One instance against three behind the same HAProxy (mode tcp, send-proxy-v2,
#         roundrobin, httpchk GET /readyz on the admin ports): vgbench connrate (50 workers,
#         clients 127.0.1.2-51 so no per-client cap binds), then throughput up and down
#         (VG_TP_CONNS tunnels). Limits far above the load (global cap, per-client cap and
#         new-tunnel rate, so every tunnel runs both admission scripts); no bandwidth limit.
#         CPU of every instance and of HAProxy from /proc over each measurement.
#  grants Per-client bandwidth_up = bandwidth_down = VG_BW: one client (127.0.0.1) saturating
#         through 1 and through 3 instances for VG_GRANT_SECS, down then up; Redis' commands per
#         second from INFO commandstats (CONFIG RESETSTAT just before), the delivered rate, and
#         each instance's veilgate_cluster_bandwidth_grants_total. Then VG_IDLE tunnels of as
#         many clients (127.0.2.x), opened and held idle: Redis' commands over VG_IDLE_SECS.
#
#   bench/cluster_scale.sh     needs redis-server, redis-cli, haproxy, curl,
#                              target/release/veilgate and bench/target/release/vgbench
#
# Knobs: VEILGATE_BIN [target/release/veilgate]  VGBENCH [bench/target/release/vgbench]
#        VG_RUNS [3]  VG_PARTS ["scale grants"]  VG_CR_CONC [50]  VG_CR_TOTAL [3000]
#        VG_TP_CONNS [6]  VG_TP_SECS [5]  VG_BW ["1 MiB/s"]  VG_GRANT_SECS [10]
#        VG_IDLE [100]  VG_IDLE_SECS [10]  VG_OUT [a new temporary directory]: logs, JSON
# Loopback only; every process started here is stopped by its PID on exit; every wait bounded.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
VEILGATE_BIN=${VEILGATE_BIN:-$ROOT/target/release/veilgate}
VGBENCH=${VGBENCH:-$ROOT/bench/target/release/vgbench}
VG_RUNS=${VG_RUNS:-3}
VG_PARTS=${VG_PARTS:-scale grants}
VG_CR_CONC=${VG_CR_CONC:-50}
VG_CR_TOTAL=${VG_CR_TOTAL:-3000}
VG_TP_CONNS=${VG_TP_CONNS:-6}
VG_TP_SECS=${VG_TP_SECS:-5}
VG_BW=${VG_BW:-1 MiB/s}
VG_GRANT_SECS=${VG_GRANT_SECS:-10}
VG_IDLE=${VG_IDLE:-100}
VG_IDLE_SECS=${VG_IDLE_SECS:-10}
OUT=${VG_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/vg-cluster-scale.XXXXXX")}
mkdir -p "$OUT"
for b in redis-server redis-cli haproxy curl; do command -v "$b" >/dev/null || die "$b not found"; done
[ -x "$VEILGATE_BIN" ] || die "$VEILGATE_BIN missing (cargo build --release)"
[ -x "$VGBENCH" ] || die "$VGBENCH missing (cd bench && cargo build --release)"

STARTED=()
cleanup() { local p; for p in "${STARTED[@]}"; do stop_pid "$p"; done; }
trap cleanup EXIT
TICK=$(getconf CLK_TCK)

read -r -a PORTS < <("$VGBENCH" free-ports --count 14)
P_ECHO=${PORTS[0]} P_SINK=${PORTS[1]} P_SOURCE=${PORTS[2]} P_REDIS=${PORTS[3]}
P_FRONT1=${PORTS[4]} P_FRONT3=${PORTS[5]} P_STAT=${PORTS[6]}
P_VG=("${PORTS[7]}" "${PORTS[8]}" "${PORTS[9]}") P_ADMIN=("${PORTS[10]}" "${PORTS[11]}" "${PORTS[12]}")

"$VGBENCH" serve --echo "127.0.0.1:$P_ECHO" --sink "127.0.0.1:$P_SINK" --source "127.0.0.1:$P_SOURCE" \
  --max-secs 3600 >"$OUT/serve.log" 2>&1 &
STARTED+=($!)
redis-server --port "$P_REDIS" --bind 127.0.0.1 --save '' --appendonly no --daemonize no \
  --loglevel warning >"$OUT/redis.log" 2>&1 &
STARTED+=($!)
REDIS_PID=$!
for _ in $(seq 100); do redis-cli -p "$P_REDIS" ping >/dev/null 2>&1 && break; sleep 0.05; done
redis-cli -p "$P_REDIS" ping >/dev/null || die "redis-server did not answer"

# One HAProxy for the whole run: frontend f1 -> backend b1 (vg1 alone), f3 -> b3 (vg1, vg2,
# vg3); the same settings as deploy/haproxy/haproxy.cfg with shorter check intervals. An
# instance that is not running is DOWN in its backend and gets nothing.
{
  cat <<CFG
global
    maxconn 4000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    retries 2
    option redispatch
frontend stats
    mode http
    bind 127.0.0.1:$P_STAT
    stats enable
    stats uri /stats
frontend f1
    bind 127.0.0.1:$P_FRONT1
    default_backend b1
frontend f3
    bind 127.0.0.1:$P_FRONT3
    default_backend b3
CFG
  for b in 1 3; do
    printf 'backend b%s\n    balance roundrobin\n    option httpchk GET /readyz\n    http-check expect status 200\n' "$b"
    printf '    default-server send-proxy-v2 inter 300ms fastinter 100ms downinter 200ms fall 2 rise 2\n'
    for i in $(seq "$b"); do
      printf '    server vg%s 127.0.0.1:%s check port %s\n' "$i" "${P_VG[$((i - 1))]}" "${P_ADMIN[$((i - 1))]}"
    done
  done
} >"$OUT/haproxy.cfg"
haproxy -c -q -f "$OUT/haproxy.cfg" || die "haproxy rejects $OUT/haproxy.cfg"
haproxy -db -f "$OUT/haproxy.cfg" >"$OUT/haproxy.log" 2>&1 &
STARTED+=($!)
HAPROXY_PID=$!
wait_port "$P_FRONT1" "$HAPROXY_PID" || die "haproxy did not start ($OUT/haproxy.log)"

config() { # part (scale | grants)
  cat <<CONF
[server]
proxy_protocol = "required"
proxy_protocol_from = ["127.0.0.0/8"]
[limits]
max_tunnels = 100000
[limits.per_client]
max_tunnels = 10000
new_tunnels_per_second = 100000
CONF
  [ "$1" = grants ] && printf 'bandwidth_up = "%s"\nbandwidth_down = "%s"\n' "$VG_BW" "$VG_BW"
  cat <<CONF
[policy]
deny_private = false
allowed_ports = [$P_ECHO, $P_SINK, $P_SOURCE]
[cluster]
backend = "redis"
redis_url = "redis://127.0.0.1:$P_REDIS/0"
CONF
}

VG_PIDS=()
server_up() { # backend server: HAProxy's check says UP
  curl -fs "http://127.0.0.1:$P_STAT/stats;csv" |
    awk -F, -v b="$1" -v s="$2" '$1 == b && $2 == s && $18 == "UP" { ok = 1 } END { exit !ok }'
}
# awk reads the whole page (grep -q would stop early and fail the pipe under pipefail).
in_redis() { # instance-index: its admission decides in Redis
  curl -fs "127.0.0.1:${P_ADMIN[$1]}/metrics" 2>/dev/null | awk '$0 == "veilgate_cluster_mode{mode=\"redis\"} 1" { ok = 1 } END { exit !ok }'
}
start_instances() { # part n
  local i _
  config "$1" >"$OUT/$1.toml"
  VG_PIDS=()
  for i in $(seq "$2"); do
    "$VEILGATE_BIN" run -c "$OUT/$1.toml" --listen "127.0.0.1:${P_VG[$((i - 1))]}" \
      --admin-listen "127.0.0.1:${P_ADMIN[$((i - 1))]}" >>"$OUT/vg$i.log" 2>&1 &
    STARTED+=($!)
    VG_PIDS+=($!)
  done
  for i in $(seq "$2"); do
    for _ in $(seq 200); do in_redis "$((i - 1))" && break; sleep 0.05; done
    in_redis "$((i - 1))" || die "vg$i not deciding in Redis ($OUT/vg$i.log)"
    for _ in $(seq 200); do server_up "b$2" "vg$i" && break; sleep 0.05; done
    server_up "b$2" "vg$i" || die "vg$i not UP in HAProxy's b$2"
  done
}
pids() { local IFS=,; echo "${VG_PIDS[*]}"; }
stop_instances() { local p; for p in "${VG_PIDS[@]}"; do stop_pid "$p"; done; VG_PIDS=(); }

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
cpu_mark() { # -> "t ticks(vg1) ... ticks(haproxy) ticks(redis)"
  local p s
  s=$(date +%s.%N)
  for p in "${VG_PIDS[@]}" "$HAPROXY_PID" "$REDIS_PID"; do s+=" $(cpu_ticks "$p")"; done
  echo "$s"
}
cpu_since() { # mark -> "cpu%=vg1/vg2/vg3 haproxy=x% redis=y%" over the time since the mark
  local -a a b
  read -r -a a <<<"$1"
  read -r -a b <<<"$(cpu_mark)"
  awk -v tick="$TICK" -v n="${#VG_PIDS[@]}" -v a="${a[*]}" -v b="${b[*]}" 'BEGIN {
    split(a, x, " "); split(b, y, " "); wall = y[1] - x[1]; s = ""
    for (i = 2; i <= n + 1; i++) s = s (i > 2 ? "/" : "") sprintf("%.0f", (y[i] - x[i]) / tick / wall * 100)
    printf "cpu_vg%%=%s cpu_haproxy%%=%.0f cpu_redis%%=%.0f", s, (y[n + 2] - x[n + 2]) / tick / wall * 100, (y[n + 3] - x[n + 3]) / tick / wall * 100 }'
}
metric_sum() { # instance-index name-regex: sum of the matching samples
  curl -fs "127.0.0.1:${P_ADMIN[$1]}/metrics" | awk -v re="$2" '$1 ~ re { s += $2 } END { printf "%.0f", s }'
}
per_instance() { # name-regex -> "a/b/c"
  local i s=""
  for i in "${!VG_PIDS[@]}"; do s+="${s:+/}$(metric_sum "$i" "$1")"; done
  echo "$s"
}
json() { # file key
  grep -o "\"$2\":[^,}]*" "$1" | head -1 | cut -d: -f2 | tr -d '"'
}
redis_stats() { # seconds -> evalsha/s all/s and the commands by name
  redis-cli -p "$P_REDIS" info commandstats | tr -d '\r' | awk -F'[=,:]' -v t="$1" '
    /^cmdstat_/ { all += $3; c = substr($1, 9); if (c == "evalsha") ev = $3; l = l (l ? "," : "") c "=" $3 }
    END { printf "evalsha/s=%.1f all/s=%.1f window_s=%.1f [%s]", ev / t, all / t, t, l }'
}
load() { cut -d' ' -f1-3 /proc/loadavg | tr ' ' /; }

BIND=$(seq -s, -f '127.0.1.%g' 2 51)
IDLE_BIND=$(seq -s, -f '127.0.2.%g' 1 "$VG_IDLE")

scale() { # n run
  local n=$1 front=$P_FRONT1 m f dir
  [ "$n" = 3 ] && front=$P_FRONT3
  start_instances scale "$n"
  f="$OUT/scale-$n-$2"
  m=$(cpu_mark)
  local t0
  t0=$(per_instance '^veilgate_tunnels_total')
  "$VGBENCH" connrate --proxy "127.0.0.1:$front" --target "127.0.0.1:$P_ECHO" --conns "$VG_CR_CONC" \
    --total "$VG_CR_TOTAL" --bind "$BIND" --pid "$(pids)" --label "scale-$n" >"$f-connrate.json"
  echo "scale n=$n run $2 connrate: tunnels/s=$(json "$f-connrate.json" tunnels_per_s) p50_us=$(json "$f-connrate.json" p50_us) p99_us=$(json "$f-connrate.json" p99_us) errors=$(json "$f-connrate.json" errors) vg_cpu_us/tunnel=$(json "$f-connrate.json" proxy_cpu_us_per_tunnel) $(cpu_since "$m") tunnels_by_instance=$(per_instance '^veilgate_tunnels_total') (before: $t0) load=$(load)"
  for dir in up down; do
    local tgt=$P_SINK
    [ $dir = down ] && tgt=$P_SOURCE
    m=$(cpu_mark)
    "$VGBENCH" throughput --proxy "127.0.0.1:$front" --target "127.0.0.1:$tgt" --dir $dir \
      --conns "$VG_TP_CONNS" --secs "$VG_TP_SECS" --pid "$(pids)" --label "scale-$n-$dir" >"$f-$dir.json"
    echo "scale n=$n run $2 $dir: MB/s=$(json "$f-$dir.json" mbyte_per_s) errors=$(json "$f-$dir.json" errors) vg_cpu_s/GB=$(json "$f-$dir.json" proxy_cpu_s_per_gb) $(cpu_since "$m") load=$(load)"
  done
  wait_quiet
  stop_instances
}

active_tunnels() { local i a=0; for i in "${!VG_PIDS[@]}"; do a=$((a + $(metric_sum "$i" '^veilgate_tunnels_active'))); done; echo "$a"; }
wait_quiet() { # until no tunnel is open on any instance (at most 120 s), then 2 s for the give-backs
  local _
  for _ in $(seq 1200); do [ "$(active_tunnels)" = 0 ] && break; sleep 0.1; done
  [ "$(active_tunnels)" = 0 ] || log "still $(active_tunnels) tunnels open after 120 s"
  sleep 2
}
bytes_total() { # direction -> bytes relayed by all instances so far
  local i s=0
  for i in "${!VG_PIDS[@]}"; do s=$((s + $(metric_sum "$i" "^veilgate_tunnel_bytes_total.*direction=\"$1\""))); done
  echo "$s"
}

grants() { # n run
  local n=$1 front=$P_FRONT1 f dir t0 t1 g0 b0 b1 tp _
  [ "$n" = 3 ] && front=$P_FRONT3
  start_instances grants "$n"
  f="$OUT/grants-$n-$2"
  for dir in down up; do
    local tgt=$P_SINK
    [ $dir = down ] && tgt=$P_SOURCE
    # The window is the middle of the transfer (2 s in, VG_GRANT_SECS long), and the rate is
    # what the instances relayed in it: an upload's client counts what its socket buffers
    # took, megabytes ahead of a 1 MiB/s limiter.
    "$VGBENCH" throughput --proxy "127.0.0.1:$front" --target "127.0.0.1:$tgt" --dir $dir \
      --conns "$VG_TP_CONNS" --secs $((VG_GRANT_SECS + 4)) --label "grants-$n-$dir" >"$f-$dir.json" 2>"$f-$dir.txt" &
    tp=$!
    STARTED+=($tp)
    sleep 2
    g0=$(per_instance '^veilgate_cluster_bandwidth_grants_total')
    b0=$(bytes_total $dir)
    redis-cli -p "$P_REDIS" config resetstat >/dev/null
    t0=$(date +%s.%N)
    sleep "$VG_GRANT_SECS"
    t1=$(date +%s.%N)
    b1=$(bytes_total $dir)
    echo "grants n=$n run $2 $dir: delivered_MiB/s=$(echo "scale=3; ($b1 - $b0) / ($t1 - $t0) / 1048576" | bc) $(redis_stats "$(echo "$t1 - $t0" | bc)") grants_by_instance=$(per_instance '^veilgate_cluster_bandwidth_grants_total') (before: $g0) bytes_by_instance=$(per_instance "^veilgate_tunnel_bytes_total.*direction=\"$dir\"") redis_errors_by_instance=$(per_instance '^veilgate_cluster_errors_total') load=$(load)"
    for _ in $(seq 600); do kill -0 "$tp" 2>/dev/null || break; sleep 0.1; done
    stop_pid "$tp"
    echo "grants n=$n run $2 $dir vgbench: MB/s=$(json "$f-$dir.json" mbyte_per_s) errors=$(json "$f-$dir.json" errors)"
    wait_quiet
  done
  # Idle: VG_IDLE tunnels of VG_IDLE clients opened, then Redis watched while they stay idle.
  "$VGBENCH" idle --proxy "127.0.0.1:$front" --target "127.0.0.1:$P_ECHO" --count "$VG_IDLE" \
    --bind "$IDLE_BIND" --hold $((VG_IDLE_SECS + 3)) --settle 1 --open-conc 20 --label "idle-$n" >"$f-idle.json" &
  local idle=$!
  STARTED+=($idle)
  local active=0
  for _ in $(seq 200); do active=$(active_tunnels); [ "$active" -ge "$VG_IDLE" ] && break; sleep 0.05; done
  sleep 1 # the opening's grants given back (none are asked for an idle tunnel) and its admissions done
  g0=$(per_instance '^veilgate_cluster_bandwidth_grants_total')
  local r0
  r0=$(per_instance '^veilgate_cluster_lease_renewals_total')
  redis-cli -p "$P_REDIS" config resetstat >/dev/null
  t0=$(date +%s.%N)
  sleep "$VG_IDLE_SECS"
  t1=$(date +%s.%N)
  echo "idle n=$n run $2: tunnels_active=$active $(redis_stats "$(echo "$t1 - $t0" | bc)") lease_renewals_by_instance=$(per_instance '^veilgate_cluster_lease_renewals_total') (before: $r0) grants_by_instance=$(per_instance '^veilgate_cluster_bandwidth_grants_total') (before: $g0) redis_errors_by_instance=$(per_instance '^veilgate_cluster_errors_total') load=$(load)"
  for _ in $(seq 300); do kill -0 "$idle" 2>/dev/null || break; sleep 0.1; done # its hold ends
  stop_pid "$idle"
  echo "idle n=$n run $2 vgbench: opened=$(json "$f-idle.json" opened) alive_after_hold=$(json "$f-idle.json" alive_after_hold)"
  wait_quiet
  stop_instances
}

log "output in $OUT; $(nproc) cores; load $(load); redis $(redis-server --version | grep -o 'v=[^ ]*'); $(haproxy -v | head -1)"
for part in $VG_PARTS; do
  for run in $(seq "$VG_RUNS"); do
    # The order turns every run, so neither leg always follows the other.
    if [ $((run % 2)) = 1 ]; then order="1 3"; else order="3 1"; fi
    for n in $order; do "$part" "$n" "$run"; done
  done
done
