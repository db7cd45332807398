#!/usr/bin/env bash
# The real Prometheus check: the dashboard, the metrics and the alerts against a live veilgate
# and a live Prometheus, all on 127.0.0.1.
#
#   VEILGATE_BIN=target/debug/veilgate bash .ci/prometheus-check.sh
#
# Steps (each prints PASS or FAIL; the exit status is non-zero if any failed):
#   1 static check of grafana/veilgate.json
#   2 start a TCP echo origin and veilgate on free loopback ports
#   3 tunnels and refusals through veilgate; /metrics must count them; SIGHUP reload
#   4 promtool check metrics on a scrape of /metrics
#   5 start prometheus (Debian package `prometheus`) scraping veilgate every second
#   6 every dashboard expr, variable query and alert rule evaluated by that Prometheus
#   7 promtool check rules / check config / test rules for deploy/prometheus
# Every process started here is stopped on exit. Traffic goes to 127.0.0.1 only; the one
# hostname used, nothing.invalid, is answered by veilgate itself and never queried.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD

VEILGATE_BIN=${VEILGATE_BIN:-target/debug/veilgate}
PY=${PYTHON:-python3}
DASHBOARD=${DASHBOARD:-grafana/veilgate.json}
ALERTS=deploy/prometheus/alerts.yml
STARTED=$SECONDS
DEADLINE=110 # seconds; the whole check must stay under two minutes

TMP=$(mktemp -d "${TMPDIR:-/tmp}/veilgate-prom.XXXXXX")
PIDS=()
FAILED=()

# shellcheck disable=SC2329 # invoked by the EXIT trap
cleanup() {
    local pid i
    # Newest first: traffic, prometheus, veilgate, origin.
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid=${PIDS[i]}
        kill -TERM "$pid" 2>/dev/null || continue
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    [[ -n ${WATCHDOG:-} ]] && { kill "$WATCHDOG" 2>/dev/null; wait "$WATCHDOG" 2>/dev/null; }
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'echo "FAIL: interrupted"; exit 130' INT TERM

# Whole-run bound: SIGTERM ourselves (the trap above then stops everything).
(
    trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
    sleep "$DEADLINE" &
    sleeper=$!
    wait "$sleeper" && echo "FAIL: the check took longer than ${DEADLINE}s" && kill -TERM $$
) 2>/dev/null &
WATCHDOG=$!

pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; FAILED+=("$*"); }
finish() {
    echo
    if ((${#FAILED[@]})); then
        echo "prometheus-check: FAILED (${#FAILED[@]}): ${FAILED[*]}  [$((SECONDS - STARTED))s]"
        exit 1
    fi
    echo "prometheus-check: all steps passed [$((SECONDS - STARTED))s]"
    exit 0
}
abort() { fail "$*"; finish; }

# wait_for SECONDS DESCRIPTION COMMAND...: polls COMMAND every 0.2 s.
wait_for() {
    local t=$1 what=$2 end
    shift 2
    end=$((SECONDS + t))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= end)); then
            echo "  timed out after ${t}s waiting for $what"
            return 1
        fi
        sleep 0.2
    done
}
http_ok() { curl -fsS --max-time 2 -o /dev/null "$1"; }
show_log() { echo "  --- last lines of $1"; tail -n 20 "$1" | sed 's/^/  | /'; }

# ---------------------------------------------------------------- tools
need() { command -v "$1" >/dev/null 2>&1; }
for tool in "$PY" curl; do need "$tool" || abort "tools: $tool is not installed"; done
if ! need prometheus || ! need promtool; then
    if [[ $(id -u) == 0 ]] && need apt-get; then
        echo "== installing the Debian prometheus package (the service is not started)"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) \
            >"$TMP/apt.log" 2>&1 || { show_log "$TMP/apt.log"; abort "tools: apt-get install prometheus"; }
    fi
    if ! need prometheus || ! need promtool; then
        abort "tools: prometheus and promtool are needed (apt-get install prometheus)"
    fi
