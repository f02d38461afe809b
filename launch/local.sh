#!/usr/bin/env bash
# A parameter server with 2 shards and N workers on this machine, on loopback.
#
#   launch/local.sh [N] [ps-server start options...]
#
#   launch/local.sh                                   # 4 workers, bsp, runs until Ctrl-C
#   launch/local.sh --consistency asp --max-steps 3000  # N defaults to 4
#   launch/local.sh 3 --consistency ssp:2 --max-steps 2000
#   PYTHONPATH=launch launch/local.sh 2 --task example_task:build --min-workers 2 --max-steps 1000
#   launch/local.sh 2 --checkpoint-dir runs/local/ckpt   # checkpoints every 30 s and at the end
#   launch/local.sh 2 --resume runs/local/ckpt           # continue that run (same 2 shards)
#
# The run ends when the server ends it (--max-steps, or `ps-server stop` from
# another terminal) or on Ctrl-C. Either way every process this script started
# is stopped on exit: first politely (`ps-server stop`: workers finish and the
# server writes its final checkpoint), then by pid.
# Logs go to $LOGDIR (default runs/local): server.log, worker-<i>.log.
# PS_* environment variables reach every process (see docs/operations.md);
# PS_PORT sets the port here too (do not pass --port).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${BIN:-$ROOT/.venv/bin}"  # where ps-server and ps-worker are; `make demo` creates it
[[ -x "$BIN/ps-server" ]] || BIN="$(dirname "$(command -v ps-server)")"

WORKERS=4
if [[ $# -gt 0 && "$1" != -* ]]; then
    WORKERS="$1"
    shift
fi
[[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [N] [ps-server start options...]" >&2; exit 2; }
PORT="${PS_PORT:-5555}"  # the coordinator; shards use PORT+1 and PORT+2
SERVER="tcp://127.0.0.1:$PORT"
LOGDIR="${LOGDIR:-runs/local}"
mkdir -p "$LOGDIR"

server_pid=""
child_pids=()  # the server's own children (shards), recorded once it is ready
worker_pids=()

alive() { [[ -n "$1" ]] && kill -0 "$1" 2>/dev/null; }

cleanup() {
    trap - EXIT INT TERM
    if alive "$server_pid"; then
        echo "stopping the run" >&2
        "$BIN/ps-server" stop --server "$SERVER" >/dev/null 2>&1 || true
    fi
    local pids=("${worker_pids[@]}" "$server_pid" "${child_pids[@]}")
    for _ in $(seq 50); do  # up to 10 s for everything to end by itself
        local left=0
        for pid in "${pids[@]}"; do alive "$pid" && left=1; done
        [[ $left == 0 ]] && return
        sleep 0.2
    done
    for pid in "${pids[@]}"; do alive "$pid" && kill -TERM "$pid" 2>/dev/null || true; done
    sleep 2
    for pid in "${pids[@]}"; do alive "$pid" && kill -KILL "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$BIN/ps-server" start --port "$PORT" --shards 2 "$@" >"$LOGDIR/server.log" 2>&1 &
server_pid=$!

# the server prints "paramserver ready" once the coordinator and both shards are bound
for _ in $(seq 600); do
    grep -q "paramserver ready" "$LOGDIR/server.log" && break
    alive "$server_pid" || { echo "ps-server start failed:" >&2; tail -n 20 "$LOGDIR/server.log" >&2; exit 1; }
    sleep 0.2
done
grep -q "paramserver ready" "$LOGDIR/server.log" || { echo "server not ready after 120 s; see $LOGDIR/server.log" >&2; exit 1; }
mapfile -t child_pids < <(pgrep -P "$server_pid" || true)
echo "server at $SERVER (pid $server_pid); starting $WORKERS workers; logs in $LOGDIR" >&2

for i in $(seq "$WORKERS"); do
    "$BIN/ps-worker" join --server "$SERVER" >"$LOGDIR/worker-$i.log" 2>&1 &
    worker_pids+=($!)
done

wait "$server_pid" || true  # returns when the run ends, or early on Ctrl-C (then the trap runs)
tail -n 1 "$LOGDIR/server.log" >&2
