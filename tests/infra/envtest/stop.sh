#!/usr/bin/env bash
# Stop a run started by start.sh and remove its run dir.
#
#   tests/infra/envtest/stop.sh RUN_DIR
#
# Kills kube-apiserver first, then etcd (SIGTERM, then SIGKILL after ENVTEST_STOP_GRACE
# seconds, default 10), waits until both are gone, then deletes RUN_DIR.
# A pid is only signalled if /proc/<pid>/cmdline still mentions RUN_DIR, so a recycled pid
# of an unrelated process is never hit. Exits non-zero if a process could not be stopped.
# ENVTEST_KEEP_RUN_DIR=1 keeps the directory (logs) after stopping.
set -euo pipefail
log() { printf '[envtest %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

[[ $# -eq 1 ]] || { echo "usage: $0 RUN_DIR" >&2; exit 2; }
RUN_DIR="${1%/}"
if [[ ! -d "$RUN_DIR" ]]; then
    log "run dir ${RUN_DIR} does not exist; nothing to stop"
    exit 0
fi
RUN_DIR="$(cd "$RUN_DIR" && pwd -P)"
# Refuse to rm -rf anything that start.sh did not create.
[[ "$(basename "$RUN_DIR")" == drbd-reactor-envtest.* ]] || {
    log "ERROR: ${RUN_DIR} does not look like an envtest run dir"
    exit 2
}

GRACE="${ENVTEST_STOP_GRACE:-10}"
ours() {  # ours PID: the pid is alive and is one of this run's processes
    local pid="$1"
    [[ "$pid" =~ ^[0-9]+$ ]] && [[ -r "/proc/${pid}/cmdline" ]] &&
        tr '\0' ' ' <"/proc/${pid}/cmdline" | grep -qF -- "$RUN_DIR"
}
gone() {  # a zombie (already exited, not yet reaped by its parent) counts as gone
    local pid="$1" state
    [[ -r "/proc/${pid}/stat" ]] || return 0
    state="$(sed -E 's/^[0-9]+ \(.*\) (.).*/\1/' "/proc/${pid}/stat" 2>/dev/null)" || return 0
    [[ "$state" == Z || "$state" == X ]]
}

rc=0
for name in kube-apiserver etcd; do
    pidfile="${RUN_DIR}/${name}.pid"
    [[ -f "$pidfile" ]] || continue
    pid="$(cat "$pidfile")"
    if ! ours "$pid" || gone "$pid"; then
        rm -f "$pidfile"
        continue
    fi
    log "stopping ${name} (pid ${pid})"
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$(( SECONDS + GRACE ))
    while ! gone "$pid" && (( SECONDS < deadline )); do sleep 0.1; done
    if ! gone "$pid"; then
        log "${name} (pid ${pid}) ignored SIGTERM for ${GRACE}s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        deadline=$(( SECONDS + 10 ))
        while ! gone "$pid" && (( SECONDS < deadline )); do sleep 0.1; done
    fi
    if gone "$pid"; then
        rm -f "$pidfile"
    else
        log "ERROR: ${name} (pid ${pid}) is still running"
        rc=1
    fi
done

if (( rc == 0 )); then
    if [[ "${ENVTEST_KEEP_RUN_DIR:-0}" == 1 ]]; then
        log "stopped; kept ${RUN_DIR}"
    else
        rm -rf -- "$RUN_DIR"
        log "stopped; removed ${RUN_DIR}"
    fi
fi
exit "$rc"