fi
[[ -x $VEILGATE_BIN ]] || abort "tools: VEILGATE_BIN=$VEILGATE_BIN is not an executable (run cargo build first)"
echo "veilgate: $VEILGATE_BIN ($("$VEILGATE_BIN" --version 2>&1)); $(prometheus --version 2>&1 | head -n1)"

# ---------------------------------------------------------------- 1 dashboard, static
echo
echo "== 1. static check of $DASHBOARD"
if "$PY" .ci/dashboard_check.py static "$DASHBOARD"; then pass "1 dashboard static check"; else fail "1 dashboard static check"; fi

# ---------------------------------------------------------------- 2 origin + veilgate
echo
echo "== 2. echo origin and veilgate on 127.0.0.1"
"$PY" .ci/traffic.py echo "$TMP/origin.port" >"$TMP/origin.log" 2>&1 &
PIDS+=($!)
wait_for 10 "the echo origin" test -s "$TMP/origin.port" || { show_log "$TMP/origin.log"; abort "2 echo origin did not start"; }
ORIGIN=$(cat "$TMP/origin.port")
read -r PROXY_PORT ADMIN_PORT PROM_PORT < <("$PY" .ci/traffic.py ports 3)
PROXY=127.0.0.1:$PROXY_PORT
ADMIN=127.0.0.1:$ADMIN_PORT
PROM=http://127.0.0.1:$PROM_PORT

cat >"$TMP/veilgate.toml" <<EOF
[server]
header_timeout = "2s"
connect_timeout = "2s"
drain_timeout = "2s"

[limits]
max_tunnels = 1000

[limits.per_client]
bandwidth_down = "100 MiB/s"

[policy]
deny_private = false
allowed_ports = [$ORIGIN]

[dns]
# Nothing here needs a resolver (127.0.0.1 literals; nothing.invalid is answered locally).
# Should a lookup happen anyway, it goes to a closed loopback port, never off the machine.
servers = ["127.0.0.1:9"]
timeout = "1s"

# An egress pool every tunnel leaves from, and a parent no route uses (its health check
# finds nobody on the discard port, so it shows down): the dashboard's egress and parent
# panels have their series.
[egress]
default_pool = "ci"

[[egress.pools]]
name = "ci"
addresses = ["127.0.0.1"]

[[upstreams]]
name = "ci-parent"
url = "socks5h://127.0.0.1:9"
health_check = "1h"
EOF
VEILGATE_LOG=${VEILGATE_LOG:-info} "$VEILGATE_BIN" run --config "$TMP/veilgate.toml" \
    --listen "$PROXY" --admin-listen "$ADMIN" >"$TMP/veilgate.log" 2>&1 &
VEILGATE_PID=$!
PIDS+=("$VEILGATE_PID")
if wait_for 15 "veilgate /readyz" http_ok "http://$ADMIN/readyz" && http_ok "http://$ADMIN/healthz"; then
    pass "2 origin on 127.0.0.1:$ORIGIN, veilgate proxy $PROXY, admin $ADMIN (/healthz, /readyz 200)"
else
    show_log "$TMP/veilgate.log"
    abort "2 veilgate did not become ready"
fi

# ---------------------------------------------------------------- 3 traffic
echo
echo "== 3. traffic through veilgate"
step3=ok
"$PY" .ci/traffic.py drive "$PROXY" "$ORIGIN" "$ADMIN" || step3=
# A configuration reload (SIGHUP) must be counted as ok.
kill -HUP "$VEILGATE_PID"
if wait_for 5 "config_reloads_total{result=ok}" \
    sh -c "curl -fsS --max-time 2 http://$ADMIN/metrics | grep -Eq '^veilgate_config_reloads_total\{result=\"ok\"\} [1-9]'"; then
    echo "  ok   SIGHUP reload counted in veilgate_config_reloads_total{result=\"ok\"}"
else
    echo "  FAIL SIGHUP reload not counted as ok"
    step3=
fi
if [[ -n $step3 ]]; then pass "3 tunnels, refusals and reload, counted in /metrics"; else show_log "$TMP/veilgate.log"; fail "3 traffic"; fi
# Keep traffic flowing while Prometheus scrapes, so rates and the active gauge are not zero.
"$PY" .ci/traffic.py background "$PROXY" "$ORIGIN" 80 >"$TMP/background.log" 2>&1 &
PIDS+=($!)

