#!/usr/bin/env bash
# stop.sh RUN_DIR: tear down a systemd booted by start.sh. Idempotent; safe to call from a trap, a Drop guard
# and the owner watchdog at once.
#  1. poweroff by signal (SIGRTMIN+4: stops all units, then PID 1 exits), SIGKILL after 10 s (killing a
#     pid-namespace init kills every process in it);
#  2. kill whatever is still in the cgroup subtree, remove the subtree;
#  3. remove the run dir (only if it carries start.sh's marker and nothing is mounted under it).
set -uo pipefail
B="${1:?usage: stop.sh RUN_DIR}"
[ -f "$B/.drbd-reactor-sd" ] || { [ -d "$B" ] || exit 0; echo "[systemd-ns] $B is not a start.sh run dir; not touching it" >&2; exit 1; }
SD_PID= SD_CGROUP=
# shellcheck disable=SC1091
. "$B/env"
case "$SD_CGROUP" in */drbd-reactor-sd-*) ;; *) echo "[systemd-ns] odd cgroup '$SD_CGROUP' in $B/env" >&2; exit 1 ;; esac
CGNAME="/${SD_CGROUP##*/}"

# Our systemd, and not a process that reused its pid: its cgroup2 path lies in our subtree.
ours() { [ -n "$1" ] && grep -q "^0::$CGNAME/" "/proc/$1/cgroup" 2>/dev/null; }

if ours "$SD_PID"; then
    kill -s SIGRTMIN+4 "$SD_PID" 2>/dev/null
    for _ in $(seq 1 100); do ours "$SD_PID" || break; sleep 0.1; done
    ours "$SD_PID" && kill -9 "$SD_PID" 2>/dev/null
    for _ in $(seq 1 50); do ours "$SD_PID" || break; sleep 0.1; done
fi
if [ -f "$B/launcher.pid" ]; then
    L="$(cat "$B/launcher.pid")"
    for _ in $(seq 1 50); do kill -0 "$L" 2>/dev/null || break; sleep 0.1; done
fi
if [ -d "$SD_CGROUP" ]; then
    for _ in $(seq 1 50); do
        left="$(find "$SD_CGROUP" -name cgroup.procs -exec cat {} + 2>/dev/null)"
        [ -z "$left" ] && break
        # shellcheck disable=SC2086
        kill -9 $left 2>/dev/null
        sleep 0.1
    done
    for _ in $(seq 1 20); do
        find "$SD_CGROUP" -depth -type d -exec rmdir {} \; 2>/dev/null
        [ -d "$SD_CGROUP" ] || break
        sleep 0.1
    done
    [ -d "$SD_CGROUP" ] && echo "[systemd-ns] could not remove cgroup $SD_CGROUP" >&2
fi
if findmnt -rn -o TARGET | grep -q "^$B/"; then
    echo "[systemd-ns] mounts left under $B; not removing it" >&2
    exit 1
fi
rm -rf "$B"
