# bench/lib.sh: the helpers bench/run.sh and bench/throttle.sh share (sourced, not run).
# Every PID a script starts goes into its STARTED array; stop_pid only ever signals those.

log() { echo "[$(date +%T)] $*" >&2; }
die() { log "error: $*"; exit 1; }

stop_pid() { # TERM, wait up to 10 s, then KILL; only our own PIDs, forgotten once stopped
  local pid=$1 _ keep=() p
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then log "PID $pid ignored TERM, sending KILL"; kill -KILL "$pid" 2>/dev/null || true; fi
  fi
  wait "$pid" 2>/dev/null || true
  # A stopped PID may be reused by someone else's process: never signal it again.
  for p in "${STARTED[@]}"; do [ "$p" = "$pid" ] || keep+=("$p"); done
  STARTED=("${keep[@]}")
}

wait_port() { # wait until something accepts on 127.0.0.1:$1 (at most 15 s) while PID $2 lives
  local _
  for _ in $(seq 150); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

http_ok() { # GET http://127.0.0.1:$1$2 answers 200 (one try, at most 2 s)
  # shellcheck disable=SC2016 # expanded by the inner shell
  timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$0" && printf "GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n" "$1" >&3 && head -n1 <&3 | grep -q " 200"' "$1" "$2" 2>/dev/null
}