# ---------------------------------------------------------------- 4 promtool check metrics
echo
echo "== 4. promtool check metrics"
if curl -fsS --max-time 5 "http://$ADMIN/metrics" -o "$TMP/scrape.txt"; then
    promtool check metrics <"$TMP/scrape.txt" >"$TMP/lint.txt" 2>&1
    rc=$?
    if ((rc == 0)) && ! [[ -s $TMP/lint.txt ]]; then
        pass "4 promtool check metrics: no problems in $(grep -c '^veilgate_' "$TMP/scrape.txt") samples"
    else
        sed 's/^/  | /' "$TMP/lint.txt"
        fail "4 promtool check metrics (exit $rc)"
    fi
else
    fail "4 could not scrape http://$ADMIN/metrics"
fi

# ---------------------------------------------------------------- 5 prometheus
echo
echo "== 5. prometheus scraping veilgate"
cat >"$TMP/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $ROOT/$ALERTS
scrape_configs:
  - job_name: veilgate
    static_configs:
      - targets: ["$ADMIN"]
EOF
mkdir -p "$TMP/tsdb"
prometheus --config.file="$TMP/prometheus.yml" --storage.tsdb.path="$TMP/tsdb" \
    --web.listen-address="127.0.0.1:$PROM_PORT" --log.level=warn >"$TMP/prometheus.log" 2>&1 &
PIDS+=($!)
# shellcheck disable=SC2329 # called through wait_for
target_up() {
    curl -fsS --max-time 2 "$PROM/api/v1/targets" |
        "$PY" -c 'import json,sys; t=json.load(sys.stdin)["data"]["activeTargets"]; sys.exit(0 if t and all(x["health"]=="up" for x in t) else 1)'
}
if wait_for 20 "prometheus /-/ready" http_ok "$PROM/-/ready" && wait_for 20 "the veilgate target to be up" target_up; then
    sleep 6 # a few more scrapes (1 s apart), enough for rate() over 1m
    pass "5 prometheus on $PROM scrapes $ADMIN (target up)"
else
    show_log "$TMP/prometheus.log"
    curl -fsS --max-time 2 "$PROM/api/v1/targets" 2>/dev/null | head -c 2000
    abort "5 prometheus did not scrape veilgate"
fi

# ---------------------------------------------------------------- 6 evaluate the dashboard
echo
echo "== 6. dashboard and alert expressions evaluated by prometheus"
curl -fsS --max-time 5 "http://$ADMIN/metrics" -o "$TMP/scrape.txt" || fail "6 could not scrape /metrics"
if "$PY" .ci/dashboard_check.py eval "$DASHBOARD" "$PROM" "$TMP/scrape.txt" "$ALERTS"; then
    pass "6 every expr evaluates without error, returns data, and names only scraped metrics"
else
    fail "6 dashboard/alert expressions"
fi

# ---------------------------------------------------------------- 7 promtool rules/config
echo
echo "== 7. promtool on deploy/prometheus"
step7=ok
promtool check rules "$ALERTS" 2>&1 | sed 's/^/  | /'; ((PIPESTATUS[0] == 0)) || step7=
promtool check config deploy/prometheus/prometheus.yml 2>&1 | sed 's/^/  | /'; ((PIPESTATUS[0] == 0)) || step7=
promtool test rules .ci/alerts_test.yml 2>&1 | sed 's/^/  | /'; ((PIPESTATUS[0] == 0)) || step7=
if [[ -n $step7 ]]; then pass "7 promtool check rules, check config, test rules"; else fail "7 promtool"; fi

# ---------------------------------------------------------------- 8 shutdown
echo
echo "== 8. shutdown"
if grep -Eiq 'panicked|thread .* panicked' "$TMP/veilgate.log"; then
    show_log "$TMP/veilgate.log"
    fail "8 veilgate panicked"
else
    pass "8 no panic in the veilgate log; every started process is stopped on exit"
fi
finish
