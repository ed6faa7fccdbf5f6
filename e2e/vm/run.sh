#!/usr/bin/env bash
# The agent on real DRBD, by hand: three QEMU guests (TCG) with the DRBD 9 kernel module built from
# source, real systemd and drbd-utils (tests/infra/vm/, docs/real-drbd.md). Run as root on Debian.
#
#   e2e/vm/run.sh              build/take the cached image, boot 3 guests, bring up r0 (3 replicas,
#                              quorum majority), node1 Primary, the agent on each guest with
#                              examples/policies (debugger, exporter, UMH quorum rule); then wait
#   NODES=2 e2e/vm/run.sh      fewer guests (1..3)
#
# While it runs, from another shell (the lines are printed with the run dir filled in):
#   LAB_RUN=DIR tests/infra/vm/vm.sh exec 1 'curl -s localhost:9942/status'
#   LAB_RUN=DIR tests/infra/vm/vm.sh exec 1 'curl -s localhost:9942/metrics | grep ^drbd_'
#   LAB_RUN=DIR tests/infra/vm/vm.sh link 1 nic0 off      # pull node1's cable to node2
#   LAB_RUN=DIR tests/infra/vm/vm.sh kill 2               # power cut of node2
#   LAB_RUN=DIR tests/infra/vm/vm.sh exec 1 'journalctl -u drbd-reactor -o cat | tail'
# Ctrl-C stops the guests (by PID) and removes the run dir.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VM="$ROOT/tests/infra/vm/vm.sh"
NODES=${NODES:-3}
[ "$(id -u)" -eq 0 ] || { echo "run as root (the image build unpacks a root file system)" >&2; exit 1; }

cd "$ROOT"
cargo build --release --bin drbd-reactor
LAB_IMG="$(tests/infra/vm/build.sh)"
LAB_RUN="$(mktemp -d /tmp/drl.XXXXXX)"
export LAB_IMG LAB_RUN
trap '"$VM" down; rm -rf "$LAB_RUN"' EXIT
trap 'exit 130' INT TERM
objcopy --strip-debug target/release/drbd-reactor "$LAB_RUN/share/drbd-reactor"
cp -r examples/policies "$LAB_RUN/share/policies"

t0=$SECONDS
for n in $(seq "$NODES"); do "$VM" start "$n"; done
for n in $(seq "$NODES"); do "$VM" wait "$n" 300 >/dev/null; done
echo "guests up after $((SECONDS - t0)) s"

res="resource r0 {
  options { auto-promote no; quorum majority; on-no-quorum io-error; }
  volume 0 { device /dev/drbd0; disk /dev/vdb; meta-disk internal; }"
for n in $(seq "$NODES"); do res+="
  on node$n { node-id $((n - 1)); }"; done
for l in 12 13 23; do
    a=${l:0:1} b=${l:1:1}
    [ "$a" -le "$NODES" ] && [ "$b" -le "$NODES" ] || continue
    res+="
  connection { host node$a address 10.0.$l.$a:7789; host node$b address 10.0.$l.$b:7789; }"
done
res+="
}"
printf '%s\n' "$res" > "$LAB_RUN/share/r0.res"

for n in $(seq "$NODES"); do
    "$VM" exec "$n" 'set -e
        install -m755 /mnt/host/drbd-reactor /usr/local/bin/drbd-reactor
        rm -rf /etc/drbd-reactor.d; cp -r /mnt/host/policies /etc/drbd-reactor.d
        cp /mnt/host/r0.res /etc/drbd.d/r0.res
        yes 2>/dev/null | drbdadm create-md --force r0 >/dev/null 2>&1
        modprobe drbd; drbdadm up r0
        systemd-run --unit=drbd-reactor /usr/local/bin/drbd-reactor agent --policy-dir /etc/drbd-reactor.d \
            --drbdsetup drbdsetup --drbdadm drbdadm --host-exec "" --listen 127.0.0.1:9942 >/dev/null 2>&1
        echo "node$(hostname | tr -dc 0-9): r0 up, agent started"'
done
"$VM" exec 1 'drbdadm primary --force r0 && echo "node1: Primary (initial sync to the peers)"'
cat <<MSG

Lab running in $LAB_RUN. Try:
  LAB_RUN=$LAB_RUN $VM exec 1 'curl -s localhost:9942/status'
  LAB_RUN=$LAB_RUN $VM exec 1 'curl -s localhost:9942/metrics | grep ^drbd_'
  LAB_RUN=$LAB_RUN $VM exec 1 'drbdsetup status --verbose'
  LAB_RUN=$LAB_RUN $VM link 1 nic0 off        # cut node1 <-> node2 (nic1: node1 <-> node3)
  LAB_RUN=$LAB_RUN $VM kill 2                 # power cut of node2 ('start 2' boots it again)
Ctrl-C stops everything.
MSG
while sleep 3600; do :; done
