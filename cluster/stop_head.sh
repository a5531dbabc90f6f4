#!/usr/bin/env bash
# Stop the Ray head that cluster/start_head.sh started from this checkout, and
# nothing else: SIGTERM to its `ray start --block` process (which shuts down
# the processes it started), then whatever is left in that process's own
# process group (created by start_head.sh). Never `ray stop`: it kills every
# Ray on the machine.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE_DIR="${COEVOLVE_HEAD_DIR:-$ROOT/runs/.ray-head}"
GRACE_S="${GRACE_S:-30}"

if [[ ! -f "$STATE_DIR/head.pid" ]]; then
  echo "stop_head: no head started from here ($STATE_DIR/head.pid not found)"
  exit 0
fi
PID="$(cat "$STATE_DIR/head.pid")"
TEMP_DIR="$(cat "$STATE_DIR/temp_dir" 2>/dev/null || true)"

# Ours only: the process must still be the `ray start` that names our temp dir
# (a PID can be reused after a reboot or a crash).
ours() { [[ -n "$TEMP_DIR" && -r "/proc/$1/cmdline" ]] && tr '\0' ' ' < "/proc/$1/cmdline" | grep -qF -- "--temp-dir=$TEMP_DIR"; }
group() { pgrep -g "$PID" || true; }

wait_gone() {  # wait until the head's process group is empty, at most $1 seconds
  local deadline=$((SECONDS + $1))
  while [[ -n "$(group)" ]] && (( SECONDS < deadline )); do sleep 0.5; done
  [[ -z "$(group)" ]]
}

# A head killed outright (SIGKILL, a crash) can linger as a zombie until reaped:
# it is gone, so only its group's stragglers and its temp dir are left to clean.
alive() { kill -0 "$1" 2>/dev/null && [[ "$(awk '/^State:/ {print $2}' "/proc/$1/status" 2>/dev/null)" != Z ]]; }

if alive "$PID" && ours "$PID"; then
  kill -TERM "$PID"
  wait_gone "$GRACE_S" || true
elif alive "$PID"; then
  echo "stop_head: PID $PID is not the head this script started; leaving it alone" >&2
  rm -f "$STATE_DIR/head.pid"
  exit 1
fi
# Stragglers in the head's own process group (pgid = PID, made by start_head.sh),
# only if one of them is visibly ours (its command line names our temp dir): after a
# crash the PID may have been reused by someone else's group leader.
group_is_ours() {
  local p
  for p in $(group); do
    [[ -n "$TEMP_DIR" && -r "/proc/$p/cmdline" ]] && tr '\0' ' ' < "/proc/$p/cmdline" | grep -qF -- "$TEMP_DIR" && return 0
  done
  return 1
}
if [[ -n "$(group)" ]] && group_is_ours; then
  kill -TERM -- "-$PID" 2>/dev/null || true
  wait_gone 10 || kill -KILL -- "-$PID" 2>/dev/null || true
fi
rm -f "$STATE_DIR/head.pid" "$STATE_DIR/head.pids" "$STATE_DIR/temp_dir"
[[ "$TEMP_DIR" == /tmp/cvhead-* ]] && rm -rf "$TEMP_DIR"
echo "stop_head: stopped the head (process group $PID)"
