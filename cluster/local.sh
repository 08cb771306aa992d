#!/usr/bin/env bash
# A multi-node Ray cluster on this one machine: a head node and N worker nodes, each its own
# `ray start`, with token authentication on. Use it to try `--backend ray --address auto`
# before paying for a real cluster.
#
#   cluster/local.sh up [N]   start a head and N worker nodes (default 1)
#   cluster/local.sh status   `ray status` and the number of alive nodes
#   cluster/local.sh down     stop this cluster's processes (safe when nothing runs)
#
# Settings (environment): REPTILE_RAY_PORT (6379), REPTILE_RAY_TEMP_DIR (the cluster's private
# directory, mode 700, by default $XDG_RUNTIME_DIR/reptile-local or else ~/.cache/reptile-local:
# Ray's temp dirs, the log and the head's address live under it), REPTILE_HEAD_CPUS (2),
# REPTILE_WORKER_CPUS (1), REPTILE_OBJECT_STORE_MB (512 per node), REPTILE_DASHBOARD_PORT (8265:
# dashboard and job API), REPTILE_RAY_CLIENT_PORT (10001), REPTILE_AGENT_PORT (52365: the head's
# dashboard agent; worker node i takes the port + i).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PORT="${REPTILE_RAY_PORT:-6379}"
# The cluster's files live in a directory only this user can enter: at a fixed /tmp path another
# user could create it first, read the logs, or plant the head address that `status` would
# connect to with the token. Ray makes its own temp dir world-writable (0777), so Ray's is a
# subdirectory.
STATE_DIR="${REPTILE_RAY_TEMP_DIR:-${XDG_RUNTIME_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}}/reptile-local}"
TEMP_DIR="$STATE_DIR/ray"
HEAD_CPUS="${REPTILE_HEAD_CPUS:-2}"
WORKER_CPUS="${REPTILE_WORKER_CPUS:-1}"
OBJECT_STORE_BYTES=$(( ${REPTILE_OBJECT_STORE_MB:-512} * 1024 * 1024 ))
DASHBOARD_PORT="${REPTILE_DASHBOARD_PORT:-8265}"
CLIENT_PORT="${REPTILE_RAY_CLIENT_PORT:-10001}"
AGENT_PORT="${REPTILE_AGENT_PORT:-52365}"
# The engine's Ray settings (reptile_dist/engine/cluster.py SYSTEM_CONFIG); the head passes them
# to every node.
SYSTEM_CONFIG='{"max_direct_call_object_size": 4194304}'
LOG="$STATE_DIR/local-sh.log"

# Ray 2.60 rejects a node or client without the cluster's token (InvalidAuthToken after 20 s),
# so everything started or queried from here runs in token mode.
export RAY_AUTH_MODE=token

die() { echo "local.sh: $*" >&2; exit 1; }

if [[ -x "$ROOT/.venv/bin/ray" ]]; then
  RAY="$ROOT/.venv/bin/ray"
elif command -v ray >/dev/null 2>&1; then
  RAY="$(command -v ray)"
else
  die "no 'ray' found: create .venv (make install) or put ray on PATH"
fi
PYTHON="$(dirname "$RAY")/python"
[[ -x "$PYTHON" ]] || PYTHON=python3
# A job's entrypoint inherits the head's environment: with ray's own bin directory first on PATH,
# `ray job submit ... -- reptile-dist train ...` finds the program (and python) installed beside
# that ray, as on the cloud clusters, without activating the virtualenv first.
export PATH="$(dirname "$RAY"):$PATH"

# Creates STATE_DIR, or checks the one there: it must be a directory of this user's, not a link.
# Every command runs this before it reads anything inside.
ensure_state_dir() {
  if [[ ! -e "$STATE_DIR" && ! -L "$STATE_DIR" ]]; then
    (umask 077 && mkdir -p "$STATE_DIR") || die "cannot create $STATE_DIR; set REPTILE_RAY_TEMP_DIR"
  fi
  if [[ -L "$STATE_DIR" || ! -d "$STATE_DIR" || ! -O "$STATE_DIR" ]]; then
    die "$STATE_DIR is not this user's own directory; set REPTILE_RAY_TEMP_DIR to another path"
  fi
  chmod 700 "$STATE_DIR"
}

