#!/bin/bash
# The lab's command agent on /dev/ttyS1 (the host end is a QEMU unix-socket chardev).
# Request, one line:  <id> <base64 of a bash script>
# Reply, one line:    @@R <id> <exit code> <base64 of the script's stdout and stderr>
# Requests run one after another; a reply carries its request's id, so the host drops stale replies.
# The host directory shared over 9p (read-only) is mounted at /mnt/host for copying files in.
mkdir -p /mnt/host
modprobe -a 9pnet_virtio 9p 2>/dev/null
mountpoint -q /mnt/host || mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288 host /mnt/host 2>/dev/null
stty -F /dev/ttyS1 raw -echo -icrnl -onlcr
exec </dev/ttyS1 >/dev/ttyS1 2>/dev/null
out=/run/lab-agent.out
while IFS=' ' read -r id b64; do
    [ -n "$id" ] || continue
    if script=$(printf '%s' "$b64" | base64 -d 2>/dev/null); then
        bash -c "$script" >"$out" 2>&1 </dev/null; rc=$?
    else
        echo "lab agent: request is not base64" >"$out"; rc=255
    fi
    printf '@@R %s %d %s\n' "$id" "$rc" "$(base64 -w0 <"$out")"
done
