#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Guests of the real-DRBD lab. Every command works on the run dir $LAB_RUN (sockets, overlays, pids,
# consoles; keep its path short: unix socket paths are limited to 107 bytes).
#
#   LAB_RUN=DIR LAB_IMG=IMGDIR vm.sh start N   boot guest N (1..3): TCG, a qcow2 overlay of the image,
#                                               a raw data disk (/dev/vdb), two NICs, agent on ttyS1
#   vm.sh wait N [SECS]      wait until guest N's agent answers
#   vm.sh exec N SCRIPT      run a bash script in guest N (prints its output, exits with its code)
#   vm.sh push N FILE PATH [MODE]   copy a file into guest N (through the 9p share)
#   vm.sh link N NIC on|off  plug or pull guest N's virtual cable (QMP set_link; NIC is nic0 or nic1)
#   vm.sh kill N             power cut: SIGKILL to guest N's qemu, by its PID
#   vm.sh stop N             clean poweroff, SIGKILL after 30 s
#   vm.sh down               kill every guest of $LAB_RUN (what the trap runs)
#
# Network: each pair of guests is one point-to-point link, QEMU dgram netdevs over unix sockets in
# $LAB_RUN (links 12, 13, 23; addresses 10.0.<link>.<node>/24). Nothing is created in the host's
# network namespace: no tap, bridge, route or user-mode netdev.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
: "${LAB_RUN:?set LAB_RUN to the lab run dir}"
mkdir -p "$LAB_RUN/share"
cmd=${1:?command}; N=${2:-}
py() { python3 "$LAB_SRC_DIR/lab.py" "$@"; }

links_of() { case $1 in 1) echo "12 13";; 2) echo "12 23";; 3) echo "13 23";; *) lab_die "guest $1: 1..3";; esac; }
pidof_guest() { cat "$LAB_RUN/node$1.pid" 2>/dev/null; }
alive() { local p; p=$(pidof_guest "$1") && [[ -n "$p" ]] && kill -0 "$p" 2>/dev/null && grep -q qemu "/proc/$p/cmdline" 2>/dev/null; }

start() {
    : "${LAB_IMG:?set LAB_IMG to the image dir (build.sh prints it)}"
    alive "$N" && lab_die "node$N is running"
    local run=$LAB_RUN i=0 l peer args=() addrs=()
    [[ -e $run/node$N-root.qcow2 ]] || qemu-img create -q -f qcow2 -F raw -b "$LAB_IMG/root.ext4" "$run/node$N-root.qcow2"
    [[ -e $run/node$N-data.raw ]] || truncate -s "${LAB_DATA_MB}M" "$run/node$N-data.raw"
    for l in $(links_of "$N"); do
        peer=${l/$N/}
        rm -f "$run/l$l-$N.sock"
        args+=(-netdev "dgram,id=n$i,local.type=unix,local.path=$run/l$l-$N.sock,remote.type=unix,remote.path=$run/l$l-$peer.sock"
               -device "virtio-net-pci,id=nic$i,netdev=n$i,mac=52:54:00:00:0$N:0$i")
        addrs+=("eth$i=10.0.$l.$N/24"); i=$((i+1))
    done
    rm -f "$run/node$N.qmp" "$run/node$N.agent" "$run/node$N.pid"
    local IFS=,
    local net="${addrs[*]}"; unset IFS
    nice -n "${LAB_NICE:-5}" qemu-system-x86_64 -name "node$N" -accel "tcg,tb-size=$LAB_TB" -m "$LAB_MEM" -smp 1 \
        -nodefaults -display none -no-reboot \
        -kernel "$LAB_IMG/vmlinuz" -initrd "$LAB_IMG/initrd.cpio.gz" \
        -append "console=ttyS0 root=/dev/vda rw net.ifnames=0 systemd.hostname=node$N lab.net=$net panic=-1 ${LAB_APPEND:-}" \
        -drive "file=$run/node$N-root.qcow2,if=virtio,format=qcow2,cache=unsafe" \
        -drive "file=$run/node$N-data.raw,if=virtio,format=raw,cache=none" \
        "${args[@]}" \
        -virtfs "local,path=$run/share,mount_tag=host,security_model=none,readonly=on,id=share" \
        -chardev "file,id=con,path=$run/node$N.console" -serial chardev:con \
        -chardev "socket,id=agent,path=$run/node$N.agent,server=on,wait=off" -serial chardev:agent \
        -qmp "unix:$run/node$N.qmp,server=on,wait=off" \
        -daemonize -pidfile "$run/node$N.pid"
    echo "node$N pid $(pidof_guest "$N")" >&2
}

case $cmd in
start) start ;;
wait) py wait "$LAB_RUN/node$N.agent" "${3:-300}" ;;
exec) py exec "$LAB_RUN/node$N.agent" "${3:?script}" "${LAB_EXEC_TIMEOUT:-300}" ;;
push)
    f=${3:?file}; dst=${4:?guest path}; name="push-$N-$$-$(basename "$f")"
    cp "$f" "$LAB_RUN/share/$name"
    rc=0; py exec "$LAB_RUN/node$N.agent" "install -D -m ${5:-644} /mnt/host/$name $(printf %q "$dst")" 120 || rc=$?
    rm -f "$LAB_RUN/share/$name"; exit $rc ;;
link)
    nic=${3:?nic}; case ${4:?on|off} in on) up=true;; off) up=false;; *) lab_die "on|off";; esac
    py qmp "$LAB_RUN/node$N.qmp" "{\"execute\":\"set_link\",\"arguments\":{\"name\":\"$nic\",\"up\":$up}}" ;;
kill) if alive "$N"; then kill -9 "$(pidof_guest "$N")"; fi
      while alive "$N"; do sleep 0.05; done; rm -f "$LAB_RUN/node$N.pid" ;;
stop)
    alive "$N" || exit 0
    py exec "$LAB_RUN/node$N.agent" 'systemctl --no-block poweroff' 5 >/dev/null 2>&1 || true
    for _ in $(seq 300); do alive "$N" || exit 0; sleep 0.1; done
    "$0" kill "$N" ;;
down) for n in 1 2 3; do "$0" kill "$n"; done ;;
*) lab_die "unknown command $cmd" ;;
esac