# Ray puts its unix sockets at <node temp dir>/session_<date>_<time>_<pid>/sockets/plasma_store
# and a socket path holds at most 107 bytes; that tail takes 64 of them (with a 7-digit pid).
check_socket_room() {
  local n="$1" longest="$TEMP_DIR" most=$((107 - 64)) LC_ALL=C
  (( n == 0 )) || longest="$TEMP_DIR/node-$n"
  if (( ${#longest} > most )); then
    die "$longest is too long for Ray's socket paths (${#longest} bytes, at most $most); shorten REPTILE_RAY_TEMP_DIR"
  fi
}

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }'; }

ensure_token() {
  # Prints the token; keep it off the terminal. Creates ~/.ray/auth_token when none exists.
  "$RAY" get-auth-token --generate >/dev/null
  if [[ -z "${RAY_AUTH_TOKEN:-}${RAY_AUTH_TOKEN_PATH:-}" ]]; then
    chmod 600 "$HOME/.ray/auth_token"
  fi
}

# This cluster's processes, by PID: the daemons `ray start` left behind name TEMP_DIR in their
# command lines, except the Ray Client server (present with ray[default]), which names the head's
# address; workers and agents rename themselves (ray::IDLE, ...) but descend from a raylet.
# Scoping like this, instead of `ray stop`, leaves other Ray instances on the machine (a test
# suite's ray.init(), another user's cluster) alone. `ps -ww`: without it ps cuts each line at
# $COLUMNS where the environment sets it (80 in pytest-xdist's workers here), before the temp
# dir, and `down` found nothing to stop.
cluster_pids() {
  local address=""
  [[ -s "$TEMP_DIR/ray_current_cluster" ]] && address=$(cat "$TEMP_DIR/ray_current_cluster")
  ps -ww -eo pid=,ppid=,args= | NEEDLE="$TEMP_DIR" ADDRESS="$address" SELF="$$" awk '
    {
      pid = $1; parent[pid] = $2; order[NR] = pid
      n = ENVIRON["NEEDLE"]; a = ENVIRON["ADDRESS"]; line = $0
      tail = substr(line, length(line) - length(n))
      if (pid == ENVIRON["SELF"]) next
      if (index(line, "=" n "/") || index(line, "=" n " ") || tail == "=" n)
        mine[pid] = 1
      if (a != "" && index(line, "ray.util.client.server") && index(line, "--address=" a " "))
        mine[pid] = 1
    }
    END {
      do {
        grew = 0
        for (i = 1; i <= NR; i++) {
          p = order[i]
          if (!(p in mine) && (parent[p] in mine)) { mine[p] = 1; grew = 1 }
        }
      } while (grew)
      for (p in mine) print p
    }'
}

alive() {
  local p state
  for p in "$@"; do
    state=$(awk '{ print $3 }' "/proc/$p/stat" 2>/dev/null || true)
    if [[ -n "$state" && "$state" != Z ]]; then echo "$p"; fi
  done
}

head_address() {
  [[ -s "$TEMP_DIR/ray_current_cluster" ]] || die "no head address in $TEMP_DIR/ray_current_cluster"
  cat "$TEMP_DIR/ray_current_cluster"
}

print_usage_hint() {
  local address="$1"
  cat <<EOF

Ray cluster up at $address (token auth on; token in ${RAY_AUTH_TOKEN_PATH:-~/.ray/auth_token}).
In the shell that runs the program:
  export RAY_AUTH_MODE=token RAY_ADDRESS=$address
  reptile-dist train --config sine --backend ray --workers 2 --mode async --address auto --out runs/sine-ray
or as a job (dashboard and job API on http://127.0.0.1:$DASHBOARD_PORT):
  RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:$DASHBOARD_PORT \\
    --runtime-env cluster/runtime_env.yaml --working-dir . -- \\
    reptile-dist train --config sine --backend ray --workers 2 --mode sync --address auto --out \$PWD/runs/sine-job
Check: cluster/local.sh status    Stop: cluster/local.sh down
EOF
}

cmd_up() {
  local n="${1:-1}" t0 t address i
  [[ "$n" =~ ^[0-9]+$ ]] || die "N (worker nodes) must be a whole number, got '$n'"
  ensure_state_dir
  check_socket_room "$n"
  if [[ -n "$(cluster_pids)" ]]; then
    echo "A local Ray cluster is already running under $STATE_DIR; 'down' first to change its size."
    print_usage_hint "$(head_address)"
    return 0
  fi
  mkdir -p "$TEMP_DIR"
  : >"$LOG"
  ensure_token

  t0=$(now); t=$t0
  # The dashboard and job API listen on localhost only. Ray 2.60 replaces a loopback
  # --node-ip-address with the machine's address and its GCS, raylets, dashboard agents and Ray
  # Client server listen on all interfaces; the token guards them. Every fixed port is a setting
  # so that a second cluster (a test's) can run beside this one without clashes; a taken
  # dashboard port would otherwise move silently to the next free one.
  if ! "$RAY" start --head --port="$PORT" --temp-dir="$TEMP_DIR" \
      --num-cpus="$HEAD_CPUS" --num-gpus=0 --resources='{"reptile_head": 100}' \
      --object-store-memory="$OBJECT_STORE_BYTES" \
      --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
      --dashboard-agent-listen-port="$AGENT_PORT" --ray-client-server-port="$CLIENT_PORT" \
      --system-config="$SYSTEM_CONFIG" --disable-usage-stats >>"$LOG" 2>&1; then
    tail -n 20 "$LOG" >&2
    die "head failed to start (log: $LOG)"
  fi
  address=$(head_address)
  echo "head    $address  ($HEAD_CPUS CPU, reptile_head=100)  $(since "$t")"

  for i in $(seq 1 "$n"); do
    t=$(now)
    # Several nodes on one machine need their own dashboard agent port and their own temp
    # dir: runtime environments (a job's working_dir) unpack under it, and a shared one lets a
    # worker node's unpacking replace the directory the head's driver is running in.
    if ! "$RAY" start --address="$address" --temp-dir="$TEMP_DIR/node-$i" \
        --num-cpus="$WORKER_CPUS" --object-store-memory="$OBJECT_STORE_BYTES" \
        --dashboard-agent-listen-port=$((AGENT_PORT + i)) \
        --disable-usage-stats >>"$LOG" 2>&1; then
      tail -n 20 "$LOG" >&2
      die "worker node $i failed to join (log: $LOG); run 'cluster/local.sh down' to clean up"
    fi
    echo "worker  $i/$n  ($WORKER_CPUS CPU)  $(since "$t")"
  done
  echo "up in $(since "$t0")"
  print_usage_hint "$address"
}

cmd_status() {
  ensure_state_dir
  if [[ -z "$(cluster_pids)" ]]; then
    echo "No local Ray cluster running under $STATE_DIR."
    return 0
  fi
  local address
  address=$(head_address)
  "$RAY" status --address="$address"
  "$PYTHON" - "$address" <<'EOF'
import sys

import ray

ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
nodes = ray.nodes()
print(f"{sum(n['Alive'] for n in nodes)} alive node(s) of {len(nodes)} at {sys.argv[1]}")
ray.shutdown()
EOF
}

# SIGTERM, up to 5 s to exit, then SIGKILL.
stop_pids() {
  local left=""
  [[ $# -gt 0 ]] || return 0
  kill -TERM "$@" 2>/dev/null || true
  for _ in $(seq 1 25); do
    left=$(alive "$@")
    [[ -z "$left" ]] && return 0
    sleep 0.2
  done
  # shellcheck disable=SC2086  # word splitting of the PID list is intended
  kill -KILL $left 2>/dev/null || true
}

cmd_down() {
  local pids p raylets=() gcs=() rest=() t0
  ensure_state_dir
  pids=$(cluster_pids)
  if [[ -z "$pids" ]]; then
    echo "No local Ray cluster running under $STATE_DIR."
    return 0
  fi
  t0=$(now)
  for p in $pids; do
    case "$(cat "/proc/$p/comm" 2>/dev/null || true)" in
      raylet) raylets+=("$p") ;;
      gcs_server) gcs+=("$p") ;;
      *) rest+=("$p") ;;
    esac
  done
  # The order `ray stop` uses: raylets (their workers and agents go with them), the rest, GCS last.
  stop_pids "${raylets[@]}"
  # shellcheck disable=SC2046  # word splitting of the PID list is intended
  stop_pids $(alive "${rest[@]}")
  stop_pids "${gcs[@]}"
  rm -f "$TEMP_DIR/ray_current_cluster"
  echo "stopped $(wc -w <<<"$pids") process(es) in $(since "$t0")"
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  status) cmd_status ;;
  down) cmd_down ;;
  *) echo "usage: cluster/local.sh up [N] | status | down" >&2; exit 2 ;;
esac
