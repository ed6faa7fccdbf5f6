#!/usr/bin/env bash
# Boot a throw-away systemd with a dbus-daemon inside: recipe A of
# ../shared/reference/test-infrastructure.md (systemd as PID 1 of private pid+mount+uts+cgroup
# namespaces, overlay root, private /tmp and /dev, read-only /proc/sys and /sys, own cgroup2 subtree).
#
#   B="$(tests/infra/systemd/start.sh)"   # prints the run dir on stdout (nothing else)
#   source "$B/env"                       # SD_PID SDRUN SD_UNIT_DIR SD_BUS SD_CGROUP SD_LOG SD_JOURNAL
#   journalctl -D "$SD_JOURNAL"           # its journal (systemd's messages, units' output)
#   busctl --address="$SD_BUS" status org.freedesktop.systemd1
#   nsenter -t "$SD_PID" -m -p systemctl status x.service
#   tests/infra/systemd/stop.sh "$B"      # poweroff, kill, remove cgroup and run dir
#
# Always pair it with stop.sh in a trap (or a Drop guard). Inside, the root is an overlay (host / read-only
# underneath, tmpfs on top), so nothing the systemd or its units do reaches host files, except:
#   /run = $SDRUN (a host directory under the run dir: unit files go to $SD_UNIT_DIR, the bus socket is
#          $SDRUN/dbus/system_bus_socket);
#   the directories listed in SD_BIND (space-separated absolute host paths, bind-mounted read-write at the
#          same path inside; e.g. a simulated cluster's journal shared by several such systemds);
#   the directories listed in SD_BIND_RO (likewise, read-only; e.g. a build directory on another mount).
# Env knobs: SD_OWNER=pid (a watchdog tears everything down once that process is gone, so a killed test
#   leaves nothing behind), SD_LOGLEVEL (systemd log level, default info), SD_START_TIMEOUT (s, default 30),
#   SD_NAME (host name inside, default sd-<random>).
set -euo pipefail
SELF_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
die() { echo "[systemd-ns] ERROR: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (namespaces, mounts, cgroups)"
SYSTEMD=/lib/systemd/systemd
[ -x "$SYSTEMD" ] || die "$SYSTEMD not found (apt-get install -y systemd)"
DBUS_DAEMON="$(command -v dbus-daemon || true)"
[ -n "$DBUS_DAEMON" ] || die "dbus-daemon not found (apt-get install -y dbus)"
for t in unshare nsenter busctl findmnt setsid; do
    command -v "$t" >/dev/null 2>&1 || die "'$t' not found on PATH"
done
CGROOT="$(findmnt -n -t cgroup2 -o TARGET | head -1)"
[ -n "$CGROOT" ] && [ -f "$CGROOT/cgroup.procs" ] || die "no cgroup2 mount (needed for the private cgroup subtree)"
for d in ${SD_BIND:-} ${SD_BIND_RO:-}; do
    case "$d" in /*) ;; *) die "SD_BIND/SD_BIND_RO entries must be absolute paths: $d" ;; esac
    [ -d "$d" ] || die "SD_BIND/SD_BIND_RO: $d is not a directory"
    case "$d" in /|/tmp|/dev|/dev/*|/proc|/proc/*|/sys|/sys/*|/run|/run/*) die "refusing to bind $d" ;; esac
done
TIMEOUT="${SD_START_TIMEOUT:-30}"

B="$(mktemp -d "${TMPDIR:-/tmp}/drbd-reactor-sd.XXXXXXXX")"
B="$(cd "$B" && pwd -P)"
[[ "$B" =~ ^[A-Za-z0-9_./-]+$ ]] || { rmdir "$B"; die "unsupported characters in run dir path: $B"; }
chmod 700 "$B"
SDRUN="$B/run"
LOG="$B/systemd.log"
CG="drbd-reactor-sd-$(basename "$B" | sed 's/^drbd-reactor-sd\.//')"
NAME="${SD_NAME:-sd-$(basename "$B" | sed 's/^drbd-reactor-sd\.//')}"
BUS="unix:path=$SDRUN/dbus/system_bus_socket"
# The marker stop.sh checks before removing anything.
echo "drbd-reactor systemd test namespace" > "$B/.drbd-reactor-sd"
cat > "$B/env" <<EOF
SD_PID=
SDRUN=$SDRUN
SD_UNIT_DIR=$SDRUN/systemd/system
SD_BUS=$BUS
SD_CGROUP=$CGROOT/$CG
SD_LOG=$LOG
SD_JOURNAL=$SDRUN/log/journal
EOF

fail() {
    echo "[systemd-ns] start failed: $*; last log lines:" >&2
    tail -n 30 "$LOG" >&2 2>/dev/null || true
    "$SELF_DIR/stop.sh" "$B" >&2 || true
    exit 1
}

mkdir -p "$SDRUN/systemd/system" "$B/newroot" "$B/ovl"
: > "$LOG"
U="$SDRUN/systemd/system"
cat > "$U/sd-test.target" <<'EOF'
[Unit]
Description=throw-away systemd for drbd-reactor tests
DefaultDependencies=no
EOF
# A system bus inside, so that zbus (which cannot use systemd's private socket) reaches this systemd.
cat > "$U/dbus.socket" <<'EOF'
[Unit]
DefaultDependencies=no
[Socket]
ListenStream=/run/dbus/system_bus_socket
EOF
cat > "$U/dbus.service" <<EOF
[Unit]
DefaultDependencies=no
Requires=dbus.socket
After=dbus.socket
[Service]
Type=notify
NotifyAccess=main
ExecStart=$DBUS_DAEMON --system --address=systemd: --nofork --nopidfile --systemd-activation --syslog-only
EOF

mkdir "$CGROOT/$CG" || { rm -rf "$B"; die "cannot create cgroup $CGROOT/$CG"; }

export B SDRUN LOG CG CGROOT NAME SYSTEMD
export SD_BIND="${SD_BIND:-}" SD_BIND_RO="${SD_BIND_RO:-}" SD_LOGLEVEL="${SD_LOGLEVEL:-info}"
setsid bash -c '
  echo $$ > "$CGROOT/$CG/cgroup.procs"
  exec unshare --pid --fork --mount --uts --cgroup --propagation private -- bash -c "
    set -e
    hostname \"\$NAME\"
    mount -t tmpfs -o mode=755 tmpfs \"\$B/ovl\"
    mkdir -p \"\$B/ovl/upper\" \"\$B/ovl/work\"
    mount -t overlay overlay -o lowerdir=/,upperdir=\"\$B/ovl/upper\",workdir=\"\$B/ovl/work\" \"\$B/newroot\"
    R=\"\$B/newroot\"
    mount -t tmpfs -o mode=755,nosuid tmpfs \"\$R/dev\"
    for d in null zero full random urandom tty; do touch \"\$R/dev/\$d\"; mount --bind \"/dev/\$d\" \"\$R/dev/\$d\"; done
    touch \"\$R/dev/console\"; mount --bind \"\$LOG\" \"\$R/dev/console\"
    mkdir \"\$R/dev/pts\" \"\$R/dev/shm\"
    mount -t devpts -o newinstance,ptmxmode=0666 devpts \"\$R/dev/pts\"; ln -s pts/ptmx \"\$R/dev/ptmx\"
    mount -t tmpfs -o mode=1777 tmpfs \"\$R/dev/shm\"
    mount -t proc proc \"\$R/proc\"
    mount --bind \"\$R/proc/sys\" \"\$R/proc/sys\"; mount -o remount,bind,ro \"\$R/proc/sys\"
    mount -t sysfs -o ro sysfs \"\$R/sys\"
    mount -t cgroup2 cgroup2 \"\$R/sys/fs/cgroup\"
    mount --bind \"\$SDRUN\" \"\$R/run\"
    mount -t tmpfs -o mode=1777 tmpfs \"\$R/tmp\"
    for d in \$SD_BIND; do mkdir -p \"\$R\$d\"; mount --bind \"\$d\" \"\$R\$d\"; done
    for d in \$SD_BIND_RO; do mkdir -p \"\$R\$d\"; mount --bind \"\$d\" \"\$R\$d\"; mount -o remount,bind,ro \"\$R\$d\"; done
    mkdir -p \"\$R/.oldroot\"
    cd \"\$R\" && pivot_root . .oldroot && umount -l /.oldroot
    export container=drbd-reactor-test
    exec \"\$SYSTEMD\" --system --unit=sd-test.target --log-target=console --log-level=\"\$SD_LOGLEVEL\" --show-status=no
  "' </dev/null >>"$LOG" 2>&1 &
L=$!

SP=
deadline=$(( $(date +%s) + TIMEOUT ))
while :; do
    SP="$(pgrep -P "$L" -x systemd || true)"
    [ -n "$SP" ] && [ -S "$SDRUN/systemd/private" ] && break
    kill -0 "$L" 2>/dev/null || fail "the launcher died"
    [ "$(date +%s)" -lt "$deadline" ] || fail "systemd did not come up within ${TIMEOUT}s"
    sleep 0.05
done
sed -i "s|^SD_PID=.*|SD_PID=$SP|" "$B/env"
echo "$L" > "$B/launcher.pid"

# A journal inside, volatile (in $SDRUN/log/journal, readable from the host with journalctl -D): systemd's
# own messages and the units' output. (Its console log is lost: /dev/console here is no terminal.)
mkdir -p "$SDRUN/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\nForwardToConsole=no\nForwardToKMsg=no\nForwardToSyslog=no\nForwardToWall=no\n' \
    > "$SDRUN/systemd/journald.conf.d/drbd-reactor-test.conf"
if nsenter -t "$SP" -m -p systemctl start systemd-journald.service >>"$LOG" 2>&1; then
    nsenter -t "$SP" -m -p systemctl log-target journal >>"$LOG" 2>&1 || true
else
    echo "[systemd-ns] no journal inside (systemd-journald did not start); continuing" >>"$LOG"
fi
nsenter -t "$SP" -m -p systemctl start dbus.service >>"$LOG" 2>&1 || fail "cannot start dbus.service inside"
until busctl --address="$BUS" status org.freedesktop.systemd1 >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "org.freedesktop.systemd1 did not appear on $BUS within ${TIMEOUT}s"
    sleep 0.02
done

if [ -n "${SD_OWNER:-}" ]; then
    # Tear down when the owner goes away without calling stop.sh (a killed test process).
    setsid bash -c '
      while kill -0 "$0" 2>/dev/null && [ -f "$1/env" ]; do sleep 1; done
      [ -f "$1/env" ] && exec "$2" "$1"
      true' "$SD_OWNER" "$B" "$SELF_DIR/stop.sh" </dev/null >/dev/null 2>&1 &
fi
echo "$B"
