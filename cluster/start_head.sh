#!/usr/bin/env bash
# Start a local Ray head for coevolve, bound to 127.0.0.1 only, with the
# dashboard (and its job API, which `ray job submit` talks to) on
# 127.0.0.1:${DASHBOARD_PORT:-8265}.
#
#   cluster/start_head.sh [extra `ray start` flags, e.g. --num-cpus 16 --num-gpus 8]
#   export RAY_ADDRESS=http://127.0.0.1:8265          # printed below
#   ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml \
#       -- python -m pipelines.cli run configs/...     # once `coevolve run` exists
#   cluster/stop_head.sh
#
# The head runs as `ray start --head --block` in a session of its own: its PID
# is also the id of a process group holding every process it starts, and goes
# to $STATE_DIR/head.pid. stop_head.sh stops exactly that group. Never `ray
# stop`: it kills every Ray on the machine, other people's included.
#
# Settings (environment): DASHBOARD_PORT (8265), RAY_PORT (GCS port; default a
# free one), COEVOLVE_HEAD_DIR (state folder; default runs/.ray-head),
# PYTHON (default .venv/bin/python), HEAD_TIMEOUT_S (90).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
RAY_BIN="$(dirname "$PY")/ray"
STATE_DIR="${COEVOLVE_HEAD_DIR:-$ROOT/runs/.ray-head}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
TIMEOUT_S="${HEAD_TIMEOUT_S:-90}"

mkdir -p "$STATE_DIR"
if [[ -f "$STATE_DIR/head.pid" ]] && kill -0 "$(cat "$STATE_DIR/head.pid")" 2>/dev/null; then
  echo "start_head: a head started from here is running (PID $(cat "$STATE_DIR/head.pid")); stop it with cluster/stop_head.sh" >&2
  exit 1
fi

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port_taken() {
  "$PY" -c 'import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(0)
sys.exit(1)' "$1"
}
if port_taken "$DASHBOARD_PORT"; then
  echo "start_head: port $DASHBOARD_PORT is taken (another Ray dashboard?); choose one with DASHBOARD_PORT=..." >&2
  exit 1
fi
GCS_PORT="${RAY_PORT:-$(free_port)}"
# Short on purpose: Ray's unix socket paths live under it and must stay under 108 characters.
TEMP_DIR="$(mktemp -d /tmp/cvhead-XXXXXX)"

# Take --node-ip-address 127.0.0.1 literally (otherwise Ray swaps in the host's routable address).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# Job entrypoints run through a shell of the head: `python` must be this environment's.
export PATH="$(dirname "$PY"):$PATH"

# Ray's token authentication, always: every request to the GCS, the dashboard and
# its job API must carry the token. It is RAY_AUTH_TOKEN, or the file
# RAY_AUTH_TOKEN_PATH (default ~/.ray/auth_token), generated there (mode 600) when
# neither exists. Clients need RAY_AUTH_MODE=token and the same token (printed
# below). The token never goes on a command line: the readiness probe reads its
# header from a file only this user can read.
export RAY_AUTH_MODE=token
token="${RAY_AUTH_TOKEN:-}"
token_file="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
if [[ -z "$token" && ! -s "$token_file" ]]; then
  (umask 077; mkdir -p "$(dirname "$token_file")"
   "$PY" -c 'import secrets, sys; open(sys.argv[1], "w").write(secrets.token_hex(32))' "$token_file")
  echo "start_head: generated a Ray auth token in $token_file" >&2
fi
if [[ -z "$token" ]]; then token="$(cat "$token_file")"; fi
header_file="$STATE_DIR/auth_header"
(umask 077; printf 'Authorization: Bearer %s\n' "$token" > "$header_file")
trap 'rm -f "$header_file"' EXIT
auth=(-H "@$header_file")

# Every port the head listens on is chosen here (fixed defaults would collide
# with other Rays on a shared machine), all on 127.0.0.1.
PID="$("$PY" - "$STATE_DIR/head.log" "$RAY_BIN" start --head --block \
  --node-ip-address=127.0.0.1 --port="$GCS_PORT" \
  --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
  --ray-client-server-port="$(free_port)" --dashboard-agent-listen-port="$(free_port)" \
  --temp-dir="$TEMP_DIR" --disable-usage-stats "$@" <<'PYEOF'
import subprocess, sys
log = open(sys.argv[1], "w")
proc = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                        start_new_session=True)  # its own session and process group
print(proc.pid)
PYEOF
)"
echo "$PID" > "$STATE_DIR/head.pid"
echo "$TEMP_DIR" > "$STATE_DIR/temp_dir"

# Ready when the job API answers (polled; gives up with the log after TIMEOUT_S).
deadline=$((SECONDS + TIMEOUT_S))
until curl -sf "${auth[@]}" "http://127.0.0.1:$DASHBOARD_PORT/api/version" >/dev/null 2>&1; do
  if ! kill -0 "$PID" 2>/dev/null; then
    echo "start_head: the head exited; last lines of $STATE_DIR/head.log:" >&2
    tail -n 30 "$STATE_DIR/head.log" >&2
    "$ROOT/cluster/stop_head.sh" >/dev/null 2>&1 || true
    exit 1
  fi
  if (( SECONDS > deadline )); then
    echo "start_head: no answer on 127.0.0.1:$DASHBOARD_PORT after $TIMEOUT_S s; stopping it (log: $STATE_DIR/head.log)" >&2
    "$ROOT/cluster/stop_head.sh" >&2 || true
    exit 1
  fi
  sleep 0.5
done
pgrep -g "$PID" > "$STATE_DIR/head.pids" || true

echo "Ray head on 127.0.0.1 (process group $PID: $(wc -l < "$STATE_DIR/head.pids") processes, listed in $STATE_DIR/head.pids)"
echo "  GCS address:   127.0.0.1:$GCS_PORT      (ray.init(address=...), ray status --address ...)"
echo "  dashboard/job: http://127.0.0.1:$DASHBOARD_PORT"
echo "export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT"
echo "export RAY_AUTH_MODE=token   # token auth is on: clients send the token (RAY_AUTH_TOKEN, or the file $token_file)"
